"""New-script experiment: Santali (Ol Chiki) and a transliterated Bible language.

For each target: held-out MLM accuracy and tokenizer coverage with the
backbone's vocabulary vs a new vocabulary (``NewScriptEmbeddings``), each
with a MAD-X language adapter trained for the same number of steps, backbone
frozen. The controlled target is one Bible language letter-for-letter
transliterated into Ol Chiki, next to the same text in its own script.

    XLPEFT_CACHE=/tmp/xlc python scripts/newscript_experiment.py --out /tmp/cb/newscript

Writes ``results.json`` and ``results.md``. CPU-sized: every row trains ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _split_file(lines: list[str], path: Path) -> tuple[Path, Path]:
    """All lines (MLMDataModule cuts validation/test from the end) and the train-only part."""
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cut = max(1, len(lines) // 20)
    train = path.with_suffix(".train.txt")
    train.write_text("\n".join(lines[:-2 * cut]) + "\n", encoding="utf-8")
    return path, train


def run_row(args: argparse.Namespace, lang: str, file: Path, train_file: Path, new_vocab: bool) -> dict:
    import lightning as L

    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.lightning.newscript import NewScriptEmbeddings

    L.seed_everything(args.seed, verbose=False)
    module = MaskedLMAdaptation(backbone=args.backbone, languages=[lang], lr=args.lr)
    data = MLMDataModule(languages=[lang], backbone=args.backbone, files={lang: str(file)},
                         max_length=args.max_length, batch_size=args.batch_size, max_train_lines=None,
                         max_eval_lines=args.eval_lines, seed=args.seed)
    callbacks = [NewScriptEmbeddings(lang, corpus=str(train_file), act="always", vocab_size=args.vocab_size,
                                     factor_dim=args.factor_dim, keep=True, seed=args.seed)] if new_vocab else []
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0)
    row: dict = {"language": lang, "vocabulary": "new" if new_vocab else "backbone"}
    L.Trainer(max_steps=1, callbacks=callbacks, **opts).test(module, data, verbose=False)
    row["acc_before"] = module.results[lang]["acc"]
    row["targets"] = module.results[lang]["tokens"]
    start = time.perf_counter()
    L.Trainer(max_steps=args.steps, callbacks=callbacks, **opts).fit(module, data)
    row["train_s"] = round(time.perf_counter() - start, 1)
    L.Trainer(max_steps=1, callbacks=callbacks, **opts).test(module, data, verbose=False)
    row["acc_after"] = module.results[lang]["acc"]
    row["loss_after"] = module.results[lang]["loss"]
    if new_vocab:
        row.update(callbacks[0].report())
    return row


def coverage_rows(backbone: str, lang: str, lines: list[str]) -> dict:
    from transformers import AutoTokenizer

    from xlpeft.vocab import coverage
    tok = AutoTokenizer.from_pretrained(backbone)
    return {"language": lang, **coverage(tok, lines).__dict__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/cb/newscript")
    parser.add_argument("--backbone", default="embedded")
    parser.add_argument("--bible-language", default="swh")
    parser.add_argument("--bible-lines", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--eval-lines", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--factor-dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="comma list of targets: sat, translit, latin")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from xlpeft.backbones.embedded import backbone_path
    from xlpeft.data.corpora import corpus_text
    from xlpeft.data.santali import santali_text
    from xlpeft.data.transliterate import transliterate_all

    args.backbone = str(backbone_path(args.backbone))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sat = [x for s in ("train", "validation", "test") for x in santali_text(s, fetch=True)]
    bible = corpus_text(args.bible_language, split="train", max_lines=args.bible_lines)
    targets = {"sat": sat, "translit": transliterate_all(bible), "latin": bible}
    only = [t for t in args.only.split(",") if t] or list(targets)
    results = {"args": vars(args), "coverage": [], "mlm": []}
    path = out / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
    for name in only:
        lines = targets[name]
        lang = "sat" if name == "sat" else f"{args.bible_language}" if name == "latin" else "xtr"
        file, train = _split_file(lines, out / f"{name}.txt")
        results["coverage"].append({"target": name, **coverage_rows(args.backbone, lang, lines)})
        for new_vocab in ([False] if name == "latin" else [False, True]):
            row = run_row(args, lang, file, train, new_vocab)
            results["mlm"].append({"target": name, **row})
            print(json.dumps(results["mlm"][-1]), flush=True)
            path.write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| target | vocabulary | UNK rate | fertility | MLM acc before | MLM acc after | masked targets |",
             "|---|---|---|---|---|---|---|"]
    cov = {c["target"]: c for c in results["coverage"]}
    for r in results["mlm"]:
        c = cov[r["target"]]
        unk, fert = (c["unk_rate"], c["fertility"]) if r["vocabulary"] == "backbone" else (
            r["after"]["unk_rate"], r["after"]["fertility"])
        lines.append(f"| {r['target']} | {r['vocabulary']} | {unk:.3f} | {fert:.2f} | {r['acc_before']:.3f} | "
                     f"{r['acc_after']:.3f} | {r['targets']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
