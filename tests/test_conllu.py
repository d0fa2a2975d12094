"""CoNLL-U reader on the real Turkish treebank and on malformed files."""

from __future__ import annotations

import re

import pytest

from xlpeft.data._common import MissingFileError
from xlpeft.data.conllu import iter_conllu, read_conllu
from xlpeft.data.treebank import treebank_paths, treebank_sentences
from xlpeft.errors import CorruptFileError, XlpeftKeyError

GOOGLE_UPOS = {"NOUN", "VERB", "PUNCT", "ADJ", "ADP", "ADV", "CONJ", "DET", "NUM", "PRON", "PRT", "X", "ONOM", "AFFIX"}


def test_turkish_web_treebank() -> None:
    paths = treebank_paths("tr")
    assert set(paths) == {"web", "wiki"} and all(p.name.endswith(".conllu") for p in paths.values())
    web = read_conllu(paths["web"])
    assert len(web) == 2541 and sum(len(s.forms) for s in web) == 32_422
    first = web[0]
    assert first.sent_id == "tr-forum:00000222:S023" and first.text == "Burda da öylemi yoksa kiloyla mı ?"
    assert first.forms == ("Burda", "da", "öylemi", "yoksa", "kiloyla", "mı", "?")
    assert first.upos == ("PRON", "PRT", "VERB", "CONJ", "VERB", "PRT", "PUNCT")
    assert all(len(s.forms) == len(s.upos) > 0 for s in web)
    assert {u for s in web for u in s.upos} <= GOOGLE_UPOS


def test_treebank_splits_follow_the_package_rule() -> None:
    parts = {s: treebank_sentences("tur", split=s) for s in ("train", "validation", "test")}
    assert {s: len(v) for s, v in parts.items()} == {"train": 3881, "validation": 485, "test": 485}
    ids = [{x.sent_id for x in v} for v in parts.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    web = treebank_sentences("tur", section="web")
    assert treebank_sentences("tur", section="web", split="test") == web[9::10]
    with pytest.raises(XlpeftKeyError, match="unknown treebank section 'news'"):
        treebank_sentences("tur", section="news")
    with pytest.raises(XlpeftKeyError, match="unknown treebank language 'eng'; known: tur"):
        treebank_paths("eng")


def _write(tmp_path, body: str):
    path = tmp_path / "x.conllu"
    path.write_text(body, encoding="utf-8")
    return path


def _row(i: str, form: str, upos: str) -> str:
    return "\t".join([i, form, "_", upos, "_", "_", "0", "root", "_", "_"])


def test_ranges_empty_nodes_and_comments(tmp_path) -> None:
    body = "\n".join([
        "# sent_id = s1", "# text = Vámonos al mar",
        _row("1-2", "Vámonos", "_"), _row("1", "Vamos", "VERB"), _row("2", "nos", "PRON"),
        _row("2.1", "ellos", "PRON"), _row("3-4", "al", "_"), _row("3", "a", "ADP"), _row("4", "el", "DET"),
        _row("5", "mar", "NOUN"), "", "", "# sent_id = s2", _row("1", "Sí", "INTJ"),  # no final newline
    ])
    sents = read_conllu(_write(tmp_path, body))
    assert [s.sent_id for s in sents] == ["s1", "s2"]
    assert sents[0].forms == ("Vamos", "nos", "a", "el", "mar")
    assert sents[0].upos == ("VERB", "PRON", "ADP", "DET", "NOUN")
    assert sents[0].text == "Vámonos al mar" and sents[1].line == 13 and sents[1].text == ""


def test_wrong_column_count_names_file_and_line(tmp_path) -> None:
    path = _write(tmp_path, "\n".join(["# sent_id = a", _row("1", "uno", "NUM"), "2\tdos\tNUM", ""]))
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}:3:") + " a CoNLL-U token line has 10 .* got 3"):
        read_conllu(path)


def test_non_integer_id_names_file_and_line(tmp_path) -> None:
    path = _write(tmp_path, "\n".join([_row("1", "uno", "NUM"), _row("two", "dos", "NUM"), ""]))
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}:2:") + " the ID column .* got 'two'"):
        list(iter_conllu(path))


def test_missing_and_empty_files(tmp_path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        read_conllu(tmp_path / "none.conllu")
    with pytest.raises(CorruptFileError, match="no CoNLL-U sentences"):
        read_conllu(_write(tmp_path, "# only a comment\n\n"))
