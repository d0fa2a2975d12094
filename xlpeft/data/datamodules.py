"""LightningDataModules over the embedded corpora, text files and labelled files.

Every example carries its language code (``lang``) so modules can route it to
its own adapter. Training mixes languages with temperature sampling:
``p(lang) ∝ n_lang ** (1 / temperature)`` (1 = proportional, large = uniform).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Union

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from xlpeft.data._common import (
    check_batching, check_limit, check_max_length, check_temperature, save_data_hparams,
)
from xlpeft.data.collators import ClassificationCollator, MLMCollator
from xlpeft.data.packing import pack_dataset, packed_collator
from xlpeft.data.resume import ResumableData, eval_generator, resumable_loader
from xlpeft.errors import XlpeftValueError


def load_tokenizer(backbone: str) -> Any:
    from transformers import AutoTokenizer

    from xlpeft.backbones.embedded import backbone_path
    return AutoTokenizer.from_pretrained(backbone_path(backbone))


def tokenize(tokenizer: Any, texts: Sequence[str], langs: Sequence[str], max_length: int,
             extra: dict[str, Sequence[Any]] | None = None, word_ids: bool = False) -> Dataset:
    """A ``datasets.Dataset`` of token ids (truncated) with language codes."""
    columns: dict[str, Any] = {"text": list(texts), "lang": list(langs), **(extra or {})}
    data = Dataset.from_dict(columns)

    by_language = _encodes_by_language(tokenizer)

    def encode(rows: dict[str, list]) -> dict[str, list]:
        if by_language:  # the example's language picks its vocabulary, not a guess from its script
            enc = tokenizer.encode(rows["text"], rows["lang"], truncation=True, max_length=max_length)
        else:
            enc = tokenizer(rows["text"], truncation=True, max_length=max_length)
        out = {"input_ids": enc["input_ids"]}
        if word_ids:
            if not hasattr(enc, "word_ids"):
                raise XlpeftValueError(f"`whole_word` can be used with a fast Hugging Face tokenizer (it "
                                       f"gives word_ids); got {type(tokenizer).__name__}. Set whole_word=False")
            out["word_ids"] = [[-1 if w is None else w for w in enc.word_ids(i)]
                               for i in range(len(rows["text"]))]
        return out

    return data.map(encode, batched=True, remove_columns=["text"])


def _encodes_by_language(tokenizer: Any) -> bool:
    """True for tokenizers with ``encode(texts, langs)`` (``ScriptTokenizer``), not HF's ``encode(text, pair)``."""
    import inspect
    method = getattr(type(tokenizer), "encode", None)
    try:
        return method is not None and "langs" in inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False


def temperature_weights(langs: Sequence[str], temperature: float) -> torch.Tensor:
    """Per-example sampling weights giving ``p(lang) ∝ n_lang ** (1/T)``."""
    if temperature <= 0:
        raise XlpeftValueError(f"`temperature` must be > 0; got {temperature}")
    counts: dict[str, int] = {}
    for lang in langs:
        counts[lang] = counts.get(lang, 0) + 1
    mass = {lang: n ** (1.0 / temperature) for lang, n in counts.items()}
    total = sum(mass.values())
    return torch.tensor([mass[lang] / total / counts[lang] for lang in langs], dtype=torch.double)


def read_lines(path: str) -> list[str]:
    from xlpeft.data.corpora import read_text_file
    return read_text_file(path)


SPLITS = ("train", "validation", "test")
TextFiles = Union[str, dict[str, str]]
"""One file (train/validation/test cut from it) or ``{"train": path, "validation": path, "test": path}``."""


def read_split_files(spec: TextFiles, lang: str) -> dict[str, list[str]]:
    """Lines per split of a language's own text: one file cut 90/5/5 (in file order), or a file per split."""
    if isinstance(spec, dict):
        if set(spec) != set(SPLITS):
            raise XlpeftValueError(f"`files[{lang!r}]` can be one path or a mapping with exactly the keys "
                                   f"{', '.join(SPLITS)}; got keys {sorted(spec)}")
        return {split: read_lines(str(spec[split])) for split in SPLITS}  # an empty file is refused
    lines = read_lines(str(spec))
    if len(lines) < 3:
        raise XlpeftValueError(
            f"text file {spec} for {lang!r} has {len(lines)} line(s); it needs at least 3 (train, validation "
            "and test are cut from it), or give a file per split: {train: ..., validation: ..., test: ...}")
    cut = max(1, len(lines) // 20)  # the last 5% is test, the 5% before it validation
    return {"train": lines[:-2 * cut], "validation": lines[-2 * cut:-cut], "test": lines[-cut:]}


def check_languages(languages: Sequence[str], files: dict[str, TextFiles]) -> list[str]:
    """Languages as a non-empty list; every ``files`` key one of them (a typo would fall back to a corpus)."""
    if isinstance(languages, str):
        languages = [languages]
    languages = list(languages)
    if not languages:
        raise XlpeftValueError("`languages` can be a non-empty list of language codes such as ['eng', 'swh']; "
                               "got []")
    unknown = sorted(set(files) - set(languages))
    if unknown:
        raise XlpeftValueError(f"`files` keys can be the languages being trained ({', '.join(languages)}); got "
                               f"{', '.join(map(repr, unknown))}. Fix the key or add it to `languages` (a "
                               "language without a file reads the embedded corpus)")
    return languages


class MLMDataModule(ResumableData, L.LightningDataModule):
    """Monolingual text per language → dynamically masked, language-tagged batches.

    Args:
        languages: Language codes; each reads its file from `files` or else its embedded corpus.
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        files: Language code -> your own UTF-8 text file, one sentence or verse per line.
            The last 5% of its lines are the test split, the 5% before them validation,
            the rest training (in file order; at least 3 lines). Or a file per split:
            ``{train: a.txt, validation: b.txt, test: c.txt}``.
        max_length: Tokens per example (longer lines are truncated).
        batch_size: Examples per batch.
        max_train_lines: Training lines per language (null = all).
        max_eval_lines: Validation and test lines per language (null = all).
        temperature: Language sampling p(lang) ~ n_lang ** (1/T); 1 = proportional, large = uniform.
        whole_word: Mask whole words (all pieces of a word together).
        seed: Seed of the sampler and of the masks.
        num_workers: DataLoader worker processes.
        packing: Pack same-language training lines into rows of up to max_length tokens (a block
            mask and position ids per line: far fewer pad tokens, the same result per line).
            batch_size then counts packed rows; validation and test stay unpacked.
    """

    def __init__(self, languages: Sequence[str] = ("eng",), backbone: str = "embedded",
                 files: dict[str, TextFiles] | None = None, max_length: int = 64, batch_size: int = 16,
                 max_train_lines: int | None = 2000, max_eval_lines: int | None = 200,
                 temperature: float = 5.0, whole_word: bool = False, seed: int = 0,
                 num_workers: int = 0, packing: bool = False) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        if not isinstance(packing, bool):
            raise XlpeftValueError(f"`packing` can be true or false; got {packing!r}")
        self.files = dict(files or {})
        self.languages = check_languages(languages, self.files)
        for name in ("max_train_lines", "max_eval_lines"):
            check_limit(name, init_args[name])
        check_max_length(max_length)
        check_batching(batch_size, num_workers)
        check_temperature(temperature)
        self.tokenizer = None

    def _texts(self, lang: str, split: str, limit: int | None) -> list[str]:
        if lang in self.files:
            lines = read_split_files(self.files[lang], lang)[split]
            return lines[:limit] if limit else lines
        from xlpeft.data.corpora import corpus_text
        return corpus_text(lang, split=split, max_lines=limit)

    def _dataset(self, split: str, limit: int | None) -> Dataset:
        texts, langs = [], []
        for lang in self.languages:
            lines = self._texts(lang, split, limit)
            texts += lines
            langs += [lang] * len(lines)
        return tokenize(self.tokenizer, texts, langs, self.hparams.max_length,
                        word_ids=self.hparams.whole_word)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.backbone)
        tok = self.tokenizer
        self.collator = MLMCollator(
            mask_id=tok.mask_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
            special_ids=tuple(tok.all_special_ids), whole_word=self.hparams.whole_word,
            language_ids=tok.new_vocabulary_ids() if hasattr(type(tok), "new_vocabulary_ids") else None,
        )
        if self.hparams.packing:  # plain rows (validation, test) are collated as before
            self.collator = packed_collator(self.collator, self.hparams.backbone)
        if stage in (None, "fit"):
            self.train_set = self._dataset("train", self.hparams.max_train_lines)
            if self.hparams.packing:
                self.train_set = pack_dataset(self.train_set, self.hparams.max_length)
        self.val_set = self._dataset("validation", self.hparams.max_eval_lines)
        self.test_set = self._dataset("test", self.hparams.max_eval_lines)

    def _check_maskable(self, data: Dataset, special: tuple[int, ...]) -> None:
        """Refuse a language none of whose lines has a token to mask (its loss would be NaN)."""
        usable: dict[str, int] = dict.fromkeys(self.languages, 0)
        special_ids = set(special)
        for ids, lang in zip(data["input_ids"], data["lang"]):
            usable[lang] += any(i not in special_ids for i in ids)
        empty = [lang for lang, n in usable.items() if n == 0]
        if empty:
            where = ", ".join(f"{lang} ({self.files.get(lang, 'embedded corpus')})" for lang in empty)
            raise XlpeftValueError(
                f"the training lines of {where} can be masked-LM data only if they hold some text token; every "
                "line tokenizes to special tokens alone (text of only zero-width, control or unknown characters?). "
                "Check the file's contents and encoding, or drop the language")

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        # checked here, not in setup: a callback may re-tokenize (a new vocabulary) after setup
        self._check_maskable(self.train_set, tuple(self.collator.special_ids))
        weights = temperature_weights(self.train_set["lang"], hp.temperature) if len(self.train_set) else None
        return resumable_loader(self.train_set, hp.batch_size, hp.seed, self.collator, hp.num_workers,
                                weights=weights, position=self.take_position())

    def _eval_loader(self, data: Dataset) -> DataLoader:
        # same masks every evaluation: the loader is built once and re-run at each validation
        collator = dataclasses.replace(self.collator, generator=None, seed=1234)
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collator,
                          num_workers=self.hparams.num_workers, generator=eval_generator(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class GenreDataModule(ResumableData, L.LightningDataModule):
    """Bible verse → genre of its book; train in one language, evaluate in many.

    Args:
        train_language: Bible language the task is trained in.
        eval_languages: Bible languages evaluated (zero-shot for all but the training one).
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        max_length: Tokens per verse (longer verses are truncated).
        batch_size: Verses per batch.
        max_per_genre: Training verses per genre (null = all).
        max_eval_per_genre: Validation and test verses per genre and language (null = all).
        seed: Seed of the verse selection and the sampler.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, train_language: str = "eng", eval_languages: Sequence[str] = ("eng",),
                 backbone: str = "embedded", max_length: int = 64, batch_size: int = 32,
                 max_per_genre: int | None = 200, max_eval_per_genre: int | None = 40,
                 seed: int = 0, num_workers: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        for name in ("max_per_genre", "max_eval_per_genre"):
            check_limit(name, init_args[name])
        check_max_length(max_length)
        check_batching(batch_size, num_workers)
        if not list(eval_languages):
            raise XlpeftValueError("`eval_languages` can be a non-empty list of language codes; got []")
        self.tokenizer = None

    def _dataset(self, langs: Sequence[str], split: str, per_genre: int | None) -> Dataset:
        from xlpeft.data.genre import GENRES, genre_examples
        rows = [r for lang in langs
                for r in genre_examples(lang, split, max_per_genre=per_genre, seed=self.hparams.seed)]
        label_of = {g: i for i, g in enumerate(GENRES)}
        return tokenize(self.tokenizer, [r["text"] for r in rows], [r["lang"] for r in rows],
                        self.hparams.max_length, extra={"label": [label_of[r["label"]] for r in rows]})

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.backbone)
        self.collator = ClassificationCollator(pad_id=self.tokenizer.pad_token_id)
        hp = self.hparams
        if stage in (None, "fit"):
            self.train_set = self._dataset([hp.train_language], "train", hp.max_per_genre)
        self.val_set = self._dataset([hp.train_language], "validation", hp.max_eval_per_genre)
        self.test_set = self._dataset(list(hp.eval_languages), "test", hp.max_eval_per_genre)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return resumable_loader(self.train_set, hp.batch_size, hp.seed, self.collator, hp.num_workers,
                                position=self.take_position())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=self.collator,
                          num_workers=self.hparams.num_workers, generator=eval_generator(self.hparams.seed))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size, collate_fn=self.collator,
                          num_workers=self.hparams.num_workers, generator=eval_generator(self.hparams.seed))
