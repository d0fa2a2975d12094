"""Language tokens of multilingual seq2seq backbones, as data.

Many-to-many NMT models mark the language of a text with a special token:
the source text starts with the source-language token and the decoder's
first generated token is forced to the target-language token.

    M2M100   __es__ Hola mundo </s>      decoder: </s> __nah__ …
    NLLB     spa_Latn Hola mundo </s>    decoder: </s> nah_Latn …
    mBART-50 es_XX Hola mundo </s>       decoder: </s> en_XX …

mT5, Marian and bert2bert ``EncoderDecoderModel`` use none. The convention
of a model is picked by its family (``model_type``) and, where a family has
several (M2M100 and NLLB share ``m2m_100``), by which probe token its
tokenizer knows. Codes come from the language cards (ISO 639-3 code,
ISO 639-1 alias, script), so ``spa``, ``es`` and ``spa_Latn`` all work.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from xlpeft.errors import XlpeftKeyError, XlpeftValueError

MBART50_CODES = (
    "ar_AR", "cs_CZ", "de_DE", "en_XX", "es_XX", "et_EE", "fi_FI", "fr_XX", "gu_IN", "hi_IN", "it_IT",
    "ja_XX", "kk_KZ", "ko_KR", "lt_LT", "lv_LV", "my_MM", "ne_NP", "nl_XX", "ro_RO", "ru_RU", "si_LK",
    "tr_TR", "vi_VN", "zh_CN", "af_ZA", "az_AZ", "bn_IN", "fa_IR", "he_IL", "hr_HR", "id_ID", "ka_GE",
    "km_KH", "mk_MK", "ml_IN", "mn_MN", "mr_IN", "pl_PL", "ps_AF", "pt_XX", "sv_SE", "sw_KE", "ta_IN",
    "te_IN", "th_TH", "tl_XX", "uk_UA", "ur_PK", "xh_ZA", "gl_ES", "sl_SI",
)
"""The 52 language codes of mBART-50 (``facebook/mbart-large-50*``)."""

NLLB_EXCEPTIONS = {"cmn": "zho_Hans", "pes": "pes_Arab", "arb": "arb_Arab", "kas": "kas_Arab"}
"""Card codes whose NLLB code is not ``<code>_<script>``."""


@dataclass(frozen=True)
class Convention:
    """How one family of tokenizers names languages."""

    name: str
    """Short name: ``m2m100``, ``nllb``, ``mbart50``."""
    probe: str
    """A token every tokenizer of this convention has (English)."""
    candidates: Callable[[Any], list[str]]
    """Card → token strings to try, best first."""


def _iso1(card: Any) -> list[str]:
    return [a for a in card.aliases if len(a) == 2]


def _m2m(card: Any) -> list[str]:
    return [f"__{c}__" for c in _iso1(card)] + [f"__{card.code}__"]


def _nllb(card: Any) -> list[str]:
    return [NLLB_EXCEPTIONS.get(card.code, f"{card.code}_{card.script}")]


def _mbart(card: Any) -> list[str]:
    out = [c for c in MBART50_CODES for iso in _iso1(card) if c.startswith(f"{iso}_")]
    return out or [f"{iso}_XX" for iso in _iso1(card)] or [f"{card.code}_XX"]


CONVENTIONS = {
    "m2m100": Convention("m2m100", "__en__", _m2m),
    "nllb": Convention("nllb", "eng_Latn", _nllb),
    "mbart50": Convention("mbart50", "en_XX", _mbart),
}
"""Every known language-token convention by name."""

FAMILY_CONVENTIONS: dict[str, tuple[str, ...]] = {
    "m2m_100": ("m2m100", "nllb"), "nllb-moe": ("nllb",), "mbart": ("mbart50",),
    "t5": (), "mt5": (), "marian": (), "encoder-decoder": (), "bart": (),
}
"""``model_type`` → conventions its checkpoints use (empty: no language tokens)."""

_RAW_TOKEN = re.compile(r"^(__[a-z]{2,3}__|[a-z]{3}_[A-Z][a-z]{3}|[a-z]{2}_[A-Z]{2})$")


def convention_for(model_type: str, tokenizer: Any = None) -> Convention | None:
    """The convention of a backbone, ``None`` when it uses no language tokens."""
    names = FAMILY_CONVENTIONS.get(model_type, ())
    if not names:
        return None
    vocab = _vocab(tokenizer)
    for name in names:
        if vocab is None or CONVENTIONS[name].probe in vocab:
            return CONVENTIONS[name]
    return CONVENTIONS[names[0]]


def _vocab(tokenizer: Any) -> Mapping[str, int] | None:
    return None if tokenizer is None else tokenizer.get_vocab()


def language_token(lang: str, convention: Convention, tokenizer: Any = None,
                   overrides: Mapping[str, str] | None = None) -> str:
    """The token string of ``lang`` (a card code, an alias or a raw token)."""
    if overrides and lang in overrides:
        tried = [overrides[lang]]
    elif _RAW_TOKEN.match(lang):  # already a token such as "spa_Latn"
        tried = [lang]
    else:
        from xlpeft.languages import get_language
        tried = convention.candidates(get_language(lang))
    vocab = _vocab(tokenizer)
    for token in tried:
        if vocab is None or token in vocab:
            return token
    raise XlpeftKeyError(
        f"the {convention.name} tokenizer has no language token for {lang!r} (tried {', '.join(tried)}); "
        f"its language tokens are: {', '.join(language_tokens(tokenizer, convention)[:40])}. Map the "
        f"language to one with `lang_tokens={{{lang!r}: '<token>'}}`, or add the token to the tokenizer "
        "and resize the embeddings"
    )


def language_tokens(tokenizer: Any, convention: Convention) -> list[str]:
    """The language tokens a tokenizer holds under ``convention``."""
    pattern = {"m2m100": r"__[a-z]{2,3}__", "nllb": r"[a-z]{3}_[A-Z][a-z]{3}", "mbart50": r"[a-z]{2}_[A-Z]{2}"}
    vocab = _vocab(tokenizer) or {}
    return sorted(t for t in vocab if re.fullmatch(pattern[convention.name], t))


def language_token_id(lang: str, model_type: str, tokenizer: Any,
                      overrides: Mapping[str, str] | None = None) -> int | None:
    """Id of ``lang``'s token for this backbone, ``None`` when the family uses none."""
    convention = convention_for(model_type, tokenizer)
    if convention is None:
        if overrides and lang in overrides:
            return _id(tokenizer, overrides[lang])
        return None
    if tokenizer is None:
        raise XlpeftValueError(
            f"a {model_type} backbone marks languages with tokens, so it needs its tokenizer; got None. "
            "Load the backbone from a folder that holds its tokenizer files"
        )
    return _id(tokenizer, language_token(lang, convention, tokenizer, overrides))


def _id(tokenizer: Any, token: str) -> int:
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise XlpeftKeyError(f"language token {token!r} is not in the tokenizer's vocabulary; add it first")
    return int(vocab[token])
