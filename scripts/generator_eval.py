"""Typology-conditioned generators on the embedded backbone and corpora (CPU-sized).

1. trimmed + head-calibrated e5-small (``xlpeft.lightning.demo.prepare_backbone``;
   the head is calibrated on the training languages only);
2. a MAD-G generator trained by routed MLM over the training languages;
3. static bottleneck adapters (same config as the generated ones) for the same
   languages in one routed run, and "own" adapters for the held-out languages
   trained on their own text (the upper bound);
4. for each held-out language: held-out MLM loss/accuracy and zero-shot genre
   accuracy/macro-F1 with (a) no language adapter, (b) the generated adapter,
   (c) the typologically nearest trained adapter, (d) the typology-weighted
   average of trained adapters, (e) its own adapter; MLM only for kas and nah
   (no genre data), which have no own adapter.

    python scripts/generator_eval.py --out /tmp/gen/eval
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from xlpeft.lightning.demo import DemoConfig, _trainer, prepare_backbone  # noqa: E402

TRAIN = ("eng", "spa", "deu", "fra", "ind", "vie", "tur")
HELD_OUT = ("swh", "tgl")
MLM_ONLY = ("kas", "nah")
VARIANTS = ("none", "generated", "nearest", "average", "own")


def mlm_scores(module, backbone: str, lang: str, adapter: str | None, lines: int) -> dict:
    """Held-out MLM loss/accuracy of ``lang``'s test text under one adapter (or none)."""
    from xlpeft.data.datamodules import MLMDataModule
    data = MLMDataModule([lang], backbone=backbone, batch_size=16, max_length=64, max_eval_lines=lines)
    data.setup("test")
    module.use_adapters = adapter is not None
    loss = correct = count = 0.0
    with torch.no_grad():
        for batch in data.test_dataloader():
            batch["langs"] = [adapter] * len(batch["langs"]) if adapter else batch["langs"]
            logits, targets, _ = module.masked_logits(batch)
            loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += float((logits.argmax(-1) == targets).sum())
            count += len(targets)
    return {"loss": loss / count, "acc": correct / count, "tokens": int(count)}


def train_genre(backbone: str, eng_adapter: Path, steps: int, out: Path, name: str) -> dict:
    """A genre task adapter + head trained on English under Stack(eng, genre)."""
    from xlpeft.data.datamodules import GenreDataModule
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.task import TaskAdaptation
    module = TaskAdaptation(backbone, labels=GENRES, task_adapter="genre",
                            language_adapters={"eng": str(eng_adapter)}, lr=5e-4, warmup_steps=20)
    data = GenreDataModule("eng", ["eng"], backbone=backbone, batch_size=16, max_length=64,
                           max_per_genre=200, max_eval_per_genre=30)
    _trainer(steps, out, name).fit(module, data)
    return {"genre": module.adapted.adapter_state_dict("genre"), "head": module.head.state_dict()}


def genre_scores(backbone: str, trained: dict, adapters: dict[str, Path], mode: str) -> dict:
    """Zero-shot genre accuracy/macro-F1 per held-out language under one variant."""
    from xlpeft.data.datamodules import GenreDataModule
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.task import TaskAdaptation
    module = TaskAdaptation(backbone, labels=GENRES, task_adapter="genre", eval_mode=mode,
                            language_adapters={k: str(v) for k, v in adapters.items()})
    module.adapted.load_adapter_state_dict("genre", trained["genre"])
    module.head.load_state_dict(trained["head"])
    data = GenreDataModule("eng", list(HELD_OUT), backbone=backbone, batch_size=32, max_length=64,
                           max_eval_per_genre=30)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
              enable_progress_bar=False).test(module, data, verbose=False)
    return module.results


def hyperx_section(backbone: str, args: argparse.Namespace, out: Path) -> dict:
    """Hyper-X: genre in English + MLM in the training languages; held-out zero-shot."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    from xlpeft.data.datamodules import GenreDataModule
    from xlpeft.data.genre import GENRES
    from xlpeft.lightning.generator import HyperXTraining, MLMAndTaskDataModule
    t = time.time()
    module = HyperXTraining(backbone, languages=TRAIN, task_languages=["eng"], labels=GENRES, task="genre",
                            generator_config={"reduction_factor": 16}, lr=2e-3, warmup_steps=20)
    data = MLMAndTaskDataModule(TRAIN, "eng", list(HELD_OUT), backbone=backbone, batch_size=16, max_length=64)
    _trainer(args.hyperx_steps, out, "hyperx").fit(module, data)
    module.eval()
    genre_data = GenreDataModule("eng", list(HELD_OUT), backbone=backbone, batch_size=32, max_length=64,
                                 max_eval_per_genre=30)
    genre_data.setup("test")
    preds: dict[str, list] = {}
    with torch.no_grad():
        for batch in genre_data.test_dataloader():
            for i, p in enumerate(module.task_logits(batch).argmax(-1)):
                preds.setdefault(batch["langs"][i], []).append((int(p), int(batch["labels"][i])))
    genre = {}
    for lang, pairs in preds.items():
        p, g = torch.tensor([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
        genre[lang] = {"accuracy": float(multiclass_accuracy(p, g, len(GENRES), average="micro")),
                       "macro_f1": float(multiclass_f1_score(p, g, len(GENRES), average="macro"))}
    mlm = {}
    for lang in (*HELD_OUT, *MLM_ONLY):
        module.generator.attach(module.adapted, lang, "mlm", name=f"hx_{lang}")
        mlm[lang] = mlm_scores(module, backbone, lang, f"hx_{lang}", args.eval_lines)
    return {"genre": genre, "mlm": mlm, "steps": args.hyperx_steps, "seconds": round(time.time() - t, 1),
            "generator_params": sum(p.numel() for p in module.generator.parameters())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/gen/eval")
    parser.add_argument("--steps", type=int, default=200, help="generator and static-adapter MLM steps")
    parser.add_argument("--own-steps", type=int, default=100)
    parser.add_argument("--task-steps", type=int, default=80)
    parser.add_argument("--eval-lines", type=int, default=64)
    parser.add_argument("--calibration-steps", type=int, default=120)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hyperx-steps", type=int, default=200)
    parser.add_argument("--only-hyperx", action="store_true", help="run the Hyper-X section alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.generators import average_by_typology, typology_weights
    from xlpeft.lightning.generator import GeneratorMLM
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.typology import nearest_languages

    out = Path(args.out)
    ad = out / "adapters"
    timings, t0 = {}, time.time()
    cfg = DemoConfig(out=str(out), languages=("eng", *HELD_OUT, *MLM_ONLY), genre_targets=HELD_OUT,
                     calibration_languages=TRAIN, calibration_steps=args.calibration_steps)
    backbone = str(prepare_backbone(cfg))
    timings["backbone_s"] = time.time() - t0
    if args.only_hyperx:
        hx = hyperx_section(backbone, args, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "hyperx.json").write_text(json.dumps(hx, indent=2))
        print(json.dumps(hx, indent=2))
        return hx

    def mlm_data(langs, seed=0):
        return MLMDataModule(langs, backbone=backbone, batch_size=16, max_length=64,
                             max_train_lines=2000, temperature=5.0, seed=seed)

    t = time.time()  # (b) MAD-G generator over the training languages
    gen_module = GeneratorMLM(backbone, languages=TRAIN, generator="madg", lr=2e-3, warmup_steps=20,
                              generator_config={"reduction_factor": 16, "basis": 16})
    _trainer(args.steps, out, "generator").fit(gen_module, mlm_data(TRAIN))
    gen = gen_module.generator
    gen_module.export_generator(out / "generator")
    for lang in (*HELD_OUT, *MLM_ONLY, "eng"):
        gen.materialise(lang, ad / f"gen_{lang}")
    timings["generator_s"] = time.time() - t
    adapter_cfg = gen.config.adapter_config().to_dict()

    t = time.time()  # static adapters, same config, same data and steps
    static = MaskedLMAdaptation(backbone, languages=TRAIN, adapter=adapter_cfg, lr=2e-3, warmup_steps=20)
    _trainer(args.steps, out, "static").fit(static, mlm_data(TRAIN))
    static.export_adapters(ad / "static")
    timings["static_s"] = time.time() - t
    t = time.time()  # (e) own adapters (upper bound)
    own = MaskedLMAdaptation(backbone, languages=HELD_OUT, adapter=adapter_cfg, lr=2e-3, warmup_steps=20)
    _trainer(args.own_steps, out, "own").fit(own, mlm_data(HELD_OUT))
    own.export_adapters(ad / "own")
    timings["own_s"] = time.time() - t

    t = time.time()  # (c) nearest and (d) typology average
    choice = {}
    for lang in (*HELD_OUT, *MLM_ONLY):
        near = nearest_languages(lang, TRAIN, k=1)[0]
        weights = typology_weights(lang, TRAIN)
        average_by_typology(static.adapted, lang, TRAIN, name=f"avg_{lang}")
        static.adapted.save_adapter(f"avg_{lang}", str(ad / f"avg_{lang}"))
        choice[lang] = {"nearest": near[0], "nearest_similarity": near[1],
                        "average_weights": {k: round(v, 4) for k, v in weights.items()}}

    def path(variant: str, lang: str) -> Path | None:
        return {"none": None, "generated": ad / f"gen_{lang}", "average": ad / f"avg_{lang}",
                "nearest": ad / "static" / choice[lang]["nearest"],
                "own": ad / "own" / lang if lang in HELD_OUT else None}[variant]

    evaluator = MaskedLMAdaptation(backbone, languages=(), train="adapters")
    mlm = {}
    for lang in (*HELD_OUT, *MLM_ONLY):
        for variant in VARIANTS:
            p = path(variant, lang)
            if variant != "none" and p is None:
                continue
            name = None if p is None else evaluator.adapted.load_adapter(str(p), name=f"{variant}_{lang}")
            mlm.setdefault(lang, {})[variant] = mlm_scores(evaluator, backbone, lang, name, args.eval_lines)
    timings["mlm_eval_s"] = time.time() - t

    t = time.time()  # zero-shot genre: task adapters over the static / the generated English adapter
    trained = {"static": train_genre(backbone, ad / "static" / "eng", args.task_steps, out, "genre-static"),
               "generated": train_genre(backbone, ad / "gen_eng", args.task_steps, out, "genre-generated")}
    genre = {}
    for variant in VARIANTS:
        src = "generated" if variant == "generated" else "static"
        adapters = {lang: path(variant, lang) for lang in HELD_OUT} if variant != "none" else {}
        res = genre_scores(backbone, trained[src], adapters, "none" if variant == "none" else "own")
        for lang in HELD_OUT:
            genre.setdefault(lang, {})[variant] = res[lang]
    timings["genre_s"] = time.time() - t
    timings["total_s"] = time.time() - t0
    params = {"generator": sum(p.numel() for p in gen.parameters()), "one_adapter": gen.adapter_parameters(),
              "static_adapters_for_train_languages": gen.adapter_parameters() * len(TRAIN)}
    results = {"backbone": backbone, "train_languages": TRAIN, "held_out": HELD_OUT, "mlm_only": MLM_ONLY,
               "args": vars(args), "choices": choice, "mlm": mlm, "genre": genre, "params": params,
               "timings": {k: round(v, 1) for k, v in timings.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "generator_eval.json").write_text(json.dumps(results, indent=2))
    (out / "generator_eval.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(r: dict) -> str:
    lines = ["### Held-out MLM (test split; loss ↓ / accuracy ↑)", "",
             "| language | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for lang, row in r["mlm"].items():
        cells = [f"{row[v]['loss']:.3f} / {row[v]['acc']:.3f}" if v in row else "—" for v in VARIANTS]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    lines += ["", "### Zero-shot genre (English-trained task adapter; accuracy / macro-F1)", "",
              "| language | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
    for lang, row in r["genre"].items():
        cells = [f"{row[v]['accuracy']:.3f} / {row[v]['macro_f1']:.3f}" for v in VARIANTS]
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")
    lines += ["", "Nearest trained language and typology-average weights:", ""]
    for lang, c in r["choices"].items():
        lines.append(f"- {lang}: nearest {c['nearest']} (cos {c['nearest_similarity']:.3f}); "
                     f"weights {c['average_weights']}")
    p = r["params"]
    lines += ["", f"Parameters: generator {p['generator']:,}; one adapter {p['one_adapter']:,}; "
              f"static adapters for the {len(r['train_languages'])} training languages "
              f"{p['static_adapters_for_train_languages']:,}.", "",
              f"Timings (s): {r['timings']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
