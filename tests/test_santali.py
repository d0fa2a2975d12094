"""Santali corpus: .deb → .xpi → Fluent values → Ol Chiki lines → cached splits (offline)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from xlpeft.data import santali
from xlpeft.data._common import MissingFileError
from xlpeft.data.santali import FetchError, ftl_values, is_ol_chiki, santali_text, write_santali_splits

FTL = """# comment line
-brand-short-name = Firefox
default-audio-output-device-label = ᱢᱩᱞ ᱵᱟᱦᱨᱮ ᱥᱟᱰᱮ
mediastatus-fallback-title = { -brand-short-name } ᱫᱚ ᱢᱤᱰᱤᱭᱟ ᱮᱱᱮᱡ
multi =
    ᱯᱟᱹᱛᱤᱭᱟᱹᱣ ᱢᱮ
    ᱟᱨ ᱵᱟᱝ
    .title = ᱥᱮᱪᱮᱫ { $count ->
        [one] ᱢᱤᱫ
       *[other] ᱟᱭᱢᱟ
    } ᱠᱟᱛᱷᱟ
latin-only = Open the <b>menu</b>
"""


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def fake_deb(path: Path, lines: int = 60) -> Path:
    """A .deb shaped like firefox-esr-l10n-sat, holding FTL above plus numbered Ol Chiki lines."""
    extra = "\n".join(f"msg-{i} = ᱢᱤᱫ {'ᱵᱟᱨ ' * (i % 5)}ᱠᱟᱛᱷᱟ {i}" for i in range(lines))
    xpi = io.BytesIO()
    with zipfile.ZipFile(xpi, "w") as z:
        z.writestr("localization/sat/a.ftl", FTL)
        z.writestr("localization/sat/b.ftl", extra)
        z.writestr("chrome/sat/x.properties", "key=ᱥᱟᱱᱛᱟᱲᱤ %S ᱯᱟᱹᱨᱥᱤ\n")
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        info = tarfile.TarInfo("./usr/lib/firefox-esr/browser/extensions/langpack-sat.xpi")
        info.size = len(xpi.getvalue())
        tar.addfile(info, io.BytesIO(xpi.getvalue()))
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "data.tar.xz": tar_bytes.getvalue()}))
    return path


def test_ftl_values_drop_placeables_and_keep_multiline_values():
    values = ftl_values(FTL)
    assert "ᱢᱩᱞ ᱵᱟᱦᱨᱮ ᱥᱟᱰᱮ" in values
    assert "ᱫᱚ ᱢᱤᱰᱤᱭᱟ ᱮᱱᱮᱡ" in values
    assert "ᱯᱟᱹᱛᱤᱭᱟᱹᱣ ᱢᱮ ᱟᱨ ᱵᱟᱝ" in values
    assert any(v.startswith("ᱥᱮᱪᱮᱫ") for v in values)
    assert "Open the menu" in values and not any("{" in v or "<" in v for v in values)


def test_ol_chiki_detection():
    assert is_ol_chiki("ᱢᱩᱞ ᱵᱟᱦᱨᱮ URL") and not is_ol_chiki("Open the menu") and not is_ol_chiki("123")


def test_splits_are_cached_disjoint_and_ol_chiki(tmp_path):
    fake_deb(tmp_path / "firefox-esr-l10n-sat_1.0_all.deb")
    folder = write_santali_splits(tmp_path)
    splits = {s: santali_text(s, cache=tmp_path) for s in ("train", "validation", "test")}
    assert sum(map(len, splits.values())) == len({x for v in splits.values() for x in v}) > 60
    assert len(splits["train"]) > len(splits["test"]) and all(is_ol_chiki(x) for v in splits.values() for x in v)
    assert "ᱥᱟᱱᱛᱟᱲᱤ ᱯᱟᱹᱨᱥᱤ" in {x for v in splits.values() for x in v}  # .properties, %S removed
    assert santali_text("train", max_lines=3, cache=tmp_path) == splits["train"][:3]
    assert (folder / "train.txt").is_file()


def test_not_cached_and_not_asked_to_fetch_names_the_command(tmp_path):
    with pytest.raises(MissingFileError, match="apt-get download firefox-esr-l10n-sat"):
        santali_text("train", cache=tmp_path)


def test_fetch_without_apt_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setattr(santali.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match="apt-get download firefox-esr-l10n-sat"):
        santali_text("train", cache=tmp_path, fetch=True)


def test_a_corrupt_deb_is_reported(tmp_path):
    (tmp_path / "firefox-esr-l10n-sat_1.0_all.deb").write_bytes(b"not a deb")
    with pytest.raises(Exception, match="not a .deb"):
        write_santali_splits(tmp_path)


def test_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="`split` can be"):
        santali_text("dev", cache=tmp_path)
