"""Language-token conventions: M2M100 ``__es__``, NLLB ``spa_Latn``, mBART-50 ``es_XX``, none elsewhere."""

from __future__ import annotations

import pytest

from tiny import tiny_tokenizer
from xlpeft.backbones.lang_tokens import (
    CONVENTIONS,
    convention_for,
    language_token,
    language_token_id,
    language_tokens,
)
from xlpeft.errors import XlpeftKeyError, XlpeftValueError


def tok_with(*tokens: str):
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(tokens)})
    return tok


@pytest.mark.parametrize("convention, lang, token", [
    ("m2m100", "spa", "__es__"), ("m2m100", "es", "__es__"), ("m2m100", "swh", "__sw__"),
    ("nllb", "spa", "spa_Latn"), ("nllb", "cmn", "zho_Hans"), ("nllb", "kas", "kas_Arab"),
    ("mbart50", "spa", "es_XX"), ("mbart50", "hin", "hi_IN"), ("mbart50", "cmn", "zh_CN"),
    ("mbart50", "swh", "sw_KE"),
])
def test_card_codes_map_to_each_convention(convention: str, lang: str, token: str) -> None:
    assert language_token(lang, CONVENTIONS[convention]) == token


def test_the_tokenizer_decides_between_m2m100_and_nllb() -> None:
    assert convention_for("m2m_100", tok_with("__en__", "__es__")).name == "m2m100"
    assert convention_for("m2m_100", tok_with("eng_Latn", "spa_Latn")).name == "nllb"
    assert convention_for("mbart", tok_with("en_XX")).name == "mbart50"
    for family in ("mt5", "t5", "marian", "encoder-decoder"):
        assert convention_for(family, tiny_tokenizer()) is None


def test_ids_come_from_the_tokenizer_and_overrides_win() -> None:
    tok = tok_with("__en__", "__es__", "__nah__")
    vocab = tok.get_vocab()
    assert language_token_id("spa", "m2m_100", tok) == vocab["__es__"]
    assert language_token_id("nah", "m2m_100", tok) == vocab["__nah__"]  # no ISO 639-1: its own code
    assert language_token_id("ote", "m2m_100", tok, {"ote": "__es__"}) == vocab["__es__"]
    assert language_token_id("spa", "mt5", tok) is None
    assert language_token_id("spa", "encoder-decoder", tok, {"spa": "book"}) == vocab["book"]  # Johnson-style tag


def test_a_missing_language_token_lists_the_tokenizer_languages() -> None:
    tok = tok_with("__en__", "__es__")
    with pytest.raises(XlpeftKeyError, match=r"no language token for 'ote' \(tried __ote__\); its language tokens "
                                             r"are: __en__, __es__\. Map the language"):
        language_token_id("ote", "m2m_100", tok)
    assert language_tokens(tok, CONVENTIONS["m2m100"]) == ["__en__", "__es__"]
    with pytest.raises(XlpeftValueError, match="needs its tokenizer; got None"):
        language_token_id("spa", "m2m_100", None)
