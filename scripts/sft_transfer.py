"""Zero-shot genre transfer with LT-SFT beside MAD-X, on the same data, seeds and budget.

    MAD-X   language adapters (madx-language-seqbn, MLM)  +  task adapter under Stack(eng, genre)
    LT-SFT  language SFTs (K = |madx-language-seqbn|, MLM)  +  task SFT (K = |pfeiffer-seqbn|) under
            θ + φ_eng in phase 1 and Stack(eng, genre) in phase 2; test: θ + φ_task + φ_target

Both rows use ``xlpeft.lightning.transfer``'s harness: the prepared demo backbone, its
``genre_sets`` (the same test passages in every language), ``predict`` per setup
(``none``: task module alone, ``source``: under the English module, ``own``: under the
target's), and ``xlpeft.stats`` (paired bootstrap 95 % CIs over examples and seeds;
Δ = LT-SFT − MAD-X per setup, paired on the same examples). Usage::

    python scripts/sft_transfer.py [--seeds 0] [--quick] [--out runs/sft-transfer]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from xlpeft.lightning.transfer import EvalConfig, Recipe, predict  # noqa: E402
from xlpeft.lightning.transfer_stages import genre_sets, language_adapters, train_task, trainer  # noqa: E402
from xlpeft.stats import bootstrap_ci, paired_delta  # noqa: E402

SETUPS = ("none", "source", "own")


def language_sfts(cfg: EvalConfig, backbone: str, steps: int, folder: Path) -> Path:
    """One LT-SFT run per language (K as many as a madx-language-seqbn adapter); cached in ``folder``."""
    import lightning as L

    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.sft import SparseLanguageFineTuning

    for lang in (cfg.source, *cfg.targets):
        if (folder / lang / "adapter_config.json").is_file():
            continue
        print(f"[sft] language SFT {lang} ({steps} + {steps} steps)", flush=True)
        L.seed_everything(0, verbose=False)
        module = SparseLanguageFineTuning(backbone, languages=[lang], support={"like": "madx-language-seqbn"},
                                          phase1_steps=steps, phase2_steps=steps, lr=cfg.lr_adapters / 10,
                                          warmup_steps=10)
        data = MLMDataModule([lang], backbone=backbone, batch_size=cfg.batch_size, max_length=64,
                             max_train_lines=cfg.lines_per_language, seed=0)
        trainer(2 * steps, folder.parent).fit(module, data)
        module.export_adapters(folder, [lang])
    return folder


def task_sft(cfg: EvalConfig, backbone: str, sft_dir: Path, train: Any, seed: int, steps: int) -> Any:
    """A genre task SFT over the English language SFT (K as many as a pfeiffer-seqbn adapter)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from xlpeft.data.collators import ClassificationCollator
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.sft import SparseTaskFineTuning

    L.seed_everything(seed, verbose=False)
    sfts = {p.name: str(p) for p in sorted(sft_dir.iterdir()) if (p / "adapter_config.json").is_file()}
    module = SparseTaskFineTuning(backbone, labels=GENRES, task_adapter="genre", source_language=cfg.source,
                                  language_adapters=sfts, support={"like": "pfeiffer-seqbn"},
                                  phase1_steps=steps // 2, phase2_steps=steps - steps // 2, lr=cfg.lr_task / 5,
                                  warmup_steps=10)
    pad = module.adapted.model.config.pad_token_id or 0
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=ClassificationCollator(pad_id=pad),
                        generator=torch.Generator().manual_seed(seed))
    trainer(steps, sft_dir.parent).fit(module, train_dataloaders=loader)
    return module


def cells(correct: dict[str, np.ndarray], bootstrap: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {s: dict(zip(("acc", "lo", "hi"), bootstrap_ci(c.astype(float), bootstrap, rng)))
            for s, c in correct.items()}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| language | setup | MAD-X acc [95 % CI] | LT-SFT acc [95 % CI] | Δ LT-SFT − MAD-X [95 % CI] |",
             "|---|---|---|---|---|"]
    for lang, row in result["languages"].items():
        for s in SETUPS:
            m, f, d = row["madx"][s], row["sft"][s], row["delta"][s]
            lines.append(f"| {lang} ({row['role']}) | {s} | {m['acc']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] | "
                         f"{f['acc']:.3f} [{f['lo']:.3f}, {f['hi']:.3f}] | "
                         f"{d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/sft-transfer")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=["swh", "tgl"])
    parser.add_argument("--language-steps", type=int, default=300, help="MAD-X adapter steps = SFT phase1 + phase2")
    parser.add_argument("--task-steps", type=int, default=200)
    parser.add_argument("--per-genre", type=int, default=200)
    parser.add_argument("--eval-per-genre", type=int, default=None)
    parser.add_argument("--lines", type=int, default=2000, help="MLM lines per language")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    out = Path(args.out)
    cfg = EvalConfig(out=str(out), targets=tuple(args.targets), seeds=tuple(args.seeds), per_genre=args.per_genre,
                     eval_per_genre=args.eval_per_genre, lines_per_language=args.lines, bootstrap=args.bootstrap,
                     setups=SETUPS, recipes=[Recipe(adapter_steps=args.language_steps, task_steps=args.task_steps)])
    from xlpeft.data.datamodules import load_tokenizer
    from xlpeft.lightning.demo import DemoConfig, prepare_backbone
    demo = DemoConfig()
    backbone = str(prepare_backbone(DemoConfig(out=str(out / "demo"), languages=tuple(dict.fromkeys(
        (*demo.languages, cfg.source, *cfg.targets))), genre_targets=tuple(dict.fromkeys(
            (*demo.genre_targets, *cfg.targets))))))
    train, tests = genre_sets(cfg, load_tokenizer(backbone))
    recipe = cfg.recipes[0]
    t0 = time.time()
    lang_dir = language_adapters(cfg, recipe, backbone)
    sft_dir = language_sfts(cfg, backbone, args.language_steps // 2, out / "cache" / "language-sfts")
    print(f"[sft] language modules: {time.time() - t0:.0f} s", flush=True)
    preds: dict[str, dict[str, dict[str, list]]] = {r: {l: {s: [] for s in SETUPS} for l in tests}
                                                    for r in ("madx", "sft")}
    for seed in cfg.seeds:
        for row, module in (("madx", train_task(cfg, recipe, backbone, lang_dir, train, seed)),
                            ("sft", task_sft(cfg, backbone, sft_dir, train, seed, args.task_steps))):
            for lang, data in tests.items():
                for s in SETUPS:
                    preds[row][lang][s].append(predict(module, data, s, cfg.batch_size * 2))
        print(f"[sft] seed {seed} done: {time.time() - t0:.0f} s", flush=True)
    result: dict[str, Any] = {"config": {**vars(args)}, "backbone": backbone, "languages": {}}
    for lang, data in tests.items():
        gold = np.asarray(data["label"])
        correct = {r: {s: np.stack([p == gold for p in preds[r][lang][s]]) for s in SETUPS} for r in preds}
        result["languages"][lang] = {
            "role": "source (in-language)" if lang == cfg.source else "zero-shot target", "examples": len(gold),
            "madx": cells(correct["madx"], cfg.bootstrap), "sft": cells(correct["sft"], cfg.bootstrap),
            "delta": {s: paired_delta(correct["sft"][s], correct["madx"][s], cfg.bootstrap) for s in SETUPS}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_transfer.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (out / "sft_transfer.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
