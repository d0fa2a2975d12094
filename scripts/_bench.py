"""Shared helpers of the ``bench_*.py`` scripts: interleaved timing, reports, backbones.

Ratios are measured side by side in one process: the variants of a comparison
run in turn within every round (the order rotates from round to round), after
warm-up. On a shared machine the load drifts while a benchmark runs, so the
headline ratio is the median of per-round (paired) ratios; the ratio of medians,
the ratio of minima and the load average (``os.getloadavg``) at the start and
end come with it. Nothing here asserts on time: the scripts report, people judge.

    interleave({"a": step_a, "b": step_b}, reps=5, warmup=1, budget_s=60)
        round 0: a b   round 1: b a   round 2: a b …   ──► {"a": [s…], "b": [s…]}
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning
# made 2-thread steps 3-7x slower than 1-thread ones (measured); set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DEFAULT_OUT = REPO / "runs" / "bench"
BENCH_CACHE = Path(os.environ.get("XLPEFT_BENCH_CACHE", "/tmp/xlpeft-bench"))
"""Where trimmed and tiny backbones are cached between runs (outside the repository)."""
LANGS = ("eng", "swh")


# ----------------------------------------------------------------------------- timing
def setup_torch(threads: int, seed: int = 0) -> None:
    """Fix the intra-op thread count (the target machine has 2 cores) and the seed; quiet logs."""
    import transformers
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def interleave(variants: dict[str, Callable[[], Any]], reps: int, warmup: int = 1,
               budget_s: float | None = None, min_reps: int = 3) -> dict[str, Any]:
    """Time each variant ``reps`` times, interleaved; stop early once ``budget_s`` is spent.

    Every round runs all variants, starting one further along each time. At least
    ``min(min_reps, reps)`` rounds always run, so a loaded machine makes the run
    longer rather than the statistics meaningless.
    """
    names = list(variants)
    start, load_start = time.perf_counter(), loadavg()  # the budget counts the warm-up too
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if budget_s is not None and r + 1 >= min(min_reps, reps) and spent > budget_s:
            break
    return {"samples": samples, "median_s": {n: statistics.median(v) for n, v in samples.items()},
            "loadavg_start": load_start, "loadavg_end": loadavg(), "rounds": len(samples[names[0]])}


def summary(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and max of timing samples, in seconds."""
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "n": len(samples), "samples_s": [round(s, 6) for s in samples]}


def ratio(timing: dict[str, Any], num: str, den: str) -> dict[str, float]:
    """``num / den`` three ways; the median of per-round (paired) ratios is the headline.

    Pairing cancels load that drifts between rounds; the ratio of minima is the
    least disturbed estimate on a machine whose load only ever adds time.
    """
    a, b = timing["samples"][num], timing["samples"][den]
    return {"median_paired_ratio": statistics.median(x / y for x, y in zip(a, b)),
            "ratio_of_medians": statistics.median(a) / statistics.median(b),
            "ratio_of_mins": min(a) / min(b)}


def fill_defaults(args: Any, normal: dict[str, Any], quick: dict[str, Any]) -> Any:
    """Options left at None take their ``--quick`` or normal default; given ones are kept."""
    for key, value in normal.items():
        if getattr(args, key) is None:
            setattr(args, key, quick.get(key, value) if args.quick else value)
    return args


class Budget:
    """Seconds left for the whole script, shared out between its sections."""

    def __init__(self, total_s: float) -> None:
        self.total = total_s
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.total - (time.perf_counter() - self.start)

    def share(self, sections_left: int) -> float:
        """An equal share of what is left for the next section (never negative)."""
        return max(0.0, self.left() / max(1, sections_left))


# ----------------------------------------------------------------------------- reports
def environment(threads: int) -> dict[str, Any]:
    """What a reader needs to judge the numbers: machine, load, versions."""
    import transformers
    return {"loadavg": loadavg(), "cpu_count": os.cpu_count(), "torch_threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_report(out_dir: str | Path, name: str, payload: dict[str, Any], table: str) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``, print the table; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return path


def timing_row(label: str, timing: dict, num: str, den: str, target: str) -> list[Any]:
    """One Markdown row: medians, the three ratios, the target, rounds and load."""
    r = ratio(timing, num, den)
    med = {k: summary(timing["samples"][k])["median_s"] for k in (num, den)}
    return [label, fmt(med[num]), fmt(med[den]), f"**{fmt(r['median_paired_ratio'])}**",
            fmt(r["ratio_of_medians"]), fmt(r["ratio_of_mins"]), target, timing["rounds"],
            f"{fmt(timing['loadavg_start'][0], 1)}→{fmt(timing['loadavg_end'][0], 1)}"]


TIMING_HEADERS = ["comparison", "variant median s", "baseline median s", "ratio (paired median)",
                  "ratio of medians", "ratio of mins", "target", "rounds", "load 1 min"]


# ----------------------------------------------------------------------------- memory
def rss_mb() -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set size of this process, in MiB."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line[:5]] = int(line.split()[1]) / 1024
    return {"rss_mb": out["VmRSS"], "peak_mb": out["VmHWM"]}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: ``/proc/self/clear_refs`` ← 5)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- backbones
def bible_lines(langs: Sequence[str], lines: int, split: str = "train") -> dict[str, list[str]]:
    """The first ``lines`` Bible verses of ``split`` per language."""
    from xlpeft.data.corpora import corpus_text
    return {lang: corpus_text(lang, split=split, max_lines=lines) for lang in langs}


def trimmed_backbone(source: Callable[[], Path], texts: dict[str, list[str]], tag: str) -> Path:
    """``source()`` trimmed to the pieces ``texts`` use, cached under ``BENCH_CACHE/tag``.

    ``source`` is called only when there is no cached copy (finding the embedded
    backbone hashes its source files: seconds).
    """
    from xlpeft.backbones.trim import TRIM_FILE, trim_vocabulary
    digest = hashlib.sha1("\n".join(t for lines in texts.values() for t in lines).encode()).hexdigest()
    out = BENCH_CACHE / f"{tag}-{digest[:10]}"  # a changed corpus gets its own copy
    if (out / TRIM_FILE).is_file() and (out / "config.json").is_file():
        return out
    return trim_vocabulary(source(), [t for lines in texts.values() for t in lines], out)


def embedded_source() -> Path:
    """The converted embedded backbone (multilingual-e5-small, 250k vocabulary)."""
    from xlpeft.backbones.embedded import embedded_backbone_path
    return embedded_backbone_path()


def tiny_unigram_backbone(texts: dict[str, list[str]], hidden: int = 32, vocab: int = 400) -> Path:
    """A tiny random ``BertForMaskedLM`` with a Unigram tokenizer trained on ``texts`` (smoke runs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    out = BENCH_CACHE / f"tiny-unigram-h{hidden}-v{vocab}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab, special_tokens=special, unk_token="<unk>")
    backend.train_from_iterator([t for lines in texts.values() for t in lines], trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", sep_token="</s>", cls_token="<s>",
                                  pad_token="<pad>", mask_token="<mask>", model_max_length=128)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=2 * hidden,
                        max_position_embeddings=130, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                        architectures=["BertForMaskedLM"])
    torch.manual_seed(0)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    BertForMaskedLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another run finished first; keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def packed_rows(tokenizer: Any, texts: dict[str, list[str]], seq: int) -> dict[str, list[list[int]]]:
    """Per language, rows of exactly ``seq`` ids: ``<s>`` + packed verse pieces + ``</s>``."""
    out = {}
    for lang, lines in texts.items():
        encoded = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
        stream = [i for enc in encoded for i in enc.ids]
        width = seq - 2
        out[lang] = [[tokenizer.cls_token_id, *stream[k:k + width], tokenizer.sep_token_id]
                     for k in range(0, len(stream) - width + 1, width)]
    return out


def mlm_batches(tokenizer: Any, texts: dict[str, list[str]], batch: int, seq: int, count: int,
                seed: int = 0) -> list[dict[str, Any]]:
    """``count`` dynamically masked batches of ``batch × seq`` real tokens, languages alternating."""
    from xlpeft.data.collators import MLMCollator

    rows = packed_rows(tokenizer, texts, seq)
    langs = list(rows)
    collator = MLMCollator(mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id,
                           vocab_size=len(tokenizer), special_ids=tuple(tokenizer.all_special_ids),
                           generator=torch.Generator().manual_seed(seed))
    out, cursor = [], {lang: 0 for lang in langs}
    for _ in range(count):
        examples = []
        for i in range(batch):
            lang = langs[i % len(langs)]
            pool = rows[lang]
            examples.append({"input_ids": pool[cursor[lang] % len(pool)], "lang": lang})
            cursor[lang] += 1
        out.append(collator(examples))
    return out
