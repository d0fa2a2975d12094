"""Test-time adaptation on unlabelled target-language batches: EMEA and TENT.

Wang et al. 2021, "Efficient Test Time Adapter Ensembling for Low-resource
Language Varieties" (EMEA); Wang et al. 2021, "Tent: Fully Test-Time
Adaptation by Entropy Minimization" (TENT).

    test batch (lang L) ─► Stack(Average(a₁ … aₙ), task) ─► logits ─► entropy
         EMEA: per-layer weights w[layer] = softmax(θ[layer]), θ = 0 (uniform) ─► k steps on θ
         TENT: k steps on LayerNorm and/or adapter parameters
    ─► predict with the adapted setup ─► (reset per batch, or carry on)

Per-layer weights come from the core: ``AdaptedModel.set_average_weights``
gives ``Average(a₁ … aₙ)`` a provider that returns row ``w[layer]`` of the
table for each point holding a candidate (a "layer" is such a point, in model
order), so each point computes ``h + Σᵢ w[layer, i] (aᵢ(h) − h)``; adapter
modules are never touched. The provider, loaded candidates, every touched
parameter and every ``eval_setups`` entry it wrote (the user's own entries
come back as they were) are put back after test/predict unless ``keep=True``,
and always when the run fails; train/eval modes and grad flags are put back
after each batch's steps, whether or not they succeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from xlpeft.core.composition import Average, Stack
from xlpeft.errors import XlpeftValueError

METHODS = ("emea", "tent", "uniform", "none")
_ABSENT = object()  # an eval_setups entry the user had not set
TENT_PARAMS = ("layernorm", "adapters")


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean prediction entropy (token logits are averaged over ``mask``)."""
    logp = torch.log_softmax(logits.float(), -1)
    ent = -(logp.exp() * logp).sum(-1)
    if ent.dim() > 1 and mask is not None:
        return (ent * mask).sum() / mask.sum().clamp_min(1)
    return ent.mean()


class EnsembleWeights(nn.Module):
    """θ (layers × candidates); weight = softmax over candidates, per layer.

    Called with a point, it is the ``Average``'s weight provider: the point's row,
    or None (the Average's own weights) at a point holding no candidate.
    """

    def __init__(self, layers: Sequence[str], candidates: int) -> None:
        super().__init__()
        self.rows = {key: i for i, key in enumerate(layers)}  # point key -> row of θ
        self.theta = nn.Parameter(torch.zeros(len(self.rows), candidates))

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.theta, -1)

    def forward(self, point: Any) -> torch.Tensor | None:
        row = self.rows.get(point.key)
        return None if row is None else torch.softmax(self.theta[row], -1)


def _checkpoint_blocks(adapted: Any) -> Any:
    """Checkpoint the backbone's blocks for the steps; returns what switches it off again (or None).

    Hugging Face layers checkpoint only in training mode, so the blocks (not their
    dropout children, which stay in eval mode) are flagged as training; the caller
    puts every module's mode back.
    """
    model = adapted.model
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers 5 renamed it
    was = bool(getattr(model, flag, False))
    if not was:
        adapted.activation_checkpointing_enable()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True
    return None if was else getattr(model, "activation_checkpointing_disable", None) or \
        model.gradient_checkpointing_disable


class TestTimeAdaptation(L.Callback):
    """Entropy-minimising test-time adaptation of a ``TaskAdaptation`` module (see module docstring).

    Args:
        method: ``emea`` (ensemble + steps on its per-layer weights), ``uniform`` (ensemble, no
            steps), ``tent`` (steps on ``tent_params`` under the module's own setups) or ``none``.
        steps: entropy-minimisation steps per test batch (k).
        lr: Adam learning rate of those steps.
        candidates: language adapters to ensemble (already loaded in the model).
        candidate_dirs: ``{name: adapter directory}`` loaded at setup (backbone checked), removed after.
        top_k: ensemble size per target language, nearest by typology (``xlpeft.typology``).
        reset: start every batch from uniform weights / the original parameters; else carry on.
        tent_params: what TENT adapts: ``layernorm`` and/or ``adapters``.
        keep: keep the adapted weights and ensemble after test/predict (else all is restored).
        track_entropy: one extra no-grad forward per batch to log the entropy after the steps.
        checkpointing: activation checkpointing of the backbone's blocks during the steps: only
            each block's input stays alive for the backward (one block's activations at a time),
            at the price of re-running each block's forward in the backward. Exact.
    """

    __test__ = False  # not a pytest class

    def __init__(self, method: str = "emea", steps: int = 10, lr: float = 0.1,
                 candidates: Sequence[str] | None = None, candidate_dirs: dict[str, str] | None = None,
                 top_k: int = 3, reset: bool = True, tent_params: Sequence[str] = ("layernorm",),
                 keep: bool = False, track_entropy: bool = True, checkpointing: bool = False) -> None:
        if method not in METHODS:
            raise XlpeftValueError(f"`method` can be {', '.join(METHODS)}; got {method!r}")
        if steps < 0 or top_k < 1:
            raise XlpeftValueError(f"`steps` must be ≥ 0 and `top_k` ≥ 1; got steps={steps}, top_k={top_k}")
        bad = [p for p in tent_params if p not in TENT_PARAMS]
        if bad:
            raise XlpeftValueError(f"`tent_params` can be {', '.join(TENT_PARAMS)}; got {bad}")
        self.method, self.steps, self.lr = method, int(steps), float(lr)
        self.candidates = list(candidates or [])
        self.candidate_dirs = dict(candidate_dirs or {})
        self.top_k, self.reset, self.keep = top_k, reset, keep
        self.tent_params = tuple(tent_params)
        self.track_entropy = track_entropy  # one extra no-grad forward per batch, for entropy_log
        self.checkpointing = bool(checkpointing)
        self.tables: dict[str, torch.Tensor] = {}  # continual EMEA: θ per target language
        self.entropy_log: list[tuple[str, float, float]] = []  # (lang, before, after) per batch
        self._loaded: list[str] = []
        self._saved: dict[int, tuple[nn.Parameter, torch.Tensor, bool]] = {}
        self._ensemble: EnsembleWeights | None = None
        self._cands: tuple[str, ...] = ()
        self._active = False  # set up for test/predict/validate (never during fit)
        self._setups: dict[str, Any] = {}  # eval_setups entries this callback replaced: lang -> old or _ABSENT
        self.pool: list[str] = []

    # ----------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("test", "predict", "validate"):
            return
        adapted = pl_module.adapted
        try:
            for name, path in self.candidate_dirs.items():  # refuses another backbone's adapter
                if name not in adapted.configs:
                    adapted.load_adapter(path, name=name)
                    self._loaded.append(name)
            self._check_pool(adapted)
        except Exception:
            self.restore(pl_module)  # a failed setup leaves the model as it was
            raise
        self._active = True
        if self.method == "tent":
            self._save(self._tent_parameters(pl_module))

    def _check_pool(self, adapted: Any) -> None:
        pool = self.candidates or list(self.candidate_dirs)
        if self.method in ("emea", "uniform") and not pool:
            raise XlpeftValueError(
                "`candidates` can be names of loaded language adapters or `candidate_dirs`; got none. "
                "Give at least one language adapter to ensemble")
        missing = [c for c in pool if c not in adapted.configs]
        if missing:
            raise XlpeftValueError(f"candidate adapters {missing} are not loaded; loaded: "
                                   f"{adapted.adapter_names}. Load them or use `candidate_dirs`")
        self.pool = pool

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("test", "predict", "validate"):
            return
        self._active = False
        if not self.keep:
            self.restore(pl_module)

    def restore(self, pl_module: L.LightningModule) -> None:
        """Drop the ensemble weights; put back every parameter value and grad flag; unload candidates."""
        self._drop_ensemble(pl_module)
        with torch.no_grad():
            for param, value, flag in self._saved.values():
                param.copy_(value)
                param.requires_grad_(flag)
        self._saved.clear()
        own = getattr(pl_module, "eval_setups", None)
        for lang, old in self._setups.items():  # only the entries written here, as they were
            if old is _ABSENT:
                own.pop(lang, None)
            else:
                own[lang] = old
        self._setups.clear()
        for name in self._loaded:
            pl_module.adapted.delete_adapter(name)
        self._loaded.clear()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed run leaves the module as it was, ``keep`` or not."""
        if self._active or self._loaded or self._saved or self._setups or self._ensemble is not None:
            self._active = False
            self.restore(pl_module)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active:
            self.adapt(pl_module, batch)

    on_predict_batch_start = on_test_batch_start
    on_validation_batch_start = on_test_batch_start

    # ----------------------------------------------------------------- adaptation
    def candidates_for(self, lang: str) -> list[str]:
        """The given candidates, or the ``top_k`` typologically nearest to ``lang``."""
        pool = [c for c in self.pool if c != lang]
        if len(pool) <= self.top_k:
            return pool or list(self.pool)
        from xlpeft.typology import nearest_languages
        return [c for c, _ in nearest_languages(lang, pool, k=self.top_k)]

    def adapt(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        """Take ``steps`` entropy-minimisation steps on ``batch`` (before it is predicted)."""
        if self.method == "none":
            return
        with torch.inference_mode(False):  # Lightning evaluates under inference mode
            self._adapt(pl_module, batch)

    def _adapt(self, pl_module: L.LightningModule, batch: dict[str, Any]) -> None:
        langs = sorted(set(batch["langs"]))
        if self.method in ("emea", "uniform"):
            cands = {tuple(self.candidates_for(lang)) for lang in langs}
            if len(cands) > 1:
                raise XlpeftValueError(
                    f"a test batch mixes languages {langs} with different candidate ensembles; "
                    "evaluate one language per dataloader or pass `candidates` explicitly")
            self._ensure_ensemble(pl_module, cands.pop())
            task = pl_module.task_adapter
            for lang in langs:
                self._set_setup(pl_module, lang, Stack(Average(*self._cands), task))
            key = "+".join(langs)
            with torch.no_grad():
                start = self.tables.get(key) if not self.reset else None
                self._ensemble.theta.copy_(start if start is not None else torch.zeros_like(self._ensemble.theta))
            if self.method == "uniform":
                return
            params = [self._ensemble.theta]
        else:
            if self.reset:
                with torch.no_grad():
                    for param, value, _ in self._saved.values():
                        param.copy_(value)
            params = [p for p, _, _ in self._saved.values()]
        self._minimise(pl_module, batch, params, "+".join(langs))
        if self.method == "emea":
            self.tables["+".join(langs)] = self._ensemble.theta.detach().clone()

    def _set_setup(self, pl_module: L.LightningModule, lang: str, setup: Any) -> None:
        """Write ``eval_setups[lang]``, remembering the user's entry the first time."""
        if lang not in self._setups:
            self._setups[lang] = pl_module.eval_setups.get(lang, _ABSENT)
        pl_module.eval_setups[lang] = setup

    def _minimise(self, pl_module: L.LightningModule, batch: dict[str, Any], params: list[nn.Parameter],
                  lang: str) -> None:
        modes = [(m, m.training) for m in pl_module.modules()]  # each module's own mode
        flags = [(p, p.requires_grad) for p in pl_module.parameters()]
        first = last = None
        undo = None
        try:
            with torch.enable_grad():
                batch = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                for p, _ in flags:  # gradients only where they are used
                    p.requires_grad_(False)
                for p in params:
                    p.requires_grad_(True)
                optimizer = torch.optim.Adam(params, lr=self.lr)
                pl_module.eval()  # no dropout while adapting
                if self.checkpointing:
                    undo = _checkpoint_blocks(pl_module.adapted)
                for _ in range(self.steps):
                    loss = entropy(pl_module(batch), batch.get("attention_mask"))
                    first = loss.detach() if first is None else first
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                if self.track_entropy:
                    with torch.no_grad():
                        last = entropy(pl_module(batch), batch.get("attention_mask"))
        finally:
            for m, mode in modes:
                m.training = mode
            for p, flag in flags:
                p.requires_grad_(flag)
            if undo is not None:
                undo()
        if last is not None:  # one host read per batch, after the steps
            before, after = torch.stack([last if first is None else first, last]).tolist()
            self.entropy_log.append((lang, before, after))

    def _tent_parameters(self, pl_module: L.LightningModule) -> list[nn.Parameter]:
        adapted = pl_module.adapted
        params = []
        if "layernorm" in self.tent_params:
            params += [m.weight for m in adapted.model.modules() if isinstance(m, nn.LayerNorm)]
            params += [m.bias for m in adapted.model.modules() if isinstance(m, nn.LayerNorm) and m.bias is not None]
        if "adapters" in self.tent_params:
            for name in adapted.adapter_names:
                params += [p for m in adapted.adapter_modules(name) for p in m.parameters()]
        return params

    def _save(self, params: list[nn.Parameter]) -> None:
        for p in params:
            if id(p) not in self._saved:
                self._saved[id(p)] = (p, p.detach().clone(), p.requires_grad)

    # ----------------------------------------------------------------- ensemble
    def _ensure_ensemble(self, pl_module: L.LightningModule, cands: tuple[str, ...]) -> None:
        if cands == self._cands and self._ensemble is not None:
            return
        self._drop_ensemble(pl_module)
        adapted = pl_module.adapted
        layers = [p.key for p in adapted.points.values() if any(c in p.adapters for c in cands)]
        device = next(adapted.model.parameters()).device
        self._ensemble = EnsembleWeights(layers, len(cands)).to(device)
        adapted.set_average_weights(Average(*cands), self._ensemble)
        self._cands = cands

    def _drop_ensemble(self, pl_module: L.LightningModule) -> None:
        if self._ensemble is not None:
            pl_module.adapted.set_average_weights(Average(*self._cands), None)
        self._ensemble, self._cands = None, ()

    def layer_weights(self) -> torch.Tensor | None:
        """Current per-layer ensemble weights (layers × candidates), if an ensemble is active."""
        return None if self._ensemble is None else self._ensemble.weights().detach().clone()

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "steps": self.steps, "reset": self.reset,
                "tables": {k: v.cpu() for k, v in self.tables.items()},
                "entropy_log": list(self.entropy_log)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method", self.method) != self.method:
            raise XlpeftValueError(f"checkpoint TTA state is for method {state_dict['method']!r}; "
                                   f"this callback runs {self.method!r}. Use the same method to resume")
        self.tables = {k: v.clone() for k, v in state_dict.get("tables", {}).items()}
        self.entropy_log = list(state_dict.get("entropy_log", []))
