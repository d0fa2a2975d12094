"""The stages of the zero-shot harness (:mod:`xlpeft.lightning.transfer`), each cached or cheap.

* :func:`language_adapters` — trained by routed MLM (one run for every language), or
  *generated* by a MAD-G generator trained on other languages only (a target's text
  is never seen), written as ordinary adapter folders;
* :func:`genre_sets` — the source's training passages and every language's test
  passages, the same passages in each language (a user's own Bible included);
* :func:`train_task` — a genre task adapter under ``Stack(source, task)``;
* :func:`predict` — per-example predictions under one setup, test-time adaptation
  (``uniform`` ensemble, ``emea``) included.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from xlpeft.errors import XlpeftValueError

if TYPE_CHECKING:
    from xlpeft.lightning.transfer import EvalConfig, Recipe

__all__ = ["SETUPS", "cache_key", "genre_sets", "language_adapters", "predict", "train_task", "typology_setup"]

SETUPS = ("none", "source", "own", "typology", "uniform", "emea")
"""Setups a target can be evaluated under: the task adapter alone; under the source's language
adapter; under its own; under a typology-weighted ``Average`` of the *other* language adapters;
under their uniform ensemble; under EMEA (that ensemble with per-layer weights fitted per test
batch by entropy minimisation, Wang et al. 2021)."""


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def trainer(steps: int, root: Path, **kwargs: Any):
    import lightning as L

    from xlpeft.lightning.progress import progress_callbacks
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                     callbacks=progress_callbacks() + kwargs.pop("callbacks", []), default_root_dir=str(root),
                     **kwargs)


def _cache_dir(cfg: EvalConfig) -> Path:
    return Path(cfg.cache) if cfg.cache else Path(cfg.out) / "cache"


def language_adapters(cfg: EvalConfig, recipe: Recipe, backbone: str) -> Path:
    """Train, generate or reuse the recipe's language adapters; returns their folder (one per language)."""
    langs = [cfg.source, *cfg.targets, *(x for x in cfg.extra_languages if x not in cfg.targets)]
    parts = (backbone, recipe.adapter, recipe.adapter_steps, langs, cfg.lines_per_language, cfg.lr_adapters,
             sorted(cfg.texts.items()))
    if recipe.generator:
        parts += (recipe.generator, recipe.generator_config, list(recipe.generator_languages))
    folder = _cache_dir(cfg) / f"lang-{cache_key(*parts)}"
    if all((folder / lang / "adapter_config.json").is_file() for lang in langs):
        return folder
    if recipe.generator:
        return _generated(cfg, recipe, backbone, langs, folder)
    import lightning as L

    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    print(f"[transfer] language adapters {langs} ({recipe.adapter_steps} steps, {recipe.name})", flush=True)
    L.seed_everything(0, verbose=False)
    module = MaskedLMAdaptation(backbone, languages=langs, adapter=recipe.adapter, lr=cfg.lr_adapters,
                                warmup_steps=20)
    data = MLMDataModule(langs, backbone=backbone, files=dict(cfg.texts), batch_size=cfg.batch_size,
                         max_length=64, max_train_lines=cfg.lines_per_language, temperature=1e9, seed=0)
    trainer(recipe.adapter_steps, folder.parent).fit(module, data)
    module.export_adapters(folder)
    return folder


def _generated(cfg: EvalConfig, recipe: Recipe, backbone: str, langs: list[str], folder: Path) -> Path:
    """MAD-G: a generator trained by MLM on ``generator_languages`` writes every language's adapter."""
    import lightning as L

    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.generator import GeneratorMLM
    train_langs = list(recipe.generator_languages)
    seen = sorted(set(train_langs) & set(cfg.targets))
    if seen:
        raise XlpeftValueError(f"`generator_languages` can hold no target (a generated target adapter must "
                               f"not have seen its text); got {seen}")
    print(f"[transfer] MAD-G generator on {train_langs} ({recipe.adapter_steps} steps, {recipe.name})", flush=True)
    L.seed_everything(0, verbose=False)
    module = GeneratorMLM(backbone, languages=train_langs, generator=recipe.generator,
                          generator_config=dict(recipe.generator_config), lr=cfg.lr_adapters, warmup_steps=20)
    data = MLMDataModule(train_langs, backbone=backbone, files={k: v for k, v in cfg.texts.items() if k in train_langs},
                         batch_size=cfg.batch_size, max_length=64, max_train_lines=cfg.lines_per_language,
                         temperature=1e9, seed=0)
    trainer(recipe.adapter_steps, folder.parent).fit(module, data)
    for lang in langs:
        module.generator.materialise(lang, folder / lang, name=lang)
    return folder


def genre_sets(cfg: EvalConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The source training set and every language's test set (the same passages in each)."""
    from xlpeft.data.bible_files import read_bible
    from xlpeft.data.datamodules import tokenize
    from xlpeft.data.genre import GENRES, genre_examples

    label_of = {g: i for i, g in enumerate(GENRES)}
    own_bibles = {lang: read_bible(path) for lang, path in cfg.bibles.items()}

    def dataset(lang: str, split: str, per_genre: int | None) -> Any:
        rows = genre_examples(lang, split, max_per_genre=per_genre, seed=0, passage=cfg.passage,
                              verses=own_bibles.get(lang))
        if not rows:
            raise XlpeftValueError(f"{lang}: no {split} passages (its Bible lacks every {split} chapter); "
                                   "the split is by chapter, see xlpeft.data.bible.chapter_split")
        return tokenize(tokenizer, [r["text"] for r in rows], [lang] * len(rows), cfg.max_length,
                        extra={"label": [label_of[r["label"]] for r in rows],
                               "key": [f"{r['book']}:{r['chapter']}:{r['verse']}" for r in rows]})
    train = dataset(cfg.source, "train", cfg.per_genre)
    tests = {lang: dataset(lang, "test", cfg.eval_per_genre) for lang in [cfg.source, *cfg.targets]}
    common = set.intersection(*(set(t["key"]) for t in tests.values()))  # paired: same passages
    tests = {lang: t.filter(lambda row: row["key"] in common) for lang, t in tests.items()}
    return train.remove_columns(["key"]), {lang: t.remove_columns(["key"]) for lang, t in tests.items()}


def train_task(cfg: EvalConfig, recipe: Recipe, backbone: str, lang_dir: Path, train: Any, seed: int) -> Any:
    """A genre task adapter under Stack(source, task), with the recipe's task-time options."""
    import lightning as L
    from torch.utils.data import DataLoader

    from xlpeft.data.collators import ClassificationCollator
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.task import TaskAdaptation

    L.seed_everything(seed, verbose=False)
    adapters = {p.name: str(p) for p in sorted(lang_dir.iterdir()) if (p / "adapter_config.json").is_file()}
    module = TaskAdaptation(backbone, labels=GENRES, task_adapter="genre", adapter=recipe.task_adapter,
                            source_language=cfg.source, language_adapters=adapters, lr=cfg.lr_task,
                            warmup_steps=20, language_dropout=recipe.language_dropout,
                            language_leave_out=recipe.leave_out)
    pad = module.adapted.model.config.pad_token_id or 0
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=ClassificationCollator(pad_id=pad),
                        generator=torch.Generator().manual_seed(seed))
    trainer(recipe.task_steps, _cache_dir(cfg)).fit(module, train_dataloaders=loader)
    return module


def typology_setup(module: Any, lang: str) -> Any:
    """``Stack(Average(others, typology weights), task)`` for ``lang`` (its own adapter excluded)."""
    from xlpeft.core.composition import Average, Stack
    from xlpeft.generators.averaging import typology_weights

    weights = typology_weights(lang, _others(module, lang))
    return Stack(Average(*weights, weights=list(weights.values())), module.task_adapter)


def _others(module: Any, lang: str) -> list[str]:
    """Every language adapter of ``module`` but ``lang``'s own."""
    return [n for n in module.language_adapter_names() if n != lang]


@torch.no_grad()
def predict(module: Any, data: Any, setup: str, batch_size: int, emea_steps: int = 10) -> np.ndarray:
    """Per-example predicted label ids under ``setup`` (one of :data:`SETUPS`), in dataset order."""
    from torch.utils.data import DataLoader

    from xlpeft.data.collators import ClassificationCollator

    if setup not in SETUPS:
        raise XlpeftValueError(f"`setup` can be {', '.join(SETUPS)}; got {setup!r}")
    pad = module.adapted.model.config.pad_token_id or 0
    langs = sorted(set(data["lang"]))
    module.eval()
    module.eval_setups = {}
    if setup in ("uniform", "emea"):
        if len(langs) != 1:
            raise XlpeftValueError(f"test-time adaptation predicts one language at a time; got {langs}")
        return _predict_adapted(module, data, setup, batch_size, emea_steps, pad, langs[0])
    module.eval_mode = "own" if setup == "typology" else setup
    if setup == "typology":
        module.eval_setups = {lang: typology_setup(module, lang) for lang in langs}
    try:
        loader = DataLoader(data, batch_size=batch_size, collate_fn=ClassificationCollator(pad_id=pad))
        return torch.cat([module.predict_step(b, i)["preds"].cpu() for i, b in enumerate(loader)]).numpy()
    finally:
        module.eval_setups = {}


def _predict_adapted(module: Any, data: Any, method: str, batch_size: int, steps: int, pad: int,
                     lang: str) -> np.ndarray:
    """Predictions through :class:`~xlpeft.lightning.tta.TestTimeAdaptation` (Lightning's predict loop)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from xlpeft.data.collators import ClassificationCollator
    from xlpeft.lightning.tta import TestTimeAdaptation

    others = _others(module, lang)
    tta = TestTimeAdaptation(method=method, steps=steps if method == "emea" else 0, candidates=others,
                             top_k=len(others), track_entropy=False)
    loader = DataLoader(data, batch_size=batch_size, collate_fn=ClassificationCollator(pad_id=pad))
    out = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_model_summary=False, enable_progress_bar=False, callbacks=[tta]).predict(module, loader)
    return torch.cat([o["preds"].cpu() for o in out]).numpy()
