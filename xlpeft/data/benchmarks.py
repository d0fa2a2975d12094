"""The cross-lingual benchmarks researchers use, by name, as DataModules.

    BENCHMARKS["wikiann"] ─► Hub dataset + config per language ─► rows in the Hub's schema
        online:   datasets.load_dataset(hub, config, split, revision)   (datasets' own cache)
        offline:  data_dir/<benchmark>/<config>/  (DatasetDict.save_to_disk; ``save_benchmark`` writes it)
    rows ─► Example(words/text, label names, lang) ─► LabelledDataModule's encoding and batches
            FLORES sentences ─► Pair(src, tgt) ─► ParallelDataModule's seq2seq batches

Zero-shot transfer as in MAD-X (Pfeiffer et al. 2020, arXiv:2005.00052): the
task trains and validates in ``source_lang`` (English), the test split is the
target ``lang``; every example carries its language code, so ``TaskAdaptation``
runs it under that language's adapter. AmericasNLI has no training data: it
trains on XNLI's English split. Label lists are the Hub datasets' ClassLabel
names, in their id order, and are checked against the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from xlpeft.data._common import MissingFileError
from xlpeft.data.labelled import Example, LabelledDataModule
from xlpeft.data.parallel import Pair
from xlpeft.data.parallel_datamodule import ParallelDataModule
from xlpeft.errors import CorruptFileError, XlpeftValueError, unknown

NER = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC")
NLI = ("entailment", "neutral", "contradiction")
UPOS = ("NOUN", "PUNCT", "ADP", "NUM", "SYM", "SCONJ", "ADJ", "PART", "DET", "CCONJ", "PROPN", "PRON", "X", "_",
        "ADV", "INTJ", "VERB", "AUX")
SPLITS = {"train": "train", "validation": "validation", "test": "test"}


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark lives on the Hub and what its rows look like."""

    name: str
    hub: str
    """Hub dataset id; its config names a language (a treebank for UD, a FLORES code for FLORES)."""
    kind: str
    """``token-cls`` (a tag per word), ``pair-cls`` (premise + hypothesis) or ``translation``."""
    columns: tuple[str, ...]
    label: str | None
    labels: tuple[str, ...] = ()
    splits: Mapping[str, str] = field(default_factory=lambda: SPLITS)
    """xlpeft split → the Hub's split name."""
    revision: str | None = None
    """Script-based Hub datasets are read from their parquet conversion."""
    train_from: str | None = None
    """The benchmark whose source-language split trains this one (AmericasNLI: XNLI)."""


BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType({b.name: b for b in (
    Benchmark("wikiann", "unimelb-nlp/wikiann", "token-cls", ("tokens",), "ner_tags", NER),
    Benchmark("masakhaner", "masakhane/masakhaner", "token-cls", ("tokens",), "ner_tags",
              NER + ("B-DATE", "I-DATE"), revision="refs/convert/parquet"),
    Benchmark("udpos", "universal-dependencies/universal_dependencies", "token-cls", ("tokens",), "upos", UPOS,
              revision="refs/convert/parquet"),
    Benchmark("xnli", "facebook/xnli", "pair-cls", ("premise", "hypothesis"), "label", NLI),
    Benchmark("americasnli", "nala-cub/americas_nli", "pair-cls", ("premise", "hypothesis"), "label", NLI,
              splits={"validation": "validation", "test": "test"}, train_from="xnli"),
    Benchmark("flores", "facebook/flores", "translation", ("sentence",), None,
              splits={"validation": "dev", "test": "devtest"}),
)})


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (a clear error naming the known ones otherwise)."""
    if name not in BENCHMARKS:
        raise unknown("benchmark", name, BENCHMARKS)
    return BENCHMARKS[name]


def _local(bench: Benchmark, config: str, data_dir: str | Path) -> Any:
    from datasets import load_from_disk

    folder = Path(data_dir).expanduser() / bench.name / config
    if not (folder / "dataset_dict.json").is_file():
        raise MissingFileError(
            f"no local {bench.name} data for {config!r}: {folder} is not a saved DatasetDict. Write it once online "
            f"with xlpeft.data.benchmarks.save_benchmark({bench.name!r}, {config!r}, {str(data_dir)!r}), or drop "
            "`data_dir` to read the Hub")
    return load_from_disk(str(folder))


def load_split(bench: Benchmark, config: str, split: str, data_dir: str | Path | None = None,
               limit: int | None = None) -> Any:
    """One split of one config as a ``datasets.Dataset``, its columns and labels checked."""
    if split not in bench.splits:
        raise XlpeftValueError(f"{bench.name} has splits {', '.join(bench.splits)}; got {split!r}")
    hub_split = bench.splits[split]
    if data_dir is not None:
        data = _local(bench, config, data_dir)
        if hub_split not in data:
            raise CorruptFileError(f"the local {bench.name}/{config} data has splits {sorted(data)}; "
                                   f"{hub_split!r} is missing")
        rows = data[hub_split]
    else:
        rows = _from_hub(bench, config, hub_split)
    missing = [c for c in (*bench.columns, *(bench.label,) * bool(bench.label)) if c not in rows.column_names]
    if missing:
        raise CorruptFileError(f"{bench.name}/{config} {hub_split}: columns {missing} are missing (it has "
                               f"{rows.column_names}); is this the {bench.hub} schema?")
    _check_labels(bench, rows, config)
    return rows.select(range(min(int(limit), len(rows)))) if limit else rows


def _from_hub(bench: Benchmark, config: str, hub_split: str) -> Any:
    from datasets import load_dataset

    try:
        return load_dataset(bench.hub, config, split=hub_split, revision=bench.revision)
    except Exception as err:  # datasets raises many kinds (connection, missing config, offline cache miss)
        raise XlpeftValueError(
            f"cannot load {bench.hub} (config {config!r}, split {hub_split!r}) with datasets: "
            f"{type(err).__name__}: {str(err)[:200]}. Go online once, or pass `data_dir` with a local copy "
            "(save_benchmark writes one)") from err


def label_names(rows: Any, column: str) -> tuple[str, ...] | None:
    """The ClassLabel names of ``column`` (plain or per word); None when it holds strings."""
    feature = rows.features[column]
    feature = getattr(feature, "feature", feature)
    names = getattr(feature, "names", None)
    return tuple(names) if names else None


def _check_labels(bench: Benchmark, rows: Any, config: str) -> None:
    if bench.label is None:
        return
    names = label_names(rows, bench.label)
    if names is not None and names != bench.labels:
        raise CorruptFileError(f"{bench.name}/{config}: the data's label names {list(names)} differ from the "
                               f"benchmark's {list(bench.labels)}; label ids would mean other classes")


def _name(value: Any, names: tuple[str, ...] | None) -> str:
    return names[value] if names is not None and isinstance(value, int) else str(value)


def examples(bench: Benchmark, rows: Any, lang: str) -> list[Example]:
    """Rows in the Hub schema → xlpeft examples (unlabelled NLI rows, label −1, are skipped)."""
    names = label_names(rows, bench.label)
    out = []
    for row in rows:
        if bench.kind == "token-cls":
            words, tags = row[bench.columns[0]], row[bench.label]
            if words:
                out.append(Example(tuple(words), tuple(_name(t, names) for t in tags), lang))
        elif row[bench.label] != -1:
            out.append(Example(tuple(row[c] for c in bench.columns), _name(row[bench.label], names), lang))
    return out


def save_benchmark(name: str, config: str, data_dir: str | Path) -> Path:
    """Download one config of a benchmark (all its splits) into ``data_dir`` for offline use."""
    from datasets import DatasetDict

    bench = get_benchmark(name)
    folder = Path(data_dir).expanduser() / name / config
    DatasetDict({s: _from_hub(bench, config, s) for s in bench.splits.values()}).save_to_disk(str(folder))
    return folder


class BenchmarkDataModule(LabelledDataModule):
    """WikiANN, MasakhaNER, UD POS, XNLI or AmericasNLI: train in ``source_lang``, test in ``lang``.

    Args:
        benchmark: wikiann, masakhaner, udpos, xnli or americasnli.
        lang: Target language: the Hub config of the test split (a treebank such as sw_... for udpos).
        source_lang: Config of the training and validation splits (MAD-X: English).
        lang_code: Language code the test examples carry (routes them to their adapter; default: lang).
        source_code: Language code of training examples (default: source_lang).
        data_dir: Folder holding <benchmark>/<config>/ DatasetDicts (offline); null: the Hub.
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        max_length: Tokens per example (longer ones are truncated).
        batch_size: Examples per batch.
        max_examples: Examples read from each split (null = all).
        seed: Seed of the sampler.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, benchmark: str = "wikiann", lang: str = "sw", source_lang: str = "en",
                 lang_code: str | None = None, source_code: str | None = None, data_dir: str | None = None,
                 backbone: str = "embedded", max_length: int = 128, batch_size: int = 32,
                 max_examples: int | None = None, seed: int = 0, num_workers: int = 0) -> None:
        mine = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        bench = get_benchmark(benchmark)
        if bench.kind == "translation":
            raise XlpeftValueError(f"{benchmark!r} is a translation benchmark: use FloresDataModule")
        super().__init__(task="token-cls" if bench.kind == "token-cls" else "seq-cls", labels=bench.labels,
                         language=lang, backbone=backbone, max_length=max_length, batch_size=batch_size,
                         max_examples=max_examples, seed=seed, num_workers=num_workers)
        from xlpeft.data._common import save_data_hparams
        save_data_hparams(self, {**dict(self.hparams), **mine})
        self.bench = bench

    def _source(self) -> tuple[Benchmark, str]:
        bench = self.bench
        return (get_benchmark(bench.train_from), self.hparams.source_lang) if bench.train_from else \
            (bench, self.hparams.source_lang)

    def _where(self, split: str) -> tuple[Benchmark, str, str]:
        hp = self.hparams
        if split == "test":
            return self.bench, hp.lang, hp.lang_code or hp.lang
        bench, config = self._source()
        return bench, config, hp.source_code or config

    def _files(self, split: str) -> list[tuple[Path, str]]:
        bench, config, code = self._where(split)
        return [(Path(f"{bench.hub}:{config}:{bench.splits.get(split, split)}"), code)] \
            if split in bench.splits else []

    def examples(self, split: str) -> list[Example]:
        if split not in self._examples:
            bench, config, code = self._where(split)
            rows = load_split(bench, config, split, self.hparams.data_dir, self.hparams.max_examples)
            self._examples[split] = examples(bench, rows, code)
        return self._examples[split]

    def _dataset(self, split: str) -> list[dict[str, Any]]:
        if self.bench.kind != "pair-cls":
            return super()._dataset(split)
        self._check_labels(split)
        index = {name: i for i, name in enumerate(self.labels)}
        rows = self.examples(split)
        enc = self.tokenizer([r.text[0] for r in rows], [r.text[1] for r in rows], truncation=True,
                             max_length=self.hparams.max_length)
        return [{"input_ids": ids, "label": index[r.label], "lang": r.lang} for ids, r in zip(enc["input_ids"], rows)]


class FloresDataModule(ParallelDataModule):
    """ParallelDataModule whose validation and test pairs are FLORES-200 dev and devtest.

    Training pairs come from ``files`` or the embedded corpora as in ParallelDataModule.
    ``flores_codes`` maps each language of ``directions`` to its FLORES config
    (``{"eng": "eng_Latn", "swh": "swh_Latn"}``); codes that already look like one are kept.
    ``data_dir``: a folder holding flores/<code>/ DatasetDicts (offline); null: the Hub.
    """

    def __init__(self, directions: Sequence[str] = ("eng-swh",), flores_codes: Mapping[str, str] | None = None,
                 data_dir: str | None = None, **kwargs: Any) -> None:
        self.flores_codes = dict(flores_codes or {})
        self.data_dir = data_dir
        for lang in {x for d in directions for x in str(d).split("-")}:
            self.flores_code(lang)  # every language resolvable before anything loads
        super().__init__(directions=directions, **kwargs)

    def flores_code(self, lang: str) -> str:
        if lang in self.flores_codes:
            return self.flores_codes[lang]
        if "_" in lang:
            return lang
        raise XlpeftValueError(f"FloresDataModule needs the FLORES code of {lang!r}; give "
                               f"flores_codes: {{{lang}: <iso639-3>_<Script>}} (e.g. swh_Latn)")

    def _pairs(self, src: str, tgt: str, split: str, limit: int | None) -> list[Pair]:
        if split == "train" or f"{src}-{tgt}" in self.files:
            return super()._pairs(src, tgt, split, limit)
        bench = BENCHMARKS["flores"]
        sides = [load_split(bench, self.flores_code(lang), split, self.data_dir, limit) for lang in (src, tgt)]
        if len(sides[0]) != len(sides[1]):
            raise CorruptFileError(f"FLORES {split}: {src} has {len(sides[0])} sentences, {tgt} {len(sides[1])}; "
                                   "the two configs must come from one release")
        return [Pair(a, b, src, tgt) for a, b in zip(sides[0]["sentence"], sides[1]["sentence"])]
