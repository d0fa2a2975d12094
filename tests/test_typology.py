"""Typology beyond the cards: any URIEL code, macrolanguages, imputation, nearest languages."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.typology import (
    complete_vector, family_similarity, lineage, nearest_languages, relatedness, typological_similarity,
    typology_vector, uriel_code,
)


def test_codes_without_a_card_and_iso639_1():
    assert uriel_code("quy") == "quy" and uriel_code("am") == "amh"
    assert uriel_code("sw") == uriel_code("Swahili") == "swh"  # through the card
    assert uriel_code("nci") == "nci"  # a variety inside card 'nah', but URIEL knows it
    assert typology_vector("quy").shape == (289,)


def test_macrolanguages_map_to_an_individual_language_with_a_note(caplog):
    uriel_code.cache_clear()
    with caplog.at_level(logging.INFO, logger="xlpeft.typology"):
        assert uriel_code("grn") == "gug"
    assert "lang2vec has no 'grn' (a macrolanguage); using 'gug'" in caplog.text
    assert uriel_code("nah") == "nci"  # the card says so


def test_unknown_and_ambiguous_codes(tmp_path, monkeypatch):
    with pytest.raises(XlpeftKeyError, match=r"unknown language code 'xqz'.*3718 URIEL codes.*Did you mean 'quz'"):
        typology_vector("xqz")
    (tmp_path / "aaa.toml").write_text('code = "aaa"\nname = "A"\naliases = ["zz"]\nscript = "Latn"\nfamily = "T"\n')
    (tmp_path / "bbb.toml").write_text('code = "bbb"\nname = "B"\naliases = ["zz"]\nscript = "Latn"\nfamily = "T"\n')
    monkeypatch.setenv("XLPEFT_LANGUAGES_DIR", str(tmp_path))
    with pytest.raises(XlpeftValueError, match="alias 'zz' is ambiguous"):
        uriel_code("zz")


def test_missing_values_mask_impute_or_refuse():
    raw = typology_vector("eng", "syntax_wals")
    knn = typology_vector("eng", "syntax_wals", missing="knn")
    known = ~np.isnan(raw)
    assert np.isnan(raw).any() and not np.isnan(knn).any()
    np.testing.assert_array_equal(knn[known], raw[known])
    np.testing.assert_array_equal(knn[~known], typology_vector("eng", "syntax_knn")[~known])
    both = typology_vector("eng", "syntax_wals+phonology_wals", missing="knn")
    assert both.shape == (103 + 28,) and not np.isnan(both).any()
    assert not typology_vector("eng", "syntax_wals", missing="zero")[~known].any()
    assert np.isnan(typology_vector("nah", "syntax_wals")).all()
    with pytest.raises(XlpeftValueError, match=r"'nah' \(URIEL 'nci'\) has no known value in 'syntax_wals'"):
        complete_vector("nah", "syntax_wals", missing="zero")
    assert not np.isnan(complete_vector("nah", "syntax_wals")).any()  # knn fallback
    with pytest.raises(XlpeftValueError, match="`missing` can be nan, knn, zero; got 'mean'"):
        typology_vector("eng", missing="mean")


def test_nearest_languages_and_family():
    near = nearest_languages("tgl", ["eng", "ind", "jpn", "tgl", "spa"], k=2)
    assert [c for c, _ in near] == ["ind", "spa"] and near[0][1] == pytest.approx(typological_similarity("tgl", "ind"))
    assert len(nearest_languages("tgl", ["eng", "ind"], k=5)) == 2
    with pytest.raises(XlpeftValueError, match="`k` must be ≥ 1; got 0"):
        nearest_languages("tgl", ["eng"], k=0)
    assert lineage("swh")[:1] == ("Atlantic-Congo",)
    assert family_similarity("eng", "deu") > family_similarity("eng", "hin") > family_similarity("eng", "jpn") == 0.0
    rel = relatedness("eng", "deu")
    assert rel["same_family"] and rel["same_genus"] and 0 < rel["typology"] <= 1
