"""BAD-X: bilingual language adapters, one per transfer pair, trained by masked LM on both languages.

Parović, Glavaš, Vulić & Korhonen 2022, "BAD-X: Bilingual Adapters Improve
Zero-Shot Cross-Lingual Transfer" (NAACL). Instead of one monolingual adapter
per language (MAD-X), each transfer pair ``src-tgt`` gets one adapter trained
by MLM on text of *both* languages; the task adapter is trained above it on
source data and the same bilingual adapter sits under it at target time.

    pair "eng-swh" ─► adapter "eng_swh" ◄─ MLM on eng lines (share s) + swh lines (1 − s)
    task time:    Stack("eng_swh", task) on eng data
    transfer:     Stack("eng_swh", task) on swh data

One run trains several pairs: each example carries its pair (``pairs``
beside ``langs`` in the batch) and is routed to that pair's adapter, so a
source language shared by two pairs feeds both adapters, each from its own
draws. ``source_share`` is the per-pair sampling ratio (share of a pair's
draws that are source-language lines); pairs are mixed by temperature over
their line counts, as languages are in ``MLMDataModule``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader

from xlpeft.core.composition import Setup
from xlpeft.data.datamodules import MLMDataModule, tokenize
from xlpeft.data.parallel import parse_direction
from xlpeft.data.resume import eval_generator, resumable_loader
from xlpeft.errors import XlpeftValueError
from xlpeft.lightning.mlm import MaskedLMAdaptation, language_sums


def pair_adapter(pair: str) -> str:
    """Adapter name of the bilingual adapter of ``"src-tgt"``: ``"src_tgt"``."""
    src, tgt = parse_direction(pair)
    if src == tgt:
        raise XlpeftValueError(f"a bilingual pair can join two different languages such as 'eng-swh'; got {pair!r}")
    return f"{src}_{tgt}"


def check_pairs(pairs: Sequence[str]) -> list[str]:
    """Pairs as a non-empty, duplicate-free list of ``src-tgt`` strings (each parsed, so checked)."""
    pairs = [pairs] if isinstance(pairs, str) else list(pairs)
    if not pairs:
        raise XlpeftValueError("`pairs` can be a non-empty list of 'src-tgt' pairs such as ['eng-swh']; got []")
    names = [pair_adapter(p) for p in pairs]
    if len(set(names)) != len(names):
        raise XlpeftValueError(f"`pairs` can name each pair once; got {pairs}")
    return pairs


def pair_languages(pairs: Sequence[str]) -> list[str]:
    """Every language of ``pairs``, first-seen order."""
    return list(dict.fromkeys(lang for p in pairs for lang in parse_direction(p)))


def check_shares(pairs: Sequence[str], source_share: float | Mapping[str, float]) -> dict[str, float]:
    """``source_share`` per pair (one number for all, or a pair → share mapping), each in (0, 1)."""
    if isinstance(source_share, Mapping):
        unknown = sorted(set(source_share) - set(pairs))
        if unknown:
            raise XlpeftValueError(f"`source_share` keys can be the pairs ({', '.join(pairs)}); got {unknown}")
        shares = {p: float(source_share.get(p, 0.5)) for p in pairs}
    else:
        shares = dict.fromkeys(pairs, float(source_share))
    bad = {p: s for p, s in shares.items() if not 0.0 < s < 1.0}
    if bad:
        raise XlpeftValueError(f"`source_share` can be a share of source lines in (0, 1) (0.5 = balanced); "
                               f"got {bad}. A pair trained on one language alone is a MAD-X adapter")
    return shares


def pair_weights(pair_of: Sequence[str], langs: Sequence[str], shares: Mapping[str, float],
                 temperature: float) -> torch.Tensor:
    """Per-example weights: pairs ∝ n_pair^(1/T), in a pair ``share`` / ``1 − share`` for source / target."""
    counts: dict[tuple[str, str], int] = {}
    for pair, lang in zip(pair_of, langs, strict=True):
        counts[(pair, lang)] = counts.get((pair, lang), 0) + 1
    sizes: dict[str, int] = {}
    for (pair, _), n in counts.items():
        sizes[pair] = sizes.get(pair, 0) + n
    mass = {p: n ** (1.0 / temperature) for p, n in sizes.items()}
    total = sum(mass.values())
    out = []
    for pair, lang in zip(pair_of, langs):
        src = parse_direction(pair)[0]
        within = shares[pair] if lang == src else 1.0 - shares[pair]
        out.append(mass[pair] / total * within / counts[(pair, lang)])
    return torch.tensor(out, dtype=torch.double)


class PairCollator:
    """An MLM collator's batch plus ``pairs``: each example's pair (its adapter name)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(rows)
        batch["pairs"] = [r["pair"] for r in rows]
        return batch


class BilingualMLMDataModule(MLMDataModule):
    """Masked-LM batches for bilingual adapters: each line tagged with its language and its pair.

    Args:
        pairs: Transfer pairs "src-tgt" (e.g. ["eng-swh", "eng-tgl"]), one bilingual adapter each.
        source_share: Share of a pair's training draws from its source language, in (0, 1):
            one number for every pair, or pair -> share.
        backbone: Model whose tokenizer is used; under `xlpeft fit` it follows the model's.
        files: Language code -> your own UTF-8 text file (else the embedded corpus).
        max_length: Tokens per example.
        batch_size: Examples per batch.
        max_train_lines: Training lines per language (null = all).
        max_eval_lines: Validation and test lines per language (null = all).
        temperature: Pair sampling p(pair) ~ n_pair ** (1/T).
        whole_word: Mask whole words.
        seed: Seed of the sampler and of the masks.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, pairs: Sequence[str] = ("eng-swh",), source_share: float | dict[str, float] = 0.5,
                 backbone: str = "embedded", files: dict[str, str] | None = None, max_length: int = 64,
                 batch_size: int = 16, max_train_lines: int | None = 2000, max_eval_lines: int | None = 200,
                 temperature: float = 5.0, whole_word: bool = False, seed: int = 0,
                 num_workers: int = 0) -> None:
        self.pairs = check_pairs(pairs)
        self.shares = check_shares(self.pairs, source_share)
        super().__init__(languages=pair_languages(self.pairs), backbone=backbone, files=files,
                         max_length=max_length, batch_size=batch_size, max_train_lines=max_train_lines,
                         max_eval_lines=max_eval_lines, temperature=temperature, whole_word=whole_word,
                         seed=seed, num_workers=num_workers)
        self.save_hyperparameters({"pairs": self.pairs, "source_share": source_share}, logger=False)

    def _dataset(self, split: str, limit: int | None) -> Dataset:
        """Each pair's source and target lines (a language in two pairs appears once per pair)."""
        parts = []
        for pair in self.pairs:
            texts, langs = [], []
            for lang in parse_direction(pair):
                lines = self._texts(lang, split, limit)
                texts += lines
                langs += [lang] * len(lines)
            parts.append(tokenize(self.tokenizer, texts, langs, self.hparams.max_length,
                                  extra={"pair": [pair_adapter(pair)] * len(texts)},
                                  word_ids=self.hparams.whole_word))
        return concatenate_datasets(parts)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        self._check_maskable(self.train_set, tuple(self.collator.special_ids))
        pair_of = {pair_adapter(p): p for p in self.pairs}
        weights = pair_weights([pair_of[n] for n in self.train_set["pair"]], self.train_set["lang"],
                               self.shares, hp.temperature)
        return resumable_loader(self.train_set, hp.batch_size, hp.seed, PairCollator(self.collator),
                                hp.num_workers, weights=weights, position=self.take_position())

    def _eval_loader(self, data: Dataset) -> DataLoader:
        loader = super()._eval_loader(data)  # fixed masks, as for monolingual MLM
        return DataLoader(data, batch_size=self.hparams.batch_size, collate_fn=PairCollator(loader.collate_fn),
                          num_workers=self.hparams.num_workers, generator=eval_generator(self.hparams.seed))


class BilingualMLM(MaskedLMAdaptation):
    """Train one bilingual language adapter per pair by masked LM on both languages (BAD-X).

    Args:
        backbone: "embedded", a Hugging Face model name or a local model folder.
        pairs: Transfer pairs "src-tgt"; adapter "src_tgt" each. Under `xlpeft fit` leave it out:
            it follows `data.init_args.pairs`.
        adapter: Preset name (madx-language, pfeiffer, ...) or a config dict of each bilingual adapter.
        load_adapters: Adapter name -> folder to load (frozen) before training.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    def __init__(self, backbone: str = "embedded", pairs: Sequence[str] = (), adapter: str | dict = "madx-language",
                 load_adapters: dict[str, str] | None = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 0) -> None:
        pairs = check_pairs(pairs)
        super().__init__(backbone, languages=[pair_adapter(p) for p in pairs], adapter=adapter,
                         load_adapters=load_adapters, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.pairs = pairs
        self.sums = language_sums(pair_languages(pairs))  # validation per language (of any pair)

    def batch_setups(self, batch: dict[str, Any]) -> list[Setup] | None:
        """Each example to its pair's adapter (``pairs`` in the batch: ``BilingualMLMDataModule``)."""
        if "pairs" not in batch:
            raise XlpeftValueError("a BilingualMLM batch can carry `pairs` (each example's pair adapter) beside "
                                   "`langs`; got a batch without it. Use BilingualMLMDataModule")
        return self.setups(batch["pairs"])
