"""LT-SFT (and FishMask) training in one ``fit``: language SFTs by masked LM, task SFTs by classification.

Ansell et al. 2022 (``xlpeft.methods.sft``); FishMask: Sung et al. 2021.

    step 0 .. phase1_steps        lt-sft: fine-tune the eligible θ densely (AdamW)
                                  fishmask: θ fixed; accumulate Σ g² (gradients dropped, no step)
    at phase1_steps               K entries: top |θ − θ₀| (lt-sft) or top Σ g² (fishmask);
                                  θ ← θ₀ bit for bit; SFT ``name`` added with those K entries
    .. phase1_steps+phase2_steps  only the K values train (new AdamW: state for K entries;
                                  the old optimizer and its dense state are dropped);
                                  optional L1 pull of φ toward 0 (toward θ₀)

The task module trains over frozen language SFTs (or adapters): ``Stack(src_sft, task_sft)``
in phase 2 and θ + φ_src in phase 1. Several source languages (``train_mode="own"``): a
batch mixing languages runs one forward per setup (language) and concatenates the logits,
so each example is under its own language's SFT and the loss is the whole batch's.

Resuming a run from a checkpoint taken after the phase switch is not supported (the load
refuses the SFT's keys), and runs use one device: the values are created at the switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch

from xlpeft.core.composition import Setup
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.base import mean_pool
from xlpeft.lightning.mlm import MaskedLMAdaptation
from xlpeft.lightning.task import EvalMode, TaskAdaptation, TaskKind, TrainMode
from xlpeft.methods.sft import SupportConfig
from xlpeft.ops import sft_select

Selection = Literal["lt-sft", "fishmask"]
SELECTIONS = get_args(Selection)


class SFTPhases:
    """The two phases shared by the language and task modules (a mixin over ``AdapterModule``)."""

    def init_phases(self, name: str, support: dict | None, selection: str, phase1_steps: int,
                    phase2_steps: int, l1: float) -> None:
        if selection not in SELECTIONS:
            raise XlpeftValueError(f"`selection` can be {', '.join(map(repr, SELECTIONS))}; got {selection!r}")
        for key, value in (("phase1_steps", phase1_steps), ("phase2_steps", phase2_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise XlpeftValueError(f"`{key}` can be a positive number of optimizer steps; got {value!r}")
        if not l1 >= 0:
            raise XlpeftValueError(f"`l1` can be ≥ 0 (weight of the mean |φ| pull toward θ₀); got {l1!r}")
        self.sft_name, self.selection, self.l1 = name, selection, float(l1)
        self.phase1_steps, self.phase2_steps = phase1_steps, phase2_steps
        self.support = SupportConfig(**(support or {"like": "madx-language"}))
        self.eligible = sft_select.eligible(self.adapted, self.support)
        self.k = sft_select.budget(self.adapted, self.support, sum(p.numel() for p in self.eligible.values()))
        self.before = sft_select.snapshot(self.eligible) if selection == "lt-sft" else None
        self.fisher = ({n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.eligible.items()}
                       if selection == "fishmask" else None)
        self.switched = False
        for param in self.eligible.values():
            param.requires_grad_(True)

    @property
    def phase(self) -> int:
        return 2 if self.switched else 1

    def check_steps(self) -> None:
        if self.trainer.world_size > 1:  # the SFT's values are made at the switch, after DDP/FSDP wrapped
            raise XlpeftValueError(f"SFT training runs on one device (the K values are created at the phase "
                                   f"switch, after the strategy wrapped the model); got world size "
                                   f"{self.trainer.world_size}. Use devices=1")
        max_steps = self.trainer.max_steps
        if max_steps != self.phase1_steps + self.phase2_steps:
            raise XlpeftValueError(
                f"trainer.max_steps can be phase1_steps + phase2_steps = {self.phase1_steps + self.phase2_steps} "
                f"for an SFT run; got {max_steps}. Set trainer.max_steps to the sum")

    # --------------------------------------------------------------- the switch
    def select(self) -> dict[str, torch.Tensor]:
        """The K entries phase 1 points to (no state changes)."""
        if self.selection == "lt-sft":
            return sft_select.lt_sft_indices(self.adapted, self.before, self.k)
        return sft_select.top_k(self.fisher, self.k)

    def switch(self) -> None:
        """Select, reset θ, add the SFT and train only its values (a fresh optimizer)."""
        indices = self.select()
        if self.before is not None:
            sft_select.reset(self.adapted, self.before)
        for param in self.eligible.values():
            param.requires_grad_(False)
            param.grad = None
        self.before = self.fisher = None
        self.adapted.add_sft(self.sft_name, indices, selection=self.selection)
        self.adapted.train_adapters(self.sft_name)
        self.switched = True
        self.after_switch()
        if self._trainer is not None:
            self.trainer.strategy.setup_optimizers(self.trainer)  # drops the dense phase-1 state

    def after_switch(self) -> None:
        """Hook: what else changes at the switch (the task module's setups)."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.switched and self.trainer.global_step >= self.phase1_steps:
            self.switch()
        super().on_train_batch_start(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.fisher is not None:  # FishMask: gradients measure, they do not step θ
            for name, param in self.eligible.items():
                if param.grad is not None:
                    self.fisher[name] += param.grad.detach().float() ** 2
                    param.grad = None

    def l1_pull(self) -> torch.Tensor | float:
        if not (self.switched and self.l1):
            return 0.0
        values = [m.values for m in self.adapted.adapter_modules(self.sft_name)]
        return self.l1 * torch.cat([v.reshape(-1) for v in values]).abs().mean()

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise XlpeftValueError("nothing to train: no parameter requires grad")
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total, warm = (self.phase2_steps if self.switched else self.phase1_steps), self.warmup_steps

        def factor(step: int) -> float:  # warm-up and linear decay within each phase
            if warm and step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SparseLanguageFineTuning(SFTPhases, MaskedLMAdaptation):
    """A language SFT by masked LM (LT-SFT or FishMask), one language per run.

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        languages: The one language of the MLM data (under `xlpeft fit` it follows data.languages).
        sft_name: Name of the SFT (default: the language code).
        support: Eligible parameters and K: {count | density | like, include, exclude, layer_norm}
            (default: as many entries as a madx-language adapter has parameters).
        selection: "lt-sft" (top-K |Δθ| after dense phase 1) or "fishmask" (top-K Σ g²).
        phase1_steps: Optimizer steps of phase 1 (dense fine-tuning, or Fisher estimation).
        phase2_steps: Optimizer steps of phase 2 (only the K values train).
        l1: Weight of the L1 pull of the SFT's values toward 0 (mean |φ|) in phase 2.
        lr: Peak learning rate of AdamW (each phase warms up and decays on its own).
        weight_decay: AdamW weight decay (in phase 2 it pulls φ toward 0).
        warmup_steps: Linear warm-up steps at the start of each phase.
    """

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",), sft_name: str = "",
                 support: dict | None = None, selection: Selection = "lt-sft", phase1_steps: int = 100,
                 phase2_steps: int = 100, l1: float = 0.0, lr: float = 5e-5, weight_decay: float = 0.0,
                 warmup_steps: int = 0) -> None:
        if len(list(languages)) != 1:
            raise XlpeftValueError(f"an SFT run trains one language's SFT (one θ is fine-tuned in phase 1); got "
                                   f"languages {list(languages)}. Run once per language")
        super().__init__(backbone, languages=languages, train="head", lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps)
        self.adapted.train_adapters()  # the head calibration super() set up does not train here
        self.init_phases(sft_name or list(languages)[0], support, selection, phase1_steps, phase2_steps, l1)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_steps()

    def batch_setups(self, batch: dict[str, Any]) -> list[Setup] | None:
        return [self.sft_name] * len(batch["langs"]) if self.switched else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.l1_pull()


class SparseTaskFineTuning(SFTPhases, TaskAdaptation):
    """A task SFT (LT-SFT or FishMask) over frozen language SFTs or adapters, plus a dense head.

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        labels: Label names, in the order of the data's label ids.
        task: "seq-cls" (one label per text) or "token-cls" (one label per word).
        task_adapter: Name of the task SFT (e.g. genre).
        source_language: Language the task is trained in.
        language_adapters: Language code -> language SFT (or adapter) folder, loaded frozen.
        eval_mode: "own", "source" or "none" (as in TaskAdaptation).
        train_mode: "source" or "own" (several source languages, each under its own SFT).
        support: Eligible parameters and K: {count | density | like, include, exclude, layer_norm}.
        selection: "lt-sft" or "fishmask".
        phase1_steps: Optimizer steps of phase 1.
        phase2_steps: Optimizer steps of phase 2.
        l1: Weight of the L1 pull of the task SFT's values toward 0 in phase 2.
        dropout: Dropout before the classification head.
        lr: Peak learning rate of AdamW (per phase).
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps at the start of each phase.
    """

    def __init__(self, backbone: str = "embedded", labels: Sequence[str] = (), task: TaskKind = "seq-cls",
                 task_adapter: str = "task", source_language: str = "eng",
                 language_adapters: dict[str, str] | None = None, eval_mode: EvalMode = "own",
                 train_mode: TrainMode = "source", support: dict | None = None, selection: Selection = "lt-sft",
                 phase1_steps: int = 100, phase2_steps: int = 100, l1: float = 0.0, dropout: float = 0.1,
                 lr: float = 5e-5, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        super().__init__(backbone, labels=labels, task=task, task_adapter=task_adapter, adapter="pfeiffer",
                         source_language=source_language, language_adapters=language_adapters,
                         eval_mode=eval_mode, dropout=dropout, lr=lr, weight_decay=weight_decay,
                         warmup_steps=warmup_steps, train_mode=train_mode)
        self.adapted.delete_adapter(task_adapter)  # TaskAdaptation's adapter: the task SFT replaces it
        self.adapted.train_adapters()
        self.init_phases(task_adapter, support, selection, phase1_steps, phase2_steps, l1)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.check_steps()

    def language_setup(self, lang: str, training: bool) -> Setup:
        if self.switched:
            return super().language_setup(lang, training)
        chosen = lang if self.train_mode == "own" and training else self.source_language
        if not training:
            chosen = {"own": lang, "source": self.source_language, "none": None}[self.eval_mode]
        return chosen if chosen in self.adapted.configs else None  # phase 1: θ (+ the language's SFT)

    def setups(self, langs: Sequence[str], training: bool) -> list[Setup | None]:
        if not self.switched:  # no task SFT yet: language dropout starts in phase 2
            return [self.language_setup(lang, training) for lang in langs]
        return super().setups(langs, training)

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        """One forward per distinct setup of the batch, logits back in batch order."""
        setups = self.setups(batch["langs"], self.training)
        groups: dict[Any, list[int]] = {}
        for i, setup in enumerate(setups):
            groups.setdefault(setup, []).append(i)
        parts, order = [], []
        for setup, rows in groups.items():
            index = torch.tensor(rows, device=batch["input_ids"].device)
            out = self.adapted(input_ids=batch["input_ids"].index_select(0, index),
                               attention_mask=batch["attention_mask"].index_select(0, index),
                               adapters=setup if setup is not None else None)
            hidden = out.last_hidden_state
            if self.task == "seq-cls":
                hidden = mean_pool(hidden, batch["attention_mask"].index_select(0, index))
            parts.append(self.head(hidden))
            order += rows
        logits = torch.cat(parts)
        inverse = torch.argsort(torch.tensor(order, device=logits.device))
        return logits.index_select(0, inverse)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + self.l1_pull()

