"""CPU-sized embedded NMT experiment: a shared base, then language modules for low-resource directions.

    python scripts/nmt_experiment.py --out /tmp/nmt/run

1. trim the embedded e5 vocabulary to the pieces the chosen pairs use (``trim_vocabulary``);
2. ``xlpeft fit --config configs/nmt-base.yaml`` (backbone = the trimmed folder): warm-start
   bert2bert, train the decoder on Bible pairs among spa/eng/por, export ``runs/nmt/base-model``;
3. score the base alone on every direction (test split; BLEU/chrF per direction);
4. ``xlpeft fit --config configs/nmt-language-adapters.yaml``: monolingual adapters for spa, nah,
   ote on the frozen base (elotl spa-nah, nah-spa, spa-ote), then score base + modules.

The configs' relative paths (``runs/nmt/...``) resolve inside ``--out``. Writes
``nmt_results.json``, ``nmt_results.md`` and ``nmt_results.png`` there. Numbers from a run
this small are low; they are reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

BASE_DIRS = ["spa-eng", "eng-spa", "spa-por", "por-spa", "eng-por", "por-eng"]
LOW_DIRS = ["spa-nah", "nah-spa", "spa-ote"]
TAGS = {"spa": "▁spa", "eng": "▁eng", "por": "▁por", "nah": "▁nah", "ote": "▁ote"}


def trimmed_backbone(out: Path, pairs_per_dir: int) -> Path:
    """The embedded backbone trimmed to the pieces of the experiment's text (all splits)."""
    from transformers import AutoTokenizer

    from xlpeft.backbones.embedded import embedded_backbone_path
    from xlpeft.backbones.trim import trim_vocabulary
    from xlpeft.data.parallel import corpus_pairs

    target = out / "backbone-trimmed"
    if (target / "config.json").is_file():
        return target
    texts = []
    for direction in BASE_DIRS[::2] + LOW_DIRS:
        for split in ("train", "validation", "test"):
            for p in corpus_pairs(*direction.split("-"), split)[:pairs_per_dir]:
                texts += [p.src, p.tgt]
    source = embedded_backbone_path()
    vocab = AutoTokenizer.from_pretrained(source).get_vocab()
    return trim_vocabulary(source, texts, target, keep_ids=[vocab[t] for t in TAGS.values()])


def evaluate(module, directions: list[str], limit: int, batch_size: int) -> dict[str, dict[str, float]]:
    """BLEU/chrF/loss per direction on the test split (greedy decoding)."""
    from xlpeft.data.parallel import Seq2SeqCollator, corpus_pairs, encode_pairs
    from xlpeft.data.parallel_datamodule import _spread
    from xlpeft.lightning.translation import score_outputs

    module.eval()
    collate = Seq2SeqCollator(module.format.tokenizer.pad_token_id)
    outputs: dict[str, list] = {}
    with torch.no_grad():
        for direction in directions:
            pairs = _spread(corpus_pairs(*direction.split("-"), "test"), limit)
            rows = encode_pairs(module.format, pairs, 32, direction)
            for i in range(0, len(rows), batch_size):
                batch = collate(rows[i:i + batch_size])
                hyps = module.translate(batch)
                losses = module.token_losses(batch)
                counts = (batch["labels"] != -100).sum(1)
                outputs.setdefault(direction, []).extend(
                    (h, r, float(loss.sum()), int(c)) for h, r, loss, c in zip(hyps, batch["references"], losses, counts))
    scores = score_outputs(outputs)
    for direction, rows in outputs.items():
        scores[direction]["sample"] = {"hyp": rows[0][0], "ref": rows[0][1]}
    return scores


def fit(config: str, overrides: list[str]) -> tuple[object, float]:
    """Run ``xlpeft fit --config`` (LightningCLI) and return the trained module and seconds."""
    from xlpeft.lightning.cli import cli

    run = cli(args=["--config", str(REPO / "configs" / config), *overrides], run=False)
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    return run.model, time.perf_counter() - start


def common(args: argparse.Namespace, steps: int) -> list[str]:
    return [f"--trainer.max_steps={steps}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
            f"--data.init_args.batch_size={args.batch}", f"--data.init_args.max_train_pairs={args.train_pairs}"]


def report(results: dict, out: Path) -> None:
    lines = ["| direction | base: chrF | base: BLEU | base: loss | base + language adapters: chrF | BLEU | loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for d in LOW_DIRS:
        b, m = results["base"][d], results["modules"][d]
        lines.append(f"| {d} | {b['chrf']:.1f} | {b['bleu']:.2f} | {b['loss']:.2f} | {m['chrf']:.1f} | "
                     f"{m['bleu']:.2f} | {m['loss']:.2f} |")
    if "denoising" in results:
        lines += ["", "| direction | denoising adapters + cross-attention (spa-nah data only): chrF | BLEU | loss |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {d} | {r['chrf']:.1f} | {r['bleu']:.2f} | {r['loss']:.2f} |"
                  for d, r in results["denoising"]["scores"].items()]
    lines += ["", "| base direction | chrF | BLEU |", "|---|---:|---:|"]
    lines += [f"| {d} | {results['base'][d]['chrf']:.1f} | {results['base'][d]['bleu']:.2f} |" for d in BASE_DIRS]
    (out / "nmt_results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(LOW_DIRS))
    ax.bar([x - 0.2 for x in xs], [results["base"][d]["chrf"] for d in LOW_DIRS], 0.4, label="base alone")
    ax.bar([x + 0.2 for x in xs], [results["modules"][d]["chrf"] for d in LOW_DIRS], 0.4, label="base + language adapters")
    ax.set_xticks(list(xs), LOW_DIRS)
    ax.set_ylabel("chrF (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "nmt_results.png", dpi=120)


def denoising(args: argparse.Namespace, out: Path) -> dict:
    """Üstün et al.-style: denoising adapters on monolingual text, then cross-attention on spa-nah only."""
    fit("nmt-denoising-adapters.yaml", common(args, args.denoise_steps))
    module, _ = fit("nmt-denoising-translation.yaml", common(args, args.denoise_steps))
    return {"steps": args.denoise_steps, "parallel_data": ["spa-nah"],
            "scores": evaluate(module, LOW_DIRS, args.eval_pairs, args.batch)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/nmt/run")
    p.add_argument("--base-steps", type=int, default=250)
    p.add_argument("--module-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--train-pairs", type=int, default=2000, help="training pairs per direction")
    p.add_argument("--eval-pairs", type=int, default=40, help="test pairs per direction")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--denoise-steps", type=int, default=0,
                   help="also run the denoising-adapter configs (steps each; 0 = skip)")
    p.add_argument("--only-denoising", action="store_true",
                   help="reuse the base and results already in --out; run the denoising steps only")
    args = p.parse_args(argv)
    import transformers
    torch.set_num_threads(args.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the configs' runs/nmt/... paths land here
    t0 = time.perf_counter()
    if args.only_denoising:
        results = json.loads((out / "nmt_results.json").read_text(encoding="utf-8"))
        results["denoising"] = denoising(args, out)
        results["denoising"]["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "nmt_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        report(results, out)
        print((out / "nmt_results.md").read_text())
        return
    trimmed = trimmed_backbone(out, args.train_pairs)
    base, base_s = fit("nmt-base.yaml", [f"--model.init_args.backbone={trimmed}",
                                         f"--data.init_args.backbone={trimmed}", *common(args, args.base_steps)])
    from xlpeft.lightning.translation import TranslationAdaptation
    alone = TranslationAdaptation(backbone="runs/nmt/base-model", modules="none", lang_tokens=TAGS, max_new_tokens=32)
    results: dict = {"base": evaluate(alone, BASE_DIRS + LOW_DIRS, args.eval_pairs, args.batch)}
    del alone, base
    modules, mod_s = fit("nmt-language-adapters.yaml", common(args, args.module_steps))
    results["modules"] = evaluate(modules, LOW_DIRS, args.eval_pairs, args.batch)
    if args.denoise_steps:
        results["denoising"] = denoising(args, out)
    results["setup"] = {**vars(args), "trimmed_vocab": len(modules.adapted.tokenizer),
                        "base_fit_s": round(base_s, 1), "modules_fit_s": round(mod_s, 1),
                        "total_s": round(time.perf_counter() - t0, 1), "threads": args.threads,
                        "load_avg_end": list(os.getloadavg()),
                        "adapter_params": {n: sum(t.numel() for t in modules.adapted.adapter_state_dict(n).values())
                                           for n in modules.adapted.adapter_names}}
    (out / "nmt_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report(results, out)
    print((out / "nmt_results.md").read_text())


if __name__ == "__main__":
    main()
