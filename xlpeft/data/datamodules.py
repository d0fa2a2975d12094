"""LightningDataModules over the embedded corpora, text files and labelled files.

Every example carries its language code (``lang``) so modules can route it to
its own adapter. Training mixes languages with temperature sampling:
``p(lang) ∝ n_lang ** (1 / temperature)`` (1 = proportional, large = uniform).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, WeightedRandomSampler

from xlpeft.data.collators import ClassificationCollator, MLMCollator
from xlpeft.errors import XlpeftValueError
from xlpeft.data._common import save_data_hparams


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


class MLMDataModule(L.LightningDataModule):
    """Monolingual text per language → dynamically masked, language-tagged batches."""

    def __init__(self, languages: Sequence[str] = ("eng",), backbone: str = "embedded",
                 files: dict[str, str] | None = None, max_length: int = 64, batch_size: int = 16,
                 max_train_lines: int | None = 2000, max_eval_lines: int | None = 200,
                 temperature: float = 5.0, whole_word: bool = False, seed: int = 0,
                 num_workers: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        self.languages = list(languages)
        self.files = files or {}
        self.tokenizer = None

    def _texts(self, lang: str, split: str, limit: int | None) -> list[str]:
        if lang in self.files:
            lines = read_lines(self.files[lang])
            cut = max(1, len(lines) // 20)  # the last 5% is test, the 5% before it validation
            if len(lines) < 3:
                raise XlpeftValueError(
                    f"text file {self.files[lang]} for {lang!r} has {len(lines)} line(s); it needs at "
                    "least 3 (train, validation and test are cut from it)")
            lines = {"train": lines[:-2 * cut], "validation": lines[-2 * cut:-cut], "test": lines[-cut:]}[split]
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
        if stage in (None, "fit"):
            self.train_set = self._dataset("train", self.hparams.max_train_lines)
        self.val_set = self._dataset("validation", self.hparams.max_eval_lines)
        self.test_set = self._dataset("test", self.hparams.max_eval_lines)

    def train_dataloader(self) -> DataLoader:
        weights = temperature_weights(self.train_set["lang"], self.hparams.temperature)
        sampler = WeightedRandomSampler(weights, num_samples=len(weights),
                                        generator=torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=self.collator, num_workers=self.hparams.num_workers)

    def _eval_loader(self, data: Dataset) -> DataLoader:
        # same masks every evaluation: the loader is built once and re-run at each validation
        collator = MLMCollator(**{**self.collator.__dict__, "generator": None, "seed": 1234})
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=collator,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class GenreDataModule(L.LightningDataModule):
    """Bible verse → genre of its book; train in one language, evaluate in many."""

    def __init__(self, train_language: str = "eng", eval_languages: Sequence[str] = ("eng",),
                 backbone: str = "embedded", max_length: int = 64, batch_size: int = 32,
                 max_per_genre: int | None = 200, max_eval_per_genre: int | None = 40,
                 seed: int = 0, num_workers: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
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
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True,
                          collate_fn=self.collator, num_workers=self.hparams.num_workers,
                          generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size,
                          collate_fn=self.collator, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size,
                          collate_fn=self.collator, num_workers=self.hparams.num_workers)
