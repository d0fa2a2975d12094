"""Zero-shot transfer rows for BAD-X and phylogeny adapters beside monolingual MAD-X (genre task, 1 seed).

    python scripts/eval_modular.py --stage madx        # MAD-X: eng, tgl, swh adapters; task under Stack(eng, task)
    python scripts/eval_modular.py --stage badx        # BAD-X: eng_tgl, eng_swh; one task adapter per pair
    python scripts/eval_modular.py --stage phylogeny   # family/genus/language adapters on eng, ind, swh; tgl zero-text
    python scripts/eval_modular.py --stage report      # the table (accuracy, 95 % CI, paired Δ vs MAD-X own)
    python scripts/eval_modular.py --stage nmt-base    # NMT: trimmed bert2bert base (configs/nmt-base.yaml)
    python scripts/eval_modular.py --stage nmt-modules # language adapters / CPG / LaSS on that base, scored per direction

Each stage writes ``<out>/<stage>.json`` (per-example predictions and gold) so the stages run
one at a time (each a few minutes on 2 CPU cores). Everything uses the public pieces of
``xlpeft.lightning.transfer`` (EvalConfig/Recipe, genre sets, language adapters, task training,
predictions) on the demo's prepared backbone (converted, trimmed, head-calibrated e5; cached).

Budgets are equal per method: ``--steps`` MLM steps of batch ``--batch`` for the language-side
adapters, ``--task-steps`` for each task adapter. Caveats: one seed, small sizes, the paired CIs
cover example resampling only; the phylogeny run's ``ind`` (tgl's Austronesian relative) was not
in the demo backbone's vocabulary trimming.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SOURCE, TARGETS = "eng", ("tgl", "swh")
SETUPS = ("none", "source", "own")


def config(args: argparse.Namespace, backbone: str) -> Any:
    from xlpeft.lightning.transfer import EvalConfig, Recipe

    recipe = Recipe(name="madx", adapter_steps=args.steps, task_steps=args.task_steps)
    return EvalConfig(out=args.out, backbone=backbone, source=SOURCE, targets=TARGETS, passage=args.passage,
                      max_length=args.max_length, per_genre=args.per_genre, eval_per_genre=args.eval_per_genre,
                      seeds=(0,), batch_size=args.batch, lines_per_language=args.lines, bootstrap=args.bootstrap,
                      lr_task=args.lr_task, lr_adapters=args.lr_adapters, recipes=[recipe], setups=SETUPS)


def trainer(steps: int, root: Path) -> Any:
    import lightning as L
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
                     enable_progress_bar=False, default_root_dir=str(root))


def predictions(module: Any, tests: dict[str, Any], setups: tuple[str, ...], batch: int) -> dict[str, dict]:
    from xlpeft.lightning.transfer import predict
    return {lang: {s: predict(module, data, s, batch).tolist() for s in setups} for lang, data in tests.items()}


def stage_madx(cfg: Any, backbone: str, train: Any, tests: dict[str, Any]) -> dict[str, Any]:
    from xlpeft.lightning.transfer_stages import language_adapters, train_task

    recipe = cfg.recipes[0]
    folder = language_adapters(cfg, recipe, backbone)
    module = train_task(cfg, recipe, backbone, folder, train, seed=0)
    return {"preds": predictions(module, tests, SETUPS, cfg.batch_size * 2)}


def stage_badx(cfg: Any, backbone: str, train: Any, tests: dict[str, Any], args: argparse.Namespace) -> dict:
    import lightning as L
    from xlpeft.lightning.bilingual import BilingualMLM, BilingualMLMDataModule, pair_adapter
    from xlpeft.lightning.transfer_stages import train_task

    recipe, root = cfg.recipes[0], Path(cfg.out) / "badx"
    pairs = [f"{SOURCE}-{t}" for t in TARGETS]
    L.seed_everything(0, verbose=False)
    module = BilingualMLM(backbone, pairs=pairs, adapter=recipe.adapter, lr=cfg.lr_adapters, warmup_steps=20)
    data = BilingualMLMDataModule(pairs=pairs, source_share=args.source_share, backbone=backbone,
                                  batch_size=cfg.batch_size, max_length=64, max_train_lines=cfg.lines_per_language,
                                  temperature=1e9, seed=0)
    trainer(args.steps, root).fit(module, data)
    module.export_adapters(root / "adapters")
    preds: dict[str, dict] = {}
    for target in TARGETS:  # the pair's adapter under the task adapter, on both sides
        pair_dir = root / f"pair-{target}"
        shutil.rmtree(pair_dir, ignore_errors=True)
        for lang in (SOURCE, target):
            shutil.copytree(root / "adapters" / pair_adapter(f"{SOURCE}-{target}"), pair_dir / lang)
        task = train_task(cfg, recipe, backbone, pair_dir, train, seed=0)
        got = predictions(task, {SOURCE: tests[SOURCE], target: tests[target]}, ("own",), cfg.batch_size * 2)
        preds[target] = got[target]
        preds[f"{SOURCE}@{target}"] = got[SOURCE]
    return {"preds": preds, "source_share": args.source_share}


def stage_phylogeny(cfg: Any, backbone: str, train: Any, tests: dict[str, Any], args: argparse.Namespace) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader
    from xlpeft.data.collators import ClassificationCollator
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.phylogeny import PhylogenyMLM, PhylogenyTask

    recipe, root = cfg.recipes[0], Path(cfg.out) / "phylogeny"
    langs = [SOURCE, "ind", "swh"]  # tgl held out: its Austronesian family/genus adapters learn from ind alone
    L.seed_everything(0, verbose=False)
    module = PhylogenyMLM(backbone, languages=langs, eval_languages=["tgl"], adapter=recipe.adapter,
                          lr=cfg.lr_adapters, warmup_steps=20)
    data = MLMDataModule(langs, backbone=backbone, batch_size=cfg.batch_size, max_length=64,
                         max_train_lines=cfg.lines_per_language, temperature=1e9, seed=0)
    trainer(args.steps, root).fit(module, data)
    folders = {p.name: str(p) for p in module.export_adapters(root / "adapters")}
    L.seed_everything(0, verbose=False)
    task = PhylogenyTask(backbone, labels=GENRES, task_adapter="genre", adapter=recipe.task_adapter,
                         source_language=SOURCE, language_adapters=folders, lr=cfg.lr_task, warmup_steps=20)
    pad = task.adapted.model.config.pad_token_id or 0
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, collate_fn=ClassificationCollator(pad_id=pad),
                        generator=torch.Generator().manual_seed(0))
    trainer(args.task_steps, root).fit(task, train_dataloaders=loader)
    paths = {lang: [str(x) for x in task.path(lang)] for lang in tests}
    return {"preds": predictions(task, tests, SETUPS, cfg.batch_size * 2), "paths": paths}


# --------------------------------------------------------------------------- NMT
NMT_DIRS = ["spa-nah", "nah-spa", "spa-ote"]


def nmt_stage(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """The NMT configs at small sizes, through ``scripts/nmt_experiment.py``'s helpers (cwd = <out>/nmt)."""
    import os

    sys.path.insert(0, str(REPO / "scripts"))
    from nmt_experiment import TAGS, common, evaluate, fit, trimmed_backbone

    nmt = (Path(args.out) / "nmt").resolve()
    nmt.mkdir(parents=True, exist_ok=True)
    os.chdir(nmt)  # the configs' runs/nmt/... paths land here
    opts = argparse.Namespace(batch=args.batch, train_pairs=args.train_pairs)
    if stage == "nmt-base":
        trimmed = trimmed_backbone(nmt, args.train_pairs)
        fit("nmt-base.yaml", [f"--model.init_args.backbone={trimmed}", f"--data.init_args.backbone={trimmed}",
                              *common(opts, args.base_steps)])
        from xlpeft.lightning.translation import TranslationAdaptation
        alone = TranslationAdaptation(backbone="runs/nmt/base-model", modules="none", lang_tokens=TAGS,
                                      max_new_tokens=32)
        return {"base": evaluate(alone, NMT_DIRS, args.eval_pairs, args.batch)}
    low = [f"--data.init_args.directions=[{','.join(NMT_DIRS)}]"]
    runs = {"language adapters": ("nmt-language-adapters.yaml", ["--trainer.callbacks.init_args.dirpath=runs/nmt/la"]),
            "CPG (typology)": ("nmt-cpg.yaml", ["--trainer.callbacks.init_args.dirpath=runs/nmt/cpg"]),
            "LaSS": ("nmt-lass.yaml", [f"--model.init_args.directions=[{','.join(NMT_DIRS)}]",
                                       f"--model.init_args.search_steps={args.search_steps}"])}
    out: dict[str, Any] = {}
    for name, (config, extra) in runs.items():
        t0 = time.time()
        module, _ = fit(config, [*common(opts, args.module_steps), *low, *extra])
        out[name] = {"scores": evaluate(module, NMT_DIRS, args.eval_pairs, args.batch),
                     "seconds": round(time.time() - t0, 1),
                     "trained_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
        del module
    return out


def nmt_report(out: Path) -> str:
    base = json.loads((out / "nmt-base.json").read_text())["base"]
    mods = json.loads((out / "nmt-modules.json").read_text())
    rows = [("base alone", base)] + [(k, v["scores"]) for k, v in mods.items()
                                     if k not in ("seconds", "config", "eval_config", "backbone")]
    lines = ["| on the frozen base | " + " | ".join(f"{d} chrF / loss" for d in NMT_DIRS) + " |",
             "|---|" + "---:|" * len(NMT_DIRS)]
    lines += [f"| {name} | " + " | ".join(f"{s[d]['chrf']:.1f} / {s[d]['loss']:.2f}" for d in NMT_DIRS) + " |"
              for name, s in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
ROWS = [  # (label, stage, setup)
    ("task adapter alone", "madx", "none"),
    ("MAD-X: English adapter", "madx", "source"),
    ("MAD-X: own adapter", "madx", "own"),
    ("BAD-X: bilingual eng_<target> adapter", "badx", "own"),
    ("phylogeny: own path", "phylogeny", "own"),
]


def report(out: Path, bootstrap: int) -> str:
    from xlpeft.stats import bootstrap_ci, paired_delta

    stages = {s: json.loads((out / f"{s}.json").read_text()) for s in ("madx", "badx", "phylogeny")
              if (out / f"{s}.json").is_file()}
    if "madx" not in stages:
        raise SystemExit("run --stage madx first (its gold labels and baseline rows)")
    gold = {lang: np.asarray(v) for lang, v in stages["madx"]["gold"].items()}
    lines = [f"| setup | {' | '.join(TARGETS)} |", "|---|" + "---|" * len(TARGETS)]
    for label, stage, setup in ROWS:
        if stage not in stages:
            continue
        cells = []
        for lang in TARGETS:
            p = stages[stage]["preds"][lang][setup]
            correct = (np.asarray(p) == gold[lang])[None].astype(float)
            acc, lo, hi = bootstrap_ci(correct, bootstrap, np.random.default_rng(0))
            base = (np.asarray(stages["madx"]["preds"][lang]["own"]) == gold[lang])[None]
            cell = f"{100 * acc:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
            if (stage, setup) != ("madx", "own"):
                d = paired_delta(correct.astype(bool), base, bootstrap, 0)
                cell += f" (Δ own {100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}])"
            cells.append(cell)
        zero = " (zero-text for tgl)" if stage == "phylogeny" else ""
        lines.append(f"| {label}{zero} | {' | '.join(cells)} |")
    meta = stages["madx"]["config"]
    lines.append("")
    lines.append(f"Accuracy % on {len(gold[TARGETS[0]])} test passages per target (eng source in-language: "
                 f"{100 * float(np.mean(np.asarray(stages['madx']['preds'][SOURCE]['own']) == gold[SOURCE])):.1f}); "
                 f"1 seed; {meta['steps']} MLM + {meta['task_steps']} task steps, batch {meta['batch']}; "
                 "95 % bootstrap CIs over examples; Δ own = paired difference to MAD-X's own adapter.")
    text = "\n".join(lines)
    (out / "modular.md").write_text(text + "\n")
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=("madx", "badx", "phylogeny", "report", "nmt-base", "nmt-modules", "nmt-report"),
                   required=True)
    p.add_argument("--out", default="runs/eval-modular")
    p.add_argument("--steps", type=int, default=150, help="MLM steps of the language-side adapters")
    p.add_argument("--task-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr-task", type=float, default=5e-4)
    p.add_argument("--lr-adapters", type=float, default=1e-3)
    p.add_argument("--lines", type=int, default=1000, help="MLM training lines per language")
    p.add_argument("--passage", type=int, default=2)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--per-genre", type=int, default=60)
    p.add_argument("--eval-per-genre", type=int, default=30)
    p.add_argument("--source-share", type=float, default=0.5, help="BAD-X: share of source lines per pair")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base-steps", type=int, default=120, help="NMT: steps of the shared base")
    p.add_argument("--module-steps", type=int, default=80, help="NMT: steps of each method on the base")
    p.add_argument("--search-steps", type=int, default=20, help="NMT: LaSS fine-tuning steps per direction")
    p.add_argument("--train-pairs", type=int, default=1000, help="NMT: training pairs per direction")
    p.add_argument("--eval-pairs", type=int, default=20, help="NMT: test pairs per direction")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)  # the NMT stages change the working directory
    if args.stage == "report":
        print(report(out, args.bootstrap))
        return
    if args.stage == "nmt-report":
        print(nmt_report(out))
        return
    torch.set_num_threads(args.threads)
    if args.stage.startswith("nmt"):
        t0 = time.time()
        result = nmt_stage(args, args.stage)
        result.update({"seconds": round(time.time() - t0, 1), "config": vars(args)})
        (out.resolve() / f"{args.stage}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
        print(f"[eval_modular] {args.stage}: {result['seconds']} s")
        return
    from xlpeft.data.datamodules import load_tokenizer
    from xlpeft.lightning.demo import DemoConfig, prepare_backbone
    from xlpeft.lightning.transfer_stages import genre_sets

    backbone = str(prepare_backbone(DemoConfig(out=str(out / "demo"))))
    cfg = config(args, backbone)
    train, tests = genre_sets(cfg, load_tokenizer(backbone))
    t0 = time.time()
    if args.stage == "madx":
        result = stage_madx(cfg, backbone, train, tests)
        result["gold"] = {lang: list(map(int, data["label"])) for lang, data in tests.items()}
    elif args.stage == "badx":
        result = stage_badx(cfg, backbone, train, tests, args)
    else:
        result = stage_phylogeny(cfg, backbone, train, tests, args)
    result.update({"seconds": round(time.time() - t0, 1), "config": vars(args), "eval_config": asdict(cfg),
                   "backbone": backbone})
    (out / f"{args.stage}.json").write_text(json.dumps(result, indent=1))
    print(f"[eval_modular] {args.stage}: {result['seconds']} s -> {out / (args.stage + '.json')}")


if __name__ == "__main__":
    main()
