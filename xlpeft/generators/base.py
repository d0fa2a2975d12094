"""Generator-backed adapters: ordinary named bottleneck adapters whose weights
come from one shared, typology-conditioned generator module.

    typology(lang) ─► generator ─► {slot: (down W, b, up W, b)}   once per forward per language
                                       │
    model.points[encoder-3-ffn].adapters["swh"] = GeneratedBottleneck(view of slot 3)

Each language is a *named* adapter (``GeneratedConfig``), so per-example
routing, ``Stack("swh", "genre")`` and ``average_adapters`` of materialised
copies work unchanged. The generator is the adapter's shared module (like the
invertible coupling), registered under every language it serves, so
``train_adapters("swh")`` trains it. Generated weights are computed once
per language per forward and shared by all its slots: a slot asking again
means a new forward, so any parameter change between forwards is seen —
optimizer steps, loads, and ``p.data`` writes (EMA/SWA), which bump no
version counter. Generation costs about one adapter's weights (measured in
README), so a per-forward cache is cheaper than checking parameters.

A generated adapter is *materialised* into a normal bottleneck adapter
directory (``xlpeft.ops.files`` format) for any code lang2vec knows, with no text in
that language.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.errors import XlpeftValueError
from xlpeft.methods._layers import activation
from xlpeft.methods.base import AdapterConfig, Dims, Site, check_choice, check_positive, register_method
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.typology import DEFAULT_FEATURES, MISSING, complete_vector, uriel_code

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""Per slot stacked: down weight (S, w, h), down bias (S, w), up weight (S, h, w), up bias (S, h)."""


@dataclass(frozen=True)
class GeneratorConfig:
    """What every generator shares: its typology input and the adapters it emits."""

    features: str = DEFAULT_FEATURES
    """lang2vec feature sets of the typology input (``+`` concatenates)."""
    missing: str = "knn"
    """Unknown feature values: ``knn`` imputes from the kNN sets, ``zero`` fills 0 (see typology)."""
    language_dim: int = 32
    """Size of the language embedding the typology MLP outputs."""
    typology_hidden: int = 128
    """Width of the typology MLP's hidden layer."""
    reduction_factor: float = 16
    """Emitted bottleneck width is ``hidden / reduction_factor``."""
    non_linearity: str = "relu"
    """Non-linearity of the emitted bottleneck adapters."""
    placement: tuple[str, ...] = ("ffn",)
    """Sublayers the emitted adapters sit at (``attn``, ``ffn``)."""
    leave_out: tuple[int, ...] = ()
    """Block indices without adapters."""
    seed: int = 0
    """Seed of the generator's initialisation (equal seeds, equal generators)."""

    def __post_init__(self) -> None:
        check_choice("missing", self.missing, MISSING)
        check_positive("language_dim", self.language_dim)
        check_positive("typology_hidden", self.typology_hidden)
        self.adapter_config()  # checks reduction_factor, non_linearity, placement

    def adapter_config(self) -> BottleneckConfig:
        """The static adapter a generated one equals (what ``materialise`` writes)."""
        return BottleneckConfig(reduction_factor=self.reduction_factor, non_linearity=self.non_linearity,
                                placement=tuple(self.placement), leave_out=tuple(self.leave_out),
                                stacks=("encoder",))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


class TypologyEncoder(nn.Module):
    """Typology vector ─► small MLP ─► language embedding λ (any code URIEL knows)."""

    def __init__(self, config: GeneratorConfig, n_features: int) -> None:
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(n_features, config.typology_hidden), nn.ReLU(),
                                 nn.Linear(config.typology_hidden, config.language_dim))
        self._inputs: dict[str, torch.Tensor] = {}

    def vector(self, language: str) -> torch.Tensor:
        """The (imputed) typology vector of ``language``, cached per language and device."""
        ref = self.mlp[0].weight
        hit = self._inputs.get(language)
        if hit is None or hit.device != ref.device or hit.dtype != ref.dtype:
            vec = complete_vector(language, self.config.features, self.config.missing)
            hit = torch.tensor(vec.copy(), dtype=ref.dtype, device=ref.device)
            self._inputs[language] = hit
        return hit

    def forward(self, language: str) -> torch.Tensor:
        return self.mlp(self.vector(language))


class AdapterGenerator(nn.Module):
    """Base of the generators: slots, per-language cache, attach and materialise."""

    kind: ClassVar[str] = ""

    def __init__(self, config: GeneratorConfig, hidden: int, slots: list[str],
                 backbone: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not slots:
            raise XlpeftValueError("a generator needs at least one slot (adapter place); got none")
        self.config = config
        self.hidden = hidden
        self.width = max(1, int(hidden // config.reduction_factor))
        self.slots = list(slots)
        self.slot_index = {s: i for i, s in enumerate(self.slots)}
        self.backbone = dict(backbone or {})
        self.typology = TypologyEncoder(config, len(complete_vector("eng", config.features, config.missing)))
        self._cache: dict[tuple[str, str], tuple[tuple, Weights, list[torch.Tensor]]] = {}
        self._live: dict[tuple[str, str], tuple[tuple, Weights, set[int]]] = {}  # this forward's

    @classmethod
    def for_model(cls, model: AdaptedModel, config: GeneratorConfig) -> AdapterGenerator:
        """A generator emitting adapters for every place ``config``'s adapters take on ``model``."""
        slots = [p.key for site in config.adapter_config().sites() for p in model.backbone.places(site)]
        with torch.random.fork_rng(devices=[]):  # deterministic by config, global RNG untouched
            torch.manual_seed(config.seed)
            gen = cls(config, model.backbone.hidden, slots, model.backbone_info())
        ref = next(model.model.parameters())
        return gen.to(device=ref.device, dtype=ref.dtype)

    # ------------------------------------------------------------------ weights
    def _generate(self, language: str, task: str) -> Weights:
        raise NotImplementedError

    def check_task(self, task: str) -> None:
        """Generators without task embeddings accept only ``task=""``."""
        if task:
            raise XlpeftValueError(f"`task` can be '' for a {self.kind} generator; got {task!r}")

    def _stamp(self) -> tuple:
        ref = next(self.parameters())
        return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), ref.device, ref.dtype,
                tuple((p._version, p.data_ptr()) for p in self.parameters()))

    def weights(self, language: str, task: str = "", slot: int | None = None) -> Weights:
        """All slots' weights for ``language`` (and ``task``).

        ``slot`` (a forward's call from one slot): reused by the other slots of the
        same forward; a slot that already read this entry starts a new forward and
        regenerates. Without ``slot`` (direct calls, materialising): reused while
        the parameters are unchanged, compared by value (``.data`` writes included).
        """
        key, stamp = (language, task), self._stamp()
        if slot is not None:
            hit = self._live.get(key)
            if hit is not None and hit[0] == stamp and slot not in hit[2]:
                hit[2].add(slot)
                return hit[1]
            out = self._fresh(language, task)
            self._live[key] = (stamp, out, {slot})
            return out
        hit = self._cache.get(key)
        if hit is not None and hit[0] == stamp and self._unchanged(hit[2]):
            return hit[1]
        out = self._fresh(language, task)
        self._cache[key] = (stamp, out, [p.detach().clone() for p in self.parameters()])
        return out

    def _unchanged(self, snapshot: list[torch.Tensor]) -> bool:
        return all(torch.equal(p.detach(), q) for p, q in zip(self.parameters(), snapshot, strict=True))

    def _fresh(self, language: str, task: str) -> Weights:
        self.check_task(task)
        out = self._generate(uriel_code(language), task)
        if out[0].requires_grad:  # backward frees the graph: drop the entry (and its memory) then
            key = (language, task)
            for t in out:
                t.register_hook(lambda grad, key=key: self._forget(key))
        return out

    def _forget(self, key: tuple[str, str]) -> None:
        self._live.pop(key, None)
        self._cache.pop(key, None)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._live.clear()

    def slot_weights(self, language: str, slot: str, task: str = "") -> dict[str, torch.Tensor]:
        """One slot's weights as a bottleneck state dict (``down.weight`` …)."""
        i = self.slot_index[slot]
        dw, db, uw, ub = self.weights(language, task)
        return {"down.weight": dw[i], "down.bias": db[i], "up.weight": uw[i], "up.bias": ub[i]}

    # ------------------------------------------------------------------ adapters
    def attach(self, model: AdaptedModel, language: str, task: str = "", name: str | None = None) -> str:
        """Add ``language`` (and ``task``) to ``model`` as a named generator-backed adapter."""
        self.check_task(task)
        uriel_code(language)  # unknown codes fail before anything is added
        name = name or (f"{language}_{task}" if task else language)
        model.add_adapter(name, GeneratedConfig(language=language, task=task, generator=self))
        return name

    @torch.no_grad()
    def materialise(self, language: str, path: str | Path, task: str = "", name: str | None = None) -> Path:
        """Write the generated adapter as an ordinary bottleneck adapter directory."""
        from xlpeft.ops.files import FORMAT_VERSION, write_directory

        self.check_task(task)
        tensors = {f"{slot}.{k}": v.detach().float().contiguous().cpu()
                   for slot in self.slots for k, v in self.slot_weights(language, slot, task).items()}
        meta = {"xlpeft_format": FORMAT_VERSION, "name": name or language,
                "config": self.config.adapter_config().to_dict(), "backbone": self.backbone,
                "generated": {"generator": self.kind, "language": language, "uriel": uriel_code(language),
                              "task": task, "generator_config": self.config.to_dict()}}
        return write_directory(path, meta, tensors)

    def adapter_parameters(self) -> int:
        """Parameters of one emitted adapter (for comparing with the generator's size)."""
        return len(self.slots) * (2 * self.hidden * self.width + self.hidden + self.width)


def init_normal(*shape: int, fan_in: int) -> nn.Parameter:
    """A parameter drawn like a linear layer's weight (std 1/sqrt(fan_in))."""
    return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


@register_method
@dataclass(frozen=True)
class GeneratedConfig(AdapterConfig):
    """A language's adapter whose weights a shared generator emits (not loadable alone)."""

    method: ClassVar[str] = "generated"
    language: str = ""
    """Code the adapter is generated for (card code, alias or URIEL code)."""
    task: str = ""
    """Task embedding to condition on (Hyper-X); empty for language-only generators."""
    generator: AdapterGenerator | str | None = field(default=None, compare=False, repr=False)
    """The generator module, shared by every language it serves (its kind, in files)."""

    def __post_init__(self) -> None:
        if not isinstance(self.generator, AdapterGenerator):  # e.g. rebuilt from a saved dict
            raise XlpeftValueError(
                f"`generator` can be an AdapterGenerator; got {type(self.generator).__name__}. A generated "
                f"adapter ({self.language!r}) holds no weights of its own: load its generator with "
                "load_generator(path, model) and call generator.attach(model, language), or load the "
                "directory generator.materialise(language, path) wrote")

    def sites(self) -> list[Site]:
        return self.generator.config.adapter_config().sites()

    def build_shared(self, dims: Dims) -> nn.Module:
        return self.generator

    def build(self, site: Site, dims: Dims, shared: nn.Module | None = None) -> nn.Module:
        slot = f"{dims.stack}.{dims.layer}.{site.role}"
        if slot not in self.generator.slot_index:
            raise XlpeftValueError(f"the generator has no slot {slot!r}; it was built for another backbone "
                                   f"(slots {self.generator.slots[:3]} …): build one with for_model(model)")
        return GeneratedBottleneck(self.generator, self.language, self.task, slot)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "language": self.language, "task": self.task,
                "generator": self.generator.kind}


class GeneratedBottleneck(nn.Module):
    """A bottleneck adapter at one slot reading its weights from the generator."""

    needs_input = False
    has_input_transform = False
    post_norm = False

    def __init__(self, generator: AdapterGenerator, language: str, task: str, slot: str) -> None:
        super().__init__()
        object.__setattr__(self, "generator", generator)  # a reference, not a child
        self.language, self.task = language, task
        self.index = generator.slot_index[slot]
        self.act = activation(generator.config.non_linearity)

    def forward(self, x: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
        i = self.index
        dw, db, uw, ub = self.generator.weights(self.language, self.task, slot=i)
        return h + F.linear(self.act(F.linear(h, dw[i], db[i])), uw[i], ub[i])
