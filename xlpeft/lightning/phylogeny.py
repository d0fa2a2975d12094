"""Phylogeny-inspired hierarchical language adapters: family → genus → language, trained jointly.

Faisal & Anastasopoulos 2022, "Phylogeny-Inspired Adaptation of Multilingual
Models to New Languages" (AACL, arXiv:2205.09634); the same tree-of-adapters
idea as Chronopoulou, Peters & Dodge 2022, "Efficient Hierarchical Domain
Adaptation for Pretrained Language Models" (NAACL, arXiv:2112.08786).

The tree is URIEL's lineage (``xlpeft.typology.lineage``: root first); its
first ``levels`` nodes get one adapter each, shared by every language below:

    eng ─► Stack(family_Indo-European, genus_Germanic, eng)
    deu ─► Stack(family_Indo-European, genus_Germanic, deu)
    spa ─► Stack(family_Indo-European, genus_Italic,   spa)
    nld (no text) ─► Stack(family_Indo-European, genus_Germanic)     zero-text: the path alone

Each example is routed to its own path (per-example ``Stack`` routing in the
core), so one batch updates every adapter on the paths of its languages and
nothing else; a family adapter learns from all its languages' text. At
inference the path is stacked; a language without an adapter of its own
(``eval_languages``) runs the part of its path that was trained. Lines of
held-out languages in a training batch are dropped there, so they are never
trained on (``MLMDataModule`` lists them only so that they are validated).

``PhylogenyTask`` is MAD-X's task step over the tree: the task adapter trains
under ``Stack(family, genus, source, task)`` and a target runs under its own
path (``Stack(family, genus, task)`` for a zero-text language).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from xlpeft.core.composition import Setup, Stack
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.mlm import MaskedLMAdaptation, language_sums, trained_rows
from xlpeft.lightning.task import TaskAdaptation

LEVEL_NAMES = ("family", "genus")
"""Adapter-name prefixes of the first tree levels; deeper levels are ``clade<k>``."""


def node_adapter(level: int, node: str) -> str:
    """Adapter name of a lineage node: ``family_Indo-European``, ``genus_Narrow_Bantu`` …"""
    prefix = LEVEL_NAMES[level] if level < len(LEVEL_NAMES) else f"clade{level}"
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z-]+', '_', node).strip('_')}"


def lineage_path(lang: str, levels: int) -> list[str]:
    """The adapter names of ``lang``'s first ``levels`` lineage nodes, root first."""
    from xlpeft.typology import lineage

    nodes = lineage(lang)
    if not nodes:
        raise XlpeftKeyError(f"URIEL has no lineage for {lang!r}, so it has no family/genus adapters; use a code "
                             "URIEL knows (ISO 639-3, e.g. 'swh') or train it as a plain MAD-X language adapter")
    return [node_adapter(k, node) for k, node in enumerate(nodes[:levels])]


def check_levels(levels: Any) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise XlpeftValueError(f"`levels` can be an int >= 1 (1 = family, 2 = family + genus); got {levels!r}")
    return levels


class PhylogenyMLM(MaskedLMAdaptation):
    """Family, genus and language adapters trained jointly by masked LM, each example on its path.

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        languages: Training languages: each gets its own adapter under its family/genus adapters.
        eval_languages: Held-out languages: validated through their family/genus adapters alone.
        levels: Lineage levels with adapters (1 = family, 2 = family + genus, ...).
        adapter: Preset name or config dict of each language adapter.
        tree_adapter: Preset name or config dict of each family/genus adapter (null = as `adapter`).
        language_adapters: Train per-language adapters under the path (false: the path alone).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    generated_adapters = True  # the base class adds none: the tree's adapters are added here

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = ("eng",),
                 eval_languages: Sequence[str] = (), levels: int = 2, adapter: str | dict = "madx-language",
                 tree_adapter: str | dict | None = None, language_adapters: bool = True, lr: float = 1e-4,
                 weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        if not list(languages):
            raise XlpeftValueError("`languages` can be one or more training language codes; got []")
        levels = check_levels(levels)
        overlap = sorted(set(languages) & set(eval_languages))
        if overlap:
            raise XlpeftValueError(f"`eval_languages` can be languages not trained on; got {overlap} in both. "
                                   "Drop them from one list")
        paths = {lang: lineage_path(lang, levels) for lang in [*languages, *eval_languages]}
        super().__init__(backbone, languages=(), lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.save_hyperparameters()
        self.languages, self.eval_languages = list(languages), list(eval_languages)
        self.paths = paths
        self.own = language_adapters
        trained = list(dict.fromkeys(n for lang in self.languages for n in paths[lang]))
        for name in trained:
            self.adapted.add_adapter(name, tree_adapter if tree_adapter is not None else adapter)
        if language_adapters:
            for lang in self.languages:
                self.adapted.add_adapter(lang, adapter)
            trained += self.languages
        self.adapted.train_adapters(*trained)
        self.use_adapters = True
        self.sums = language_sums(sorted(set(self.languages) | set(self.eval_languages)))

    def setup_for(self, lang: str) -> Setup:
        """``lang``'s path as a Stack: its trained tree adapters, then its own adapter when it has one."""
        path = self.paths.get(lang)
        if path is None:
            path = self.paths[lang] = lineage_path(lang, self.hparams.levels)
        parts = [n for n in path if n in self.adapted.configs]
        if lang in self.adapted.configs:
            parts.append(lang)
        if not parts:
            raise XlpeftKeyError(
                f"no adapter on the path of {lang!r} ({' → '.join(path)}): no training language shares its family; "
                f"tree adapters: {', '.join(n for n in self.adapted.adapter_names if n not in self.languages)}")
        return parts[0] if len(parts) == 1 else Stack(*parts)

    def setups(self, langs: Sequence[str]) -> list[Setup]:
        """Per-example routing: each example to its lineage path."""
        return [self.setup_for(lang) for lang in langs]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        batch = trained_rows(batch, self.languages)  # held-out (and untrained) languages never train
        return None if batch is None else super().training_step(batch, batch_idx)


class PhylogenyTask(TaskAdaptation):
    """A task adapter over frozen lineage-path adapters (``PhylogenyMLM``'s exports).

    Takes ``TaskAdaptation``'s arguments; ``language_adapters`` holds the family/genus adapters
    (``family_…``, ``genus_…``) and the language adapters, by name. ``levels``: the tree levels
    the paths use (as in ``PhylogenyMLM``).
    """

    def __init__(self, *args: Any, levels: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.levels = check_levels(levels)
        self.hparams["levels"] = levels

    def path(self, lang: str) -> list[str]:
        """``lang``'s loaded tree adapters, root first, then its own adapter when loaded."""
        parts = [n for n in lineage_path(lang, self.levels) if n in self.adapted.configs]
        return parts + ([lang] if lang in self.adapted.configs and lang != self.task_adapter else [])

    def language_setup(self, lang: str, training: bool) -> Setup:
        """``Stack(*path, task)`` of the example's language (own), the source's (source), or the task alone."""
        if not training and lang in self.eval_setups:
            return self.eval_setups[lang]
        mode = self.train_mode if training else self.eval_mode
        chosen = {"own": lang, "source": self.source_language, "none": None}[mode]
        parts = self.path(chosen) if chosen is not None else []
        return Stack(*parts, self.task_adapter) if parts else self.task_adapter
