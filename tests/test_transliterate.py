"""Letter-for-letter transliteration into an uncovered script (the controlled new-script experiment)."""

from __future__ import annotations

import pytest

from lightning_tiny import tiny_bert_tokenizer
from xlpeft.data.transliterate import LATIN, table, transliterate, untransliterate
from xlpeft.errors import XlpeftValueError
from xlpeft.vocab import coverage


@pytest.mark.parametrize("script, lo, hi", [("olck", 0x1C5A, 0x1C7F), ("tfng", 0x2D30, 0x2D7F)])
def test_table_is_a_bijection_into_the_block(script, lo, hi):
    mapping = table(script)
    assert sorted(mapping) == list(LATIN) and len(set(mapping.values())) == 26
    assert all(lo <= ord(c) <= hi for c in mapping.values())


def test_letters_change_everything_else_stays():
    out = transliterate("Mungu akasema, Iwe nuru: 3!")
    assert out[5] == " " and out.endswith(": 3!")
    assert not any(c.isascii() and c.isalpha() for c in out)
    assert untransliterate(out) == "mungu akasema, iwe nuru: 3!"


def test_accents_are_folded_deterministically():
    assert transliterate("Élan") == transliterate("elan") == transliterate("élan")


def test_the_backbone_tokenizer_loses_every_word():
    text = ["the lord said unto them"]
    tok = tiny_bert_tokenizer()
    assert coverage(tok, text).unk_word_rate == 0.0
    assert coverage(tok, [transliterate(t) for t in text]).unk_word_rate == 1.0


def test_unknown_script_is_refused():
    with pytest.raises(XlpeftValueError, match="`script` can be olck, tfng; got 'latn'"):
        transliterate("abc", "latn")
