"""Zero-shot transfer evaluation: a language × setup table with paired bootstrap 95 % CIs.

Used by ``xlpeft demo`` and ``scripts/transfer_eval.py`` (its CLI and ablation rows).

1. a prepared backbone (the demo's converted, trimmed, head-calibrated e5; cached);
2. language adapters for the source and every target (MLM, one routed run; cached
   per recipe under ``<out>/cache``);
3. a genre task adapter trained under ``Stack(source, task)`` for each seed;
4. per-example predictions for each target under each setup: ``none`` (task
   adapter alone), ``source`` (the English adapter), ``own`` (the target's);
5. accuracy per cell with a paired bootstrap 95 % CI over examples (and seeds:
   each resample draws the same example indices in every seed and setup), Δ(own −
   source) and Δ(source − none) with CIs, confusion counts; JSON + Markdown + PNG.

The source language is reported as ``source (in-language)``, never as zero-shot.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlpeft.lightning.report import SETUPS
from xlpeft.lightning.report import transfer_markdown as markdown
from xlpeft.lightning.report import transfer_plot as plot
from xlpeft.stats import bootstrap_ci, confusion, paired_delta

__all__ = ["SETUPS", "EvalConfig", "Recipe", "evaluate_recipe", "markdown", "plot", "predict", "run",
           "typology_setup"]


@dataclass
class Recipe:
    """One configuration of the MAD-X pipeline (a row of the ablation)."""

    name: str = "default"
    adapter: Any = "madx-language"
    """Language adapter: a preset name or a config dict (``AdapterConfig.to_dict``)."""
    task_adapter: Any = "pfeiffer"
    """Task adapter config; it must sit where the language adapter sits (same placement)."""
    adapter_steps: int = 300
    leave_out: tuple[int, ...] = ()
    """Blocks whose language adapter is dropped at task time (MAD-X 2.0: ``(-1,)``)."""
    task_steps: int = 200
    language_dropout: float = 0.0
    """Probability a training example runs the task adapter without its language adapter."""


@dataclass
class EvalConfig:
    """Everything the harness needs; sizes chosen for 2 CPU cores."""

    out: str = "runs/transfer-eval"
    backbone: str | None = None
    """A prepared backbone folder; None prepares the demo's (cached)."""
    source: str = "eng"
    targets: tuple[str, ...] = ("swh", "tgl")
    passage: int = 6
    """Verses per genre example (1 = the single-verse task)."""
    max_length: int = 128
    per_genre: int = 200
    eval_per_genre: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 16
    lr_task: float = 5e-4
    lr_adapters: float = 1e-3
    lines_per_language: int = 2000
    bootstrap: int = 2000
    recipes: list[Recipe] = field(default_factory=lambda: [Recipe()])


# --------------------------------------------------------------------------- stages


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _trainer(steps: int, root: Path):
    import lightning as L

    from xlpeft.lightning.progress import progress_callbacks
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                     callbacks=progress_callbacks(), default_root_dir=str(root))


def language_adapters(cfg: EvalConfig, recipe: Recipe, backbone: str) -> Path:
    """Train (or reuse) the recipe's language adapters; returns their folder."""
    import lightning as L
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation

    langs = [cfg.source, *cfg.targets]
    folder = Path(cfg.out) / "cache" / f"lang-{_key(backbone, recipe.adapter, recipe.adapter_steps, langs, cfg.lines_per_language, cfg.lr_adapters)}"
    if all((folder / lang / "adapter_config.json").is_file() for lang in langs):
        return folder
    print(f"[transfer] language adapters {langs} ({recipe.adapter_steps} steps, {recipe.name})", flush=True)
    L.seed_everything(0, verbose=False)
    module = MaskedLMAdaptation(backbone, languages=langs, adapter=recipe.adapter, lr=cfg.lr_adapters,
                                warmup_steps=20)
    data = MLMDataModule(langs, backbone=backbone, batch_size=cfg.batch_size, max_length=64,
                         max_train_lines=cfg.lines_per_language, temperature=1e9, seed=0)
    _trainer(recipe.adapter_steps, folder.parent).fit(module, data)
    module.export_adapters(folder)
    return folder


def genre_sets(cfg: EvalConfig, tokenizer: Any) -> tuple[Any, dict[str, Any]]:
    """The source training set and every language's test set (same passages in each)."""
    from xlpeft.data.datamodules import tokenize
    from xlpeft.data.genre import GENRES, genre_examples

    label_of = {g: i for i, g in enumerate(GENRES)}

    def dataset(lang: str, split: str, per_genre: int | None) -> Any:
        rows = genre_examples(lang, split, max_per_genre=per_genre, seed=0, passage=cfg.passage)
        return tokenize(tokenizer, [r["text"] for r in rows], [r["lang"] for r in rows], cfg.max_length,
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

    langs = [cfg.source, *cfg.targets]
    L.seed_everything(seed, verbose=False)
    module = TaskAdaptation(backbone, labels=GENRES, task_adapter="genre", adapter=recipe.task_adapter,
                            source_language=cfg.source, language_adapters={l: str(lang_dir / l) for l in langs},
                            lr=cfg.lr_task, warmup_steps=20, language_dropout=recipe.language_dropout,
                            language_leave_out=recipe.leave_out)
    pad = module.adapted.model.config.pad_token_id or 0
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=ClassificationCollator(pad_id=pad),
                        generator=torch.Generator().manual_seed(seed))
    _trainer(recipe.task_steps, Path(cfg.out) / "cache").fit(module, train_dataloaders=loader)
    return module


@torch.no_grad()
def predict(module: Any, data: Any, mode: str, batch_size: int) -> np.ndarray:
    """Per-example predicted label ids under ``eval_mode=mode`` (in dataset order)."""
    from torch.utils.data import DataLoader
    from xlpeft.data.collators import ClassificationCollator

    pad = module.adapted.model.config.pad_token_id or 0
    module.eval()
    module.eval_setups = {}
    if mode == "typology":
        module.eval_mode = "own"
        module.eval_setups = {lang: typology_setup(module, lang) for lang in set(data["lang"])}
    else:
        module.eval_mode = mode
    preds = []
    for i, batch in enumerate(DataLoader(data, batch_size=batch_size, collate_fn=ClassificationCollator(pad_id=pad))):
        preds.append(module.predict_step(batch, i)["preds"].cpu())
    module.eval_setups = {}
    return torch.cat(preds).numpy()


def typology_setup(module: Any, lang: str) -> Any:
    """``Stack(Average(others, typology weights), task)`` for ``lang`` (its own adapter excluded)."""
    from xlpeft.core.composition import Average, Stack
    from xlpeft.generators.averaging import typology_weights

    others = [n for n in module.adapted.configs if n not in (lang, module.task_adapter)]
    weights = typology_weights(lang, others)
    return Stack(Average(*weights, weights=list(weights.values())), module.task_adapter)


# --------------------------------------------------------------------------- statistics


# --------------------------------------------------------------------------- run


def evaluate_recipe(cfg: EvalConfig, recipe: Recipe, backbone: str, train: Any, tests: dict[str, Any],
                    lang_dir: Path | None = None) -> dict:
    """Every language × setup for one recipe, over ``cfg.seeds`` (``lang_dir``: trained adapters to reuse)."""
    from xlpeft.data.genre import GENRES

    lang_dir = lang_dir or language_adapters(cfg, recipe, backbone)
    preds: dict[str, dict[str, list[np.ndarray]]] = {l: {s: [] for s in SETUPS} for l in tests}
    for seed in cfg.seeds:
        t0 = time.time()
        module = train_task(cfg, recipe, backbone, lang_dir, train, seed)
        for lang, data in tests.items():
            for setup in SETUPS:
                preds[lang][setup].append(predict(module, data, setup, cfg.batch_size * 2))
        print(f"[transfer] {recipe.name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    rows = {}
    for lang, data in tests.items():
        gold = np.asarray(data["label"])
        correct = {s: np.stack([p == gold for p in preds[lang][s]]) for s in SETUPS}
        rng_seed = int(_key(lang)[:6], 16)
        cells = {s: dict(zip(("acc", "lo", "hi"), bootstrap_ci(correct[s].astype(float), cfg.bootstrap,
                                                                np.random.default_rng(rng_seed)))) for s in SETUPS}
        rows[lang] = {
            "role": "source (in-language)" if lang == cfg.source else "zero-shot target",
            "examples": int(len(gold)), "seeds": len(cfg.seeds), **cells,
            "own_minus_source": paired_delta(correct["own"], correct["source"], cfg.bootstrap, rng_seed),
            "source_minus_none": paired_delta(correct["source"], correct["none"], cfg.bootstrap, rng_seed),
            "own_minus_none": paired_delta(correct["own"], correct["none"], cfg.bootstrap, rng_seed),
            "typology_minus_none": paired_delta(correct["typology"], correct["none"], cfg.bootstrap, rng_seed),
            "confusion": {s: confusion(gold, preds[lang][s][0], len(GENRES)) for s in SETUPS},
            "gold": gold.tolist(),
            "predictions": {s: [p.tolist() for p in preds[lang][s]] for s in SETUPS},  # per seed
            "majority_class_share": {s: float(np.bincount(preds[lang][s][0], minlength=len(GENRES)).max()
                                              / len(gold)) for s in SETUPS},
        }
    return {"recipe": asdict(recipe), "languages": rows}


def run(cfg: EvalConfig, lang_dir: Path | None = None, quiet: bool = False) -> dict:
    """Evaluate every recipe of ``cfg``; writes transfer.json/.md/.png to ``cfg.out``."""
    from xlpeft.data.datamodules import load_tokenizer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = cfg.backbone
    if backbone is None:
        from xlpeft.lightning.demo import DemoConfig, prepare_backbone
        backbone = str(prepare_backbone(DemoConfig(out=str(out / "demo"))))
    train, tests = genre_sets(cfg, load_tokenizer(backbone))
    gold = np.asarray(tests[cfg.source]["label"])
    results: dict[str, Any] = {"config": asdict(cfg), "backbone": backbone, "recipes": [],
                               "majority_share": float(np.bincount(gold).max() / len(gold))}
    for recipe in cfg.recipes:
        results["recipes"].append(evaluate_recipe(cfg, recipe, backbone, train, tests, lang_dir))
        (out / "transfer.json").write_text(json.dumps(results, indent=1))  # partial results survive
        (out / "transfer.md").write_text(markdown(results))
    plot(results, out / "transfer.png")
    if not quiet:
        print(markdown(results))
    return results
