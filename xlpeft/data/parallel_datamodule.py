"""``ParallelDataModule``: translation batches mixing directions, tagged with languages.

Each direction (``"spa-nah"``) reads files (``files``) or an embedded corpus;
training samples directions with temperature ``T``: ``p(dir) ∝ n_dir ** (1/T)``
(1 = proportional to size, large = uniform), so small directions are not
drowned. ``denoise`` adds monolingual pairs (noised text → text, in one
language) for denoising language adapters (Üstün et al. 2021, "Multilingual
Unsupervised Neural Machine Translation with Denoising Adapters", EMNLP).
Every batch keeps ``src_langs``/``tgt_langs`` so a module routes the encoder
by source and the decoder by target, and ``references`` (raw target text)
for BLEU/chrF.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from xlpeft.data._common import (
    check_batching, check_limit, check_max_length, check_temperature, save_data_hparams,
)
from xlpeft.data.datamodules import temperature_weights
from xlpeft.data.parallel import Pair, Seq2SeqCollator, Seq2SeqFormat, corpus_pairs, encode_pairs, parse_direction
from xlpeft.data.resume import ResumableData, eval_generator, resumable_loader
from xlpeft.errors import XlpeftValueError

SPLITS = ("train", "validation", "test")


def add_noise(text: str, seed: int, drop: float = 0.1, mask: float = 0.1, mask_token: str = "",
              shuffle_window: int = 3) -> str:
    """Word dropout, word masking and local shuffling (fixed by ``seed``)."""
    rng = random.Random(seed)
    words = text.split()
    out = []
    for word in words:
        x = rng.random()
        if x < drop and len(words) > 1:
            continue
        out.append(mask_token if x < drop + mask and mask_token else word)
    keys = [i + rng.uniform(0, shuffle_window) for i in range(len(out))]
    return " ".join(w for _, w in sorted(zip(keys, out), key=lambda kw: kw[0])) or text


class ParallelDataModule(ResumableData, L.LightningDataModule):
    """Parallel text for several directions (files or embedded corpora) → seq2seq batches."""

    def __init__(self, directions: Sequence[str] = ("spa-eng",), backbone: str = "embedded",
                 files: Mapping[str, Mapping[str, Any]] | None = None, source: str = "auto",
                 denoise: Sequence[str] = (), max_length: int = 64, batch_size: int = 16,
                 max_train_pairs: int | None = 2000, max_eval_pairs: int | None = 100,
                 temperature: float = 5.0, lang_tokens: Mapping[str, str] | None = None,
                 seed: int = 0, num_workers: int = 0) -> None:
        """Parallel text for several directions.

        Args:
            directions: Directions as src-tgt (spa-nah).
            backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
            files: Direction -> {split: path or [src_file, tgt_file]} (TSV, JSONL, line-aligned
                file pairs or a datasets folder).
            source: Embedded corpus for directions without files: auto, bible, elotl, quran.
            denoise: Languages whose monolingual text trains denoising (text -> same text).
            max_length: Tokens per side (longer pairs are truncated).
            batch_size: Pairs per batch.
            max_train_pairs: Training pairs per direction (null = all).
            max_eval_pairs: Validation and test pairs per direction (null = all).
            temperature: Direction sampling p ~ n ** (1/T); 1 = proportional, large = uniform.
            lang_tokens: Language code -> token used as its tag (the model follows this).
            seed: Seed of the sampler.
            num_workers: DataLoader worker processes.
        """
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        save_data_hparams(self, init_args)
        self.directions = [parse_direction(d) for d in directions]
        self.denoise = list(denoise)
        if not self.directions and not self.denoise:
            raise XlpeftValueError("`directions` or `denoise` must name at least one direction or language")
        self.files = {k: dict(v) for k, v in (files or {}).items()}
        self._check_files([f"{s}-{t}" for s, t in self.directions])
        for name in ("max_train_pairs", "max_eval_pairs"):
            check_limit(name, init_args[name])
        check_max_length(max_length)
        check_batching(batch_size, num_workers)
        check_temperature(temperature)
        self.format: Seq2SeqFormat | None = None

    def _check_files(self, directions: list[str]) -> None:
        """Every ``files`` key a direction being trained, every split key a split name."""
        for key, splits in self.files.items():
            parse_direction(key)
            if key not in directions:
                raise XlpeftValueError(f"`files` keys can be the directions given ({', '.join(directions)}); got "
                                       f"{key!r}. Fix the key or add it to `directions` (a direction without "
                                       "files reads the embedded corpus)")
            wrong = sorted(set(splits) - set(SPLITS))
            if wrong:
                raise XlpeftValueError(f"`files[{key!r}]` keys can be {', '.join(SPLITS)}; got "
                                       f"{', '.join(map(repr, wrong))}")

    # ------------------------------------------------------------------ data
    def _pairs(self, src: str, tgt: str, split: str, limit: int | None) -> list[Pair]:
        key = f"{src}-{tgt}"
        if key in self.files:
            from xlpeft.data.parallel import read_pairs
            if split not in self.files[key]:
                return []
            pairs = read_pairs(self.files[key][split], src, tgt)
        else:
            pairs = corpus_pairs(src, tgt, split, self.hparams.source)
        return _spread(pairs, limit)

    def _denoising(self, lang: str, split: str, limit: int | None) -> list[Pair]:
        from xlpeft.data.corpora import corpus_text
        mask = getattr(self.format.tokenizer, "mask_token", None) or ""
        lines = corpus_text(lang, split=split, max_lines=limit)
        return [Pair(add_noise(t, hash((self.hparams.seed, i)) & 0xFFFF, mask_token=mask), t, lang, lang)
                for i, t in enumerate(lines)]

    def pairs(self, split: str) -> list[Pair]:
        """Every pair of ``split`` over all directions (and denoising languages)."""
        limit = self.hparams.max_train_pairs if split == "train" else self.hparams.max_eval_pairs
        out = [p for s, t in self.directions for p in self._pairs(s, t, split, limit)]
        out += [p for lang in self.denoise for p in self._denoising(lang, split, limit)]
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.format is None:
            from xlpeft.backbones.embedded import backbone_path
            self.format = Seq2SeqFormat.from_backbone(backbone_path(self.hparams.backbone),
                                                      self.hparams.lang_tokens)
        tok = self.format.tokenizer
        self.collator = Seq2SeqCollator(pad_id=tok.pad_token_id)
        splits = SPLITS if stage in (None, "fit") else SPLITS[1:]
        if "train" in splits:
            self._check_train_files()
        self.sets = {s: encode_pairs(self.format, self.pairs(s), self.hparams.max_length, s) for s in splits}

    def _check_train_files(self) -> None:
        """Training needs a train file for each direction read from files (else it has no pairs)."""
        lacking = sorted(key for key, splits in self.files.items() if "train" not in splits)
        if lacking:
            raise XlpeftValueError(f"`files` for {', '.join(map(repr, lacking))} can train only with a 'train' "
                                   f"entry; got {', '.join(f'{k}: {sorted(self.files[k])}' for k in lacking)}. "
                                   "Add {'train': path} (or drop the direction's files to use the embedded corpus)")

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        data, hp = self.sets["train"], self.hparams
        weights = temperature_weights([f"{r['src_lang']}-{r['tgt_lang']}" for r in data], hp.temperature) \
            if data else None
        return resumable_loader(data, hp.batch_size, hp.seed, self.collator, hp.num_workers, weights=weights,
                                position=self.take_position())

    def _eval(self, split: str) -> DataLoader:
        return DataLoader(self.sets[split], batch_size=self.hparams.batch_size, collate_fn=self.collator,
                          num_workers=self.hparams.num_workers, generator=eval_generator(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval("test")


def _spread(pairs: list[Pair], k: int | None) -> list[Pair]:
    from xlpeft.data.corpora import spread
    return pairs if k is None else spread(pairs, int(k))
