"""Labelled files → a DataModule for sequence or token classification.

Three formats, told apart by suffix (or ``format=``):

==========  =====================================================  ==============
format      one example                                            tasks
==========  =====================================================  ==============
tsv         ``text<TAB>label[<TAB>lang]`` (token task: words and   seq-cls,
            tags space-separated); optional header line            token-cls
jsonl       ``{"text", "label", "lang"}`` or                       seq-cls,
            ``{"tokens", "tags", "lang"}``                         token-cls
conllu      word forms + UPOS (``xlpeft.data.conllu``)             token-cls
==========  =====================================================  ==============

Each split is one file or ``{language: file}``; an example's language is its
own ``lang`` field, else its file's language, else ``language``. The label
list is fixed by the training file (sorted) unless given; labels in other
splits that training never saw are an error. Token tags go to each word's
first sub-word; other pieces and special tokens get -100.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import lightning as L
from torch.utils.data import DataLoader

from xlpeft.data._common import (MissingFileError, check_batching, check_limit, check_max_length, read_utf8,
                                 save_data_hparams, split_lines)
from xlpeft.data.collators import IGNORE, ClassificationCollator
from xlpeft.data.resume import ResumableData, eval_generator, resumable_loader
from xlpeft.errors import CorruptFileError, XlpeftValueError

FORMATS = {".tsv": "tsv", ".jsonl": "jsonl", ".conllu": "conllu"}
"""File suffix → format."""
TASKS = ("seq-cls", "token-cls")
Files = Union[str, Mapping[str, str], None]
"""A split: one file, ``{language: file}``, or nothing."""


@dataclass(frozen=True)
class Example:
    """One labelled example before tokenization."""

    text: str | tuple[str, ...]
    """The sentence (seq-cls) or its words (token-cls)."""
    label: str | tuple[str, ...]
    """Its class, or one tag per word."""
    lang: str
    """Language code, used to route the example to its language adapter."""


def file_format(path: Path, given: str | None = None) -> str:
    """The format of ``path``: ``given`` if set, else from the suffix."""
    if given is not None:
        if given not in FORMATS.values():
            raise XlpeftValueError(f"`format` can be {', '.join(FORMATS.values())}; got {given!r}")
        return given
    if path.suffix.lower() not in FORMATS:
        raise XlpeftValueError(
            f"{path}: the file format can be {', '.join(FORMATS.values())} (suffixes "
            f"{', '.join(FORMATS)}); got suffix {path.suffix or '(none)'!r}. Rename the file or pass `format`")
    return FORMATS[path.suffix.lower()]


def _lines(path: Path) -> list[tuple[int, str]]:
    if not path.is_file():
        raise MissingFileError(f"labelled file {path} does not exist; check the path "
                               f"(relative paths start at {Path.cwd()})")
    rows = list(enumerate(split_lines(read_utf8(path, "labelled file")), 1))
    return [(n, line) for n, line in rows if line.strip()]


def _words_and_tags(words: Any, tags: Any, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    words, tags = tuple(str(w) for w in words), tuple(str(t) for t in tags)
    if len(words) != len(tags) or not words:
        raise CorruptFileError(f"{where}: a token example needs one tag per word; got "
                               f"{len(words)} words and {len(tags)} tags")
    return words, tags


def _read_tsv(path: Path, task: str, lang: str) -> list[Example]:
    out = []
    for lineno, line in _lines(path):
        cols = line.split("\t")
        if lineno == 1 and cols[0].strip().lower() in ("text", "tokens", "words"):
            continue  # a header line
        if len(cols) not in (2, 3):
            raise CorruptFileError(
                f"{path}:{lineno}: a TSV line has 2 or 3 tab-separated columns (text, label[, lang]); "
                f"got {len(cols)}: {line[:80]!r}")
        row_lang = cols[2].strip() if len(cols) == 3 and cols[2].strip() else lang
        if task == "token-cls":
            words, tags = _words_and_tags(cols[0].split(), cols[1].split(), f"{path}:{lineno}")
            out.append(Example(words, tags, row_lang))
        else:
            out.append(Example(cols[0].strip(), cols[1].strip(), row_lang))
    return out


def _read_jsonl(path: Path, task: str, lang: str) -> list[Example]:
    keys = ("tokens", "tags") if task == "token-cls" else ("text", "label")
    out = []
    for lineno, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorruptFileError(f"{path}:{lineno}: not a JSON object ({exc.msg}): {line[:80]!r}") from exc
        if not isinstance(row, dict) or any(k not in row for k in keys):
            have = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise CorruptFileError(f"{path}:{lineno}: a {task} JSONL line needs keys {list(keys)} "
                                   f"(and optionally 'lang'); got {have}")
        row_lang = str(row.get("lang") or lang)
        if task == "token-cls":
            words, tags = _words_and_tags(row["tokens"], row["tags"], f"{path}:{lineno}")
            out.append(Example(words, tags, row_lang))
        else:
            out.append(Example(str(row["text"]), str(row["label"]), row_lang))
    return out


def _read_conllu(path: Path, task: str, lang: str) -> list[Example]:
    from xlpeft.data.conllu import read_conllu

    if task != "token-cls":
        raise XlpeftValueError(f"{path}: a CoNLL-U file holds word tags (UPOS); use task='token-cls', got {task!r}")
    if not path.is_file():
        raise MissingFileError(f"labelled file {path} does not exist; check the path")
    return [Example(s.forms, s.upos, lang) for s in read_conllu(path)]


_READERS = {"tsv": _read_tsv, "jsonl": _read_jsonl, "conllu": _read_conllu}


def read_examples(path: str | Path, task: str = "seq-cls", lang: str = "eng",
                  format: str | None = None, limit: int | None = None) -> list[Example]:
    """The examples of one labelled file (the first ``limit`` of them)."""
    if task not in TASKS:
        raise XlpeftValueError(f"`task` can be {', '.join(TASKS)}; got {task!r}")
    path = Path(path)
    rows = _READERS[file_format(path, format)](path, task, lang)
    if not rows:
        raise CorruptFileError(f"{path}: no examples (the file is empty); give a file with labelled lines")
    return rows[:limit] if limit else rows


def label_set(examples: Sequence[Example]) -> list[str]:
    """Sorted distinct labels (or tags) of ``examples``."""
    found: set[str] = set()
    for ex in examples:
        found.update([ex.label] if isinstance(ex.label, str) else ex.label)
    return sorted(found)


def encode(tokenizer: Any, examples: Sequence[Example], labels: Sequence[str], max_length: int,
           task: str) -> list[dict[str, Any]]:
    """Token ids and label ids per example (token tags on each word's first piece)."""
    index = {name: i for i, name in enumerate(labels)}
    if task == "seq-cls":
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=max_length)
        return [{"input_ids": ids, "label": index[ex.label], "lang": ex.lang}
                for ids, ex in zip(enc["input_ids"], examples)]
    enc = tokenizer([list(ex.text) for ex in examples], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    out = []
    for i, ex in enumerate(examples):
        seen: set[int] = set()
        tags = []
        for word in enc.word_ids(i):
            first = word is not None and word not in seen
            tags.append(index[ex.label[word]] if first else IGNORE)
            if word is not None:
                seen.add(word)
        out.append({"input_ids": enc["input_ids"][i], "label": tags, "lang": ex.lang})
    return out


class LabelledDataModule(ResumableData, L.LightningDataModule):
    """Train/validation/test labelled files (TSV, JSONL, CoNLL-U) → classification batches.

    Pass the same ``labels`` (or ``dm.labels`` after construction) to
    ``TaskAdaptation(labels=...)`` so label ids agree.

    Args:
        train: Training file (TSV, JSONL or CoNLL-U), or language -> file.
        val: Validation file, or language -> file.
        test: Test file, or language -> file (one result per language).
        task: "seq-cls" (a label per text) or "token-cls" (a tag per word).
        labels: Label names in id order (default: the training file's labels, sorted).
        language: Language of examples with no `lang` field and no per-language file.
        format: tsv, jsonl or conllu (default: from each file's suffix).
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        max_length: Tokens per example (longer ones are truncated).
        batch_size: Examples per batch.
        max_examples: Examples read from each file (null = all).
        seed: Seed of the sampler.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, train: Files = None, val: Files = None, test: Files = None,
                 task: str = "seq-cls", labels: Sequence[str] | None = None, language: str = "eng",
                 format: str | None = None, backbone: str = "embedded", max_length: int = 128,
                 batch_size: int = 32, max_examples: int | None = None, seed: int = 0,
                 num_workers: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        if task not in TASKS:
            raise XlpeftValueError(f"`task` can be {', '.join(TASKS)}; got {task!r}")
        if train is None and not labels:
            raise XlpeftValueError("give a `train` file (the label list is read from it) or `labels`")
        check_limit("max_examples", max_examples)
        check_max_length(max_length)
        check_batching(batch_size, num_workers)
        self.tokenizer = None
        self._examples: dict[str, list[Example]] = {}
        self._labels = list(labels) if labels else None

    def _files(self, split: str) -> list[tuple[Path, str]]:
        given = {"train": self.hparams.train, "validation": self.hparams.val, "test": self.hparams.test}[split]
        if given is None:
            return []
        if isinstance(given, Mapping):
            return [(Path(path), lang) for lang, path in given.items()]
        return [(Path(given), self.hparams.language)]

    def examples(self, split: str) -> list[Example]:
        """Parsed (untokenized) examples of a split, read once."""
        if split not in self._examples:
            hp = self.hparams
            self._examples[split] = [ex for path, lang in self._files(split)
                                     for ex in read_examples(path, hp.task, lang, hp.format, hp.max_examples)]
        return self._examples[split]

    @property
    def labels(self) -> list[str]:
        """The label list: given, or the sorted labels of the training file."""
        if self._labels is None:
            self._labels = label_set(self.examples("train"))
            if len(self._labels) < 2:
                raise XlpeftValueError(f"{self.hparams.train}: training data has labels {self._labels}; "
                                       "a classifier needs at least two")
        return self._labels

    def _check_labels(self, split: str) -> None:
        unseen = sorted(set(label_set(self.examples(split))) - set(self.labels))
        if unseen:
            origin = "`labels`" if self.hparams.labels else f"the training data ({self.hparams.train})"
            files = ", ".join(str(p) for p, _ in self._files(split))
            raise XlpeftValueError(
                f"{files}: labels {unseen} in the {split} data do not occur in {origin}, whose labels are "
                f"{self.labels}; add them to `labels` (here and in the model) if they are real classes")

    def _dataset(self, split: str) -> list[dict[str, Any]]:
        self._check_labels(split)
        hp = self.hparams
        return encode(self.tokenizer, self.examples(split), self.labels, hp.max_length, hp.task)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            from xlpeft.data.datamodules import load_tokenizer
            self.tokenizer = load_tokenizer(self.hparams.backbone)
        self.collator = ClassificationCollator(pad_id=self.tokenizer.pad_token_id)
        wanted = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",),
                  "predict": ("test",)}.get(stage or "", ("train", "validation", "test"))
        self.datasets = {split: self._dataset(split) for split in wanted if self._files(split)}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader | list:
        if split not in getattr(self, "datasets", {}):
            if split == "validation":
                return []  # no validation file: fit runs without validation
            raise XlpeftValueError(f"no {split} data: give LabelledDataModule a `{split}` file "
                                   "(or {language: file})")
        hp = self.hparams
        if shuffle:
            return resumable_loader(self.datasets[split], hp.batch_size, hp.seed, self.collator, hp.num_workers,
                                    position=self.take_position())
        return DataLoader(self.datasets[split], batch_size=hp.batch_size, generator=eval_generator(hp.seed),
                          collate_fn=self.collator, num_workers=hp.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
