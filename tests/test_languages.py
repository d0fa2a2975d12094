"""Language cards, code resolution, typology vectors and the pkg_resources shim."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xlpeft import _compat
from xlpeft.errors import CorruptFileError, XlpeftKeyError, XlpeftValueError
from xlpeft.languages import ENV_VAR, Language, all_languages, get_language, languages_dir, resolve
from xlpeft.typology import typological_similarity, typology_vector

REPO = Path(__file__).resolve().parents[1]


def test_cards_are_well_formed() -> None:
    langs = all_languages()
    assert len(langs) >= 27 and all(isinstance(x, Language) for x in langs)
    assert languages_dir() == REPO / "languages"
    for lang in langs:
        assert (languages_dir() / f"{lang.code}.toml").is_file()
        assert len(lang.code) == 3 and lang.code.isalpha() and lang.code.islower()
        assert len(lang.script) == 4 and lang.script[0].isupper(), lang.code
        assert lang.corpora and sum(c.default for c in lang.corpora) <= 1, lang.code
        assert lang.code not in lang.aliases
    assert {"eng", "swh", "kas", "tur", "nah", "ote", "mig", "urd"} <= {x.code for x in langs}


def test_resolve_aliases_and_names() -> None:
    assert resolve("sw") == resolve("swa") == resolve("SW") == resolve(" swh ") == resolve("Swahili") == "swh"
    assert (resolve("zh"), resolve("ks"), resolve("fa"), resolve("fre"), resolve("ar")) == ("cmn", "kas", "pes", "fra", "arb")
    card = get_language("ks")
    assert card.name == "Kashmiri" and card.script == "Arab" and card.corpus().edition == "301"
    assert get_language("nah").lang2vec == "nci" and "nhe" in get_language("nah").variants


def test_unknown_code_lists_close_matches() -> None:
    with pytest.raises(XlpeftKeyError, match=r"unknown language 'swq'; known: arb, ben.*Did you mean 'swh'.*'sw'"):
        resolve("swq")
    with pytest.raises(XlpeftKeyError, match=r"'nci' is a variety inside the corpus of card 'nah'"):
        resolve("nci")


def _card(code: str, aliases: str = "") -> str:
    return (f'code = "{code}"\nname = "Lang {code}"\naliases = [{aliases}]\n'
            'script = "Latn"\nfamily = "Test"\n')


def test_ambiguous_alias_and_env_dir(tmp_path, monkeypatch) -> None:
    (tmp_path / "aaa.toml").write_text(_card("aaa", '"zz", "a1"'), encoding="utf-8")
    (tmp_path / "bbb.toml").write_text(_card("bbb", '"zz"'), encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert languages_dir() == tmp_path and [x.code for x in all_languages()] == ["aaa", "bbb"]
    assert resolve("a1") == "aaa" and get_language("bbb").lang2vec == "bbb"
    with pytest.raises(XlpeftValueError, match="language alias 'zz' is ambiguous: it can be aaa, bbb"):
        resolve("zz")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "missing"))
    with pytest.raises(XlpeftValueError, match=r"\$XLPEFT_LANGUAGES_DIR can be a directory"):
        languages_dir()


@pytest.mark.parametrize("body, message", [
    (_card("ccc") + 'colour = "red"\n', r"unknown keys \['colour'\]"),
    (_card("ddd"), "`code` must be the 3-letter file name 'ccc'"),
    ('code = "ccc"\nname = \n', "not a valid TOML"),
    ('code = "ccc"\n', "missing card fields"),
])
def test_corrupt_cards_name_the_file(tmp_path, monkeypatch, body, message) -> None:
    (tmp_path / "ccc.toml").write_text(body, encoding="utf-8")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(CorruptFileError, match=r"ccc\.toml: .*" + message):
        all_languages()


def test_every_lang2vec_code_is_known_to_uriel() -> None:
    l2v = _compat.import_lang2vec()
    missing = [x.code for x in all_languages() if x.lang2vec not in l2v.URIEL_LANGUAGES]
    assert missing == []


def test_typology_vectors() -> None:
    eng = typology_vector("en")
    assert eng.shape == (289,) and not np.isnan(eng).any() and set(np.unique(eng)) <= {0.0, 1.0}
    assert typology_vector("eng") is eng  # cached
    assert not eng.flags.writeable
    assert typological_similarity("eng", "eng") == pytest.approx(1.0)
    assert typological_similarity("eng", "deu") == pytest.approx(typological_similarity("deu", "eng"))
    assert typological_similarity("eng", "deu") > typological_similarity("eng", "jpn")
    assert typological_similarity("tur", "jpn") > typological_similarity("tur", "eng")


def test_observed_features_mask_missing_values() -> None:
    wals = typology_vector("eng", "syntax_wals")
    assert wals.shape == (103,) and 0 < np.isnan(wals).sum() < 103
    sim = typological_similarity("eng", "fra", "syntax_wals")
    assert 0.0 < sim < 1.0 and np.isfinite(sim)
    assert np.isnan(typology_vector("nah", "syntax_wals")).all()  # Classical Nahuatl has no WALS syntax
    assert typological_similarity("nah", "eng", "syntax_wals") == 0.0
    with pytest.raises(XlpeftValueError, match="`features` can be a '\\+'/'\\|' combination of syntax_wals"):
        typology_vector("eng", "syntax")
    with pytest.raises(XlpeftValueError, match="got 'learned'"):  # stored pickled by lang2vec: refused
        typology_vector("fra", "learned")


def test_resource_filename_matches_pkg_resources_layout() -> None:
    path = _compat.resource_filename("lang2vec.lang2vec", "data/letter_codes.json")
    assert Path(path).is_file() and Path(path).parent.name == "data"
    assert Path(_compat.resource_filename("xlpeft", "errors.py")) == REPO / "xlpeft" / "errors.py"


def test_shim_is_used_when_pkg_resources_is_missing() -> None:
    """A fresh interpreter where ``import pkg_resources`` fails still imports lang2vec."""
    code = textwrap.dedent("""
        import sys
        sys.modules["pkg_resources"] = None  # `import pkg_resources` now raises ImportError
        try:
            import pkg_resources
        except ImportError:
            pass
        else:
            raise SystemExit("pkg_resources should be unimportable")
        assert "lang2vec.lang2vec" not in sys.modules
        import importlib.util  # load _compat alone: importing the xlpeft package would pull in torch
        spec = importlib.util.spec_from_file_location("xlpeft_compat", sys.argv[1])
        compat = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(compat)
        assert compat.ensure_pkg_resources() is True
        assert getattr(sys.modules["pkg_resources"], compat.SHIM_MARKER) is True
        import lang2vec.lang2vec as l2v
        assert getattr(l2v.pkg_resources, compat.SHIM_MARKER) is True
        print(len(l2v.get_features(["swh"], "syntax_knn")["swh"]), "swh" in l2v.URIEL_LANGUAGES)
    """)
    compat_file = str(REPO / "xlpeft" / "_compat.py")
    done = subprocess.run([sys.executable, "-c", code, compat_file], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["103", "True"]


def test_real_pkg_resources_is_preferred() -> None:
    import importlib.util

    has_real = importlib.util.find_spec("pkg_resources") is not None
    assert _compat.ensure_pkg_resources() is (not has_real)
