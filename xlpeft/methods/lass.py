"""LaSS: language-specific sub-networks of one shared multilingual model, as index masks.

Lin, Wu, Wang & Li 2021, "Learning Language Specific Sub-network for
Multilingual Machine Translation" (ACL, arXiv:2105.09259).

    shared θ (every targeted Linear weight)
      1. per direction d: fine-tune a copy of θ on d alone ─► θ_d
      2. score each entry (|θ_d| "magnitude", as the paper; or |θ_d − θ| "change")
         and keep the top (1 − prune) share of every weight ─► mask M_d (flat indices)
      3. train the shared θ with W ⊙ M_d in the forward of d's examples:
         only entries inside M_d receive gradient; entries outside the masks of a
         step's directions are left bit-identical (other directions untouched
         where the masks are disjoint)
      4. translate d with W ⊙ M_d

A mask is stored as the flat int64 indices of the entries it keeps, one index
tensor per (direction, weight): the same index layout a sparse fine-tuning uses
for its entries, without values. ``LanguageMasks`` keeps them as buffers, so they
move with the model and travel in checkpoints; dense boolean masks are built
from them on first use per device.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from xlpeft.errors import XlpeftKeyError, XlpeftValueError

Criterion = Literal["magnitude", "change"]
CRITERIA = get_args(Criterion)
DEFAULT_TARGETS = r"(^|\.)(layer|layers|block)\.\d+\."
"""Linear weights inside the encoder/decoder blocks (bert, bart-like and t5-like names); not embeddings or heads."""


@dataclass(frozen=True)
class LassConfig:
    """How language-specific masks are found."""

    prune: float = 0.3
    """Share of every targeted weight pruned from a direction's sub-network, in [0, 1)."""
    criterion: Criterion = "magnitude"
    """Entry score after per-direction fine-tuning: ``magnitude`` |θ_d| (LaSS) or ``change`` |θ_d − θ|."""
    targets: str = DEFAULT_TARGETS
    """Regex over parameter names of ``nn.Linear`` weights that get masks (``re.search``)."""
    search_steps: int = 50
    """Fine-tuning steps per direction while searching its mask."""
    search_lr: float = 1e-4
    """Learning rate (AdamW) of the per-direction fine-tuning."""
    directions: tuple[str, ...] = field(default=())
    """Directions ``src-tgt`` with a sub-network."""

    def __post_init__(self) -> None:
        if isinstance(self.prune, bool) or not isinstance(self.prune, (int, float)) or not 0 <= self.prune < 1:
            raise XlpeftValueError(f"`prune` can be a share in [0, 1) (0.3 = prune 30% of each weight); got {self.prune!r}")
        if self.criterion not in CRITERIA:
            raise XlpeftValueError(f"`criterion` can be {', '.join(map(repr, CRITERIA))}; got {self.criterion!r}")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise XlpeftValueError(f"`targets` can be a regular expression; got {self.targets!r} ({err})") from err
        if isinstance(self.search_steps, bool) or not isinstance(self.search_steps, int) or self.search_steps < 1:
            raise XlpeftValueError(f"`search_steps` can be an int >= 1; got {self.search_steps!r}")
        if not self.directions:
            raise XlpeftValueError("`directions` can be one or more 'src-tgt' directions such as ['spa-nah']; got none")
        if len(set(self.directions)) != len(self.directions):
            raise XlpeftValueError(f"`directions` can name each direction once; got {list(self.directions)}")

    def kept(self, numel: int) -> int:
        """Entries a direction keeps of a weight of ``numel`` entries (at least one)."""
        return max(1, round(numel * (1.0 - self.prune)))


def target_weights(model: nn.Module, pattern: str) -> dict[str, nn.Parameter]:
    """``name → weight`` of every ``nn.Linear`` whose weight name matches ``pattern`` (names as in ``model``)."""
    found = {}
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        full = f"{name}.weight" if name else "weight"
        if isinstance(module, nn.Linear) and re.search(pattern, full) and id(module.weight) not in tied:
            found.setdefault(full, module.weight)
    if not found:
        raise XlpeftValueError(f"LaSS `targets` {pattern!r} matches no nn.Linear weight of this "
                               f"{type(model).__name__}; give a regex over its parameter names")
    return found


def keep_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices (ascending, int64) of the ``k`` highest-scoring entries; ties to the lower index."""
    flat = score.detach().flatten().float()
    order = torch.sort(-flat, stable=True).indices  # stable: equal scores keep index order
    return torch.sort(order[:k]).values.to(torch.int64)


def score(criterion: str, base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor:
    """The entry scores of one weight after a direction's fine-tuning."""
    return tuned.abs() if criterion == "magnitude" else (tuned - base).abs()


class LanguageMasks(nn.Module):
    """One flat index tensor per (direction, weight), as buffers; dense boolean masks on demand."""

    def __init__(self, directions: Sequence[str], shapes: Mapping[str, Sequence[int]],
                 kept: Mapping[str, int]) -> None:
        super().__init__()
        self.directions = list(directions)
        self.weights = list(shapes)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        for d in range(len(self.directions)):
            for w, name in enumerate(self.weights):
                self.register_buffer(self._key(d, w), torch.zeros(kept[name], dtype=torch.int64))
        self.register_buffer("found", torch.zeros((), dtype=torch.bool))
        self._dense: dict[tuple[str, str, torch.device], torch.Tensor] = {}

    @staticmethod
    def _key(d: int, w: int) -> str:
        return f"d{d}_w{w}"

    def _index(self, direction: str) -> int:
        try:
            return self.directions.index(direction)
        except ValueError:
            raise XlpeftKeyError(f"no LaSS sub-network for direction {direction!r}: directions can be "
                                 f"{', '.join(self.directions)}; got {direction!r}. Add it to `directions` and "
                                 "search its mask") from None

    def indices(self, direction: str, weight: str) -> torch.Tensor:
        return getattr(self, self._key(self._index(direction), self.weights.index(weight)))

    def set(self, masks: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Replace every mask (direction → weight → flat indices), checked first: all or nothing."""
        for direction in self.directions:
            got = masks.get(direction)
            if got is None or set(got) != set(self.weights):
                raise XlpeftValueError(f"LaSS masks can give every weight of every direction; {direction!r} "
                                       f"lacks {sorted(set(self.weights) - set(got or {}))[:3]}")
            for name, idx in got.items():
                want, numel = self.indices(direction, name).shape, int(torch.Size(self.shapes[name]).numel())
                if idx.shape != want or idx.dtype != torch.int64 or (idx.numel() and not (
                        0 <= int(idx.min()) and int(idx.max()) < numel and bool((idx[1:] > idx[:-1]).all()))):
                    raise XlpeftValueError(f"LaSS mask {direction}/{name} can be {tuple(want)} ascending int64 "
                                           f"indices below {numel}; got {tuple(idx.shape)} {idx.dtype}")
        with torch.no_grad():
            for direction in self.directions:
                for name, idx in masks[direction].items():
                    self.indices(direction, name).copy_(idx)
            self.found.fill_(True)
        self._dense.clear()

    def as_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {d: {n: self.indices(d, n) for n in self.weights} for d in self.directions}

    def dense(self, direction: str, weight: str, device: torch.device) -> torch.Tensor:
        """The boolean mask of ``weight`` for ``direction`` (cached per device)."""
        key = (direction, weight, device)
        if key not in self._dense:
            mask = torch.zeros(self.shapes[weight], dtype=torch.bool, device=device)
            mask.view(-1)[self.indices(direction, weight).to(device)] = True
            self._dense[key] = mask
        return self._dense[key]

    def union(self, directions: Iterable[str], weight: str, device: torch.device) -> torch.Tensor:
        out = torch.zeros(self.shapes[weight], dtype=torch.bool, device=device)
        for d in directions:
            out |= self.dense(d, weight, device)
        return out

    def overlap(self) -> dict[str, float]:
        """Pairwise share of kept entries two directions have in common (IoU over all weights)."""
        out = {}
        for i, a in enumerate(self.directions):
            for b in self.directions[i + 1:]:
                inter = union = 0
                for name in self.weights:
                    x, y = self.dense(a, name, torch.device("cpu")), self.dense(b, name, torch.device("cpu"))
                    inter += int((x & y).sum())
                    union += int((x | y).sum())
                out[f"{a}|{b}"] = inter / max(1, union)
        return out

    def clear_cache(self) -> None:
        """Forget the dense masks (after the index buffers were loaded in place, e.g. from a checkpoint)."""
        self._dense.clear()
