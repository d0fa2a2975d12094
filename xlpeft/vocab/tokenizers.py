"""New vocabularies for new scripts: measuring, SentencePiece training, tokenizers.

Pfeiffer et al. 2021, "UNKs Everywhere: Adapting Multilingual Language Models
to New Scripts". A language whose script the backbone's vocabulary lacks
tokenises to ``<unk>``; measure that first (``coverage``), then train a
vocabulary on the target corpus (``train_vocabulary``).

Id space of a new vocabulary (so old and new languages share one batch, one
collator and the same special ids):

    piece the old vocabulary also has  ─► its old id            (< V_old)
    new piece j                         ─► V_old + j             (≥ V_old)

``ScriptTokenizer`` picks the new tokenizer for a text written in the new
script and the backbone's tokenizer otherwise, so existing DataModules work
unchanged; ``encode(texts, langs)`` selects explicitly by language.
"""

from __future__ import annotations

import hashlib
import io
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xlpeft.errors import MissingDependencyError, XlpeftValueError

WORD_MARK = "\u2581"  # SentencePiece's word-start mark "▁"


@dataclass(frozen=True)
class Coverage:
    """How well a tokenizer covers a corpus."""

    unk_rate: float
    """Share of (non-special) tokens that are the unknown token."""
    unk_word_rate: float
    """Share of whitespace words containing an unknown token."""
    fertility: float
    """Tokens per whitespace word."""
    words: int
    """Whitespace words measured."""


def coverage(tokenizer: Any, texts: Sequence[str]) -> Coverage:
    """UNK rate and fertility of ``tokenizer`` on ``texts`` (word by word)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise XlpeftValueError("`texts` can be a non-empty list of lines; got no text. "
                               "Check the target corpus path or language")
    unk = tokenizer.unk_token_id
    tokens = unks = words = unk_words = 0
    for text in texts:
        for word in text.split():
            ids = _word_ids(tokenizer, word)
            tokens += len(ids)
            hit = sum(i == unk for i in ids)
            unks += hit
            unk_words += hit > 0
            words += 1
    return Coverage(unks / max(tokens, 1), unk_words / max(words, 1), tokens / max(words, 1), words)


def _word_ids(tokenizer: Any, word: str) -> list[int]:
    if hasattr(tokenizer, "encode_word"):
        return tokenizer.encode_word(word)
    return tokenizer(word, add_special_tokens=False)["input_ids"]


def _spm() -> Any:
    try:
        import sentencepiece
    except ImportError as exc:  # pragma: no cover - installed with xlpeft
        raise MissingDependencyError("new vocabularies need `sentencepiece`; pip install sentencepiece") from exc
    return sentencepiece


def train_vocabulary(texts: Sequence[str], vocab_size: int, model_type: str = "unigram",
                     character_coverage: float = 1.0, seed: int = 0) -> bytes:
    """A SentencePiece model (serialised bytes) trained on ``texts``."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise XlpeftValueError("`texts` can be a non-empty target corpus; got no text. "
                               "Give the new language's training lines")
    if model_type not in ("unigram", "bpe"):
        raise XlpeftValueError(f"`model_type` can be 'unigram', 'bpe'; got {model_type!r}")
    spm = _spm()
    buffer = io.BytesIO()
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buffer, vocab_size=int(vocab_size),
            model_type=model_type, character_coverage=character_coverage, unk_id=0, bos_id=-1,
            eos_id=-1, pad_id=-1, num_threads=1, minloglevel=2,
            hard_vocab_limit=True, shuffle_input_sentence=False)
    except RuntimeError as exc:
        if "ocabulary size" not in str(exc):
            raise
        raise XlpeftValueError(
            f"`vocab_size` can be at most what the corpus supports ({_limit(str(exc))}); got {vocab_size} "
            f"for {len(texts)} lines. Lower vocab_size or give more text") from exc
    return buffer.getvalue()


def _limit(message: str) -> str:
    import re
    found = re.search(r"<=\s*(\d+)", message)
    return f"≤ {found.group(1)}" if found else message.strip().splitlines()[-1][:120]


def _old_id(piece: str, old: Mapping[str, int], wordpiece: bool) -> int | None:
    """The old vocabulary's id of a SentencePiece piece, across conventions (▁x / ##x)."""
    if piece in old:
        return old[piece]
    if wordpiece:
        candidate = piece[1:] if piece.startswith(WORD_MARK) else f"##{piece}"
        return old.get(candidate) if candidate else None
    return None


def _special_frame(base: Any) -> tuple[list[int], list[int]]:
    """The special ids the backbone tokenizer puts before and after a text ([CLS] … [SEP])."""
    with_special = base("a")["input_ids"]
    body = base("a", add_special_tokens=False)["input_ids"]
    for i in range(len(with_special) - len(body) + 1):
        if with_special[i:i + len(body)] == body:
            return with_special[:i], with_special[i + len(body):]
    return [], []


class NewVocabTokenizer:
    """Tokenises with a new SentencePiece vocabulary into the extended id space."""

    def __init__(self, model: bytes, base: Any) -> None:
        spm = _spm()
        self.model = model
        self.sha = hashlib.sha1(model).hexdigest()[:12]
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        self.base = base
        self.old_size = len(base)
        old = base.get_vocab()
        wordpiece = any(k.startswith("##") for k in old)
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.to_id: list[int] = []
        self.shared: dict[int, int] = {}  # new piece index -> old id
        self.new_pieces: list[str] = []
        for index, piece in enumerate(pieces):
            old_id = base.unk_token_id if index == self.sp.unk_id() else _old_id(piece, old, wordpiece)
            if old_id is not None:
                self.shared[index] = old_id
                self.to_id.append(old_id)
            else:
                self.to_id.append(self.old_size + len(self.new_pieces))
                self.new_pieces.append(piece)
        self.unk_token_id = base.unk_token_id
        self.prefix, self.suffix = _special_frame(base)

    @property
    def num_new(self) -> int:
        """Pieces the old vocabulary lacks (rows of the new embedding)."""
        return len(self.new_pieces)

    def encode_word(self, text: str) -> list[int]:
        return [self.to_id[i] for i in self.sp.encode(text)]

    def encode(self, text: str, max_length: int | None = None, add_special_tokens: bool = True) -> list[int]:
        body = self.encode_word(text)
        if not add_special_tokens:
            return body[:max_length] if max_length else body
        room = (max_length - len(self.prefix) - len(self.suffix)) if max_length else None
        body = body[:room] if room is not None else body
        return self.prefix + body + self.suffix

    def __call__(self, texts: str | Sequence[str], truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True, **_: Any) -> dict[str, Any]:
        single = isinstance(texts, str)
        rows = [self.encode(t, max_length if truncation else None, add_special_tokens)
                for t in ([texts] if single else texts)]
        out = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        return {k: v[0] for k, v in out.items()} if single else out


class ScriptTokenizer:
    """The backbone's tokenizer, switching to a language's new vocabulary by script or by language.

    ``__call__(texts)`` (what DataModules call) picks per text: a text in which
    at least ``share`` of the letters belong to a new vocabulary's own
    characters goes to that vocabulary. Everything else (special ids,
    ``len``, padding) is the backbone tokenizer's.
    """

    def __init__(self, base: Any, share: float = 0.5) -> None:
        self.base = base
        self.share = share
        self.languages: dict[str, NewVocabTokenizer] = {}
        self.chars: dict[str, frozenset[str]] = {}

    def add(self, lang: str, tokenizer: NewVocabTokenizer, texts: Sequence[str]) -> None:
        """Register ``lang``'s tokenizer; its script = characters the old vocabulary maps to UNK."""
        letters = {c for t in texts for c in t if c.isalpha()}
        unk = self.base.unk_token_id
        self.chars[lang] = frozenset(c for c in letters if unk in _word_ids(self.base, c))
        self.languages[lang] = tokenizer

    def language_of(self, text: str) -> str | None:
        letters = [c for c in text if c.isalpha()]
        for lang, chars in self.chars.items():
            if letters and statistics.fmean(c in chars for c in letters) >= self.share:
                return lang
        return None

    def new_vocabulary_ids(self) -> dict[str, list[int]]:
        """Each new-vocabulary language's own ids (MLM random replacements come from these)."""
        return {lang: sorted(set(tok.to_id)) for lang, tok in self.languages.items()}

    def encode(self, texts: Sequence[str], langs: Sequence[str], **kw: Any) -> dict[str, list]:
        """Tokenise each text with its language's tokenizer (explicit selection)."""
        rows = [self._one(t, self.languages.get(lang), kw) for t, lang in zip(texts, langs)]
        return {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}

    def _one(self, text: str, tok: NewVocabTokenizer | None, kw: dict) -> list[int]:
        if tok is not None:
            return tok(text, **kw)["input_ids"]
        return self.base(text, **kw)["input_ids"]

    def __call__(self, texts: str | Sequence[str], **kw: Any) -> dict[str, Any]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        rows = [self._one(t, self.languages.get(self.language_of(t) or ""), kw) for t in batch]
        out = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
        return {k: v[0] for k, v in out.items()} if single else out

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # special ids, pad/mask tokens … are the backbone's
        if name in ("base", "languages", "chars", "share"):
            raise AttributeError(name)
        return getattr(self.base, name)
