"""Saves never destroy data (``xlpeft/ops/artefacts.py``): foreign destinations are refused,
replacement is atomic under SIGKILL, leftovers of killed saves are tidied, modes follow the umask.

The kill test forks children that save the same adapter over and over and SIGKILLs them at
random instants; after every kill the destination must load and hold one complete version.
``XLPEFT_KILLS`` raises the number of kills (default 120, a few seconds).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import xlpeft.ops.artefacts as artefacts
from xlpeft import AdaptedModel
from xlpeft.errors import ArtefactPathError, XlpeftError
from xlpeft.generators.files import GENERATOR
from xlpeft.methods import LoRAConfig
from xlpeft.ops.files import MODEL, atomic_directory
from tiny import tiny_model

KILLS = int(os.environ.get("XLPEFT_KILLS", "120"))


def _model() -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    model.add_adapter("a", LoRAConfig(r=2))
    _fill(model, 1.0)
    return model


def _fill(model: AdaptedModel, value: float) -> None:
    with torch.no_grad():
        for key, tensor in model.adapter_state_dict("a").items():
            tensor.fill_(value)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".xlpeft-" in p.name)


# --------------------------------------------------------------------------- refusals


def test_existing_project_directory_is_refused(tmp_path: Path) -> None:
    project = tmp_path / "my_project"
    (project / "src").mkdir(parents=True)
    (project / "important.txt").write_text("keep me")
    (project / "src" / "main.py").write_text("print('hi')")
    before = _tree(project)
    with pytest.raises(ArtefactPathError, match=r"my_project holds important.txt, src but no xlpeft adapter"):
        _model().save_adapter("a", str(project))
    assert _tree(project) == before
    assert sorted(os.listdir(tmp_path)) == ["my_project"]


@pytest.mark.parametrize("where", ["cwd", "dot"])
def test_working_directory_is_refused(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    model = _model()
    with pytest.raises(ArtefactPathError, match="is the working directory"):
        model.save_adapter("a", os.getcwd() if where == "cwd" else ".")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_regular_file_is_refused_and_not_hidden(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(ArtefactPathError, match="notes.txt is a file, not a directory"):
        _model().save_adapter("a", str(notes))
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"] and notes.read_text() == "mine"


def test_an_artefact_of_another_kind_or_with_extra_files_is_refused(tmp_path: Path) -> None:
    model = _model()
    model.save_adapter("a", str(tmp_path / "a"))
    before = _tree(tmp_path / "a")
    with pytest.raises(ArtefactPathError, match="but no xlpeft generator"):
        atomic_directory(tmp_path / "a", lambda tmp: (tmp / "x").write_text("x"), GENERATOR)
    (tmp_path / "a" / "README.md").write_text("a model card someone wrote")
    with pytest.raises(ArtefactPathError, match="holds README.md, which xlpeft did not write"):
        model.save_adapter("a", str(tmp_path / "a"))
    assert _tree(tmp_path / "a") == {**before, "README.md": b"a model card someone wrote"}


def test_own_adapter_and_empty_directory_are_replaced(tmp_path: Path) -> None:
    model = _model()
    (tmp_path / "empty").mkdir()
    model.save_adapter("a", str(tmp_path / "empty"))
    model.save_adapter("a", str(tmp_path / "empty"), format="peft")  # an adapter either way
    _fill(model, 2.0)
    model.save_adapter("a", str(tmp_path / "empty"))
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "empty"))
    assert all(bool((t == 2.0).all()) for t in fresh.adapter_state_dict("a").values())
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_model_kind_replaces_only_what_its_manifest_lists(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text('{"model_type": "bert"}')
        (tmp / "model.safetensors").write_bytes(b"weights")

    atomic_directory(tmp_path / "m", write, MODEL)
    atomic_directory(tmp_path / "m", write, MODEL)  # its own: replaced
    (tmp_path / "m" / "notes.txt").write_text("mine")
    with pytest.raises(ArtefactPathError, match="holds notes.txt"):
        atomic_directory(tmp_path / "m", write, MODEL)
    with pytest.raises(ArtefactPathError, match="exists and is not empty"):
        atomic_directory(tmp_path / "m", write)  # no kind: only new or empty destinations


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_modes_follow_the_umask(umask: int, mode: int, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        _model().save_adapter("a", str(tmp_path / "a"))
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == mode
    assert all(p.stat().st_mode & 0o777 == mode & 0o666 for p in (tmp_path / "a").iterdir())


# --------------------------------------------------------------------------- leftovers


def test_leftovers_of_dead_saves_are_removed_by_the_next_save_or_load(tmp_path: Path) -> None:
    model = _model()
    model.save_adapter("a", str(tmp_path / "out"))
    for tag in ("new", "old"):
        (tmp_path / f".out.xlpeft-{tag}-{_dead_pid()}-1-abcd1234").mkdir()
    live = tmp_path / f".out.xlpeft-new-{os.getppid()}-1-abcd1234"  # a live process's save: left alone
    live.mkdir()
    AdaptedModel(tiny_model("bert", "masked-lm")).load_adapter(str(tmp_path / "out"))
    assert _leftovers(tmp_path) == [live.name]
    (tmp_path / f".out.xlpeft-new-{_dead_pid()}-1-abcd1234").mkdir()
    model.save_adapter("a", str(tmp_path / "out"))
    assert _leftovers(tmp_path) == [live.name]


def test_missing_destination_is_restored_from_a_dead_fallback_save(tmp_path: Path) -> None:
    """The two-rename fallback killed between its renames: the old copy is put back."""
    model = _model()
    model.save_adapter("a", str(tmp_path / "out"))
    os.rename(tmp_path / "out", tmp_path / f".out.xlpeft-old-{_dead_pid()}-1-abcd1234")
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    assert fresh.load_adapter(str(tmp_path / "out")) == "a"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_fallback_without_renameat2_replaces_and_leaves_nothing(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artefacts, "_renameat2", lambda src, dst, flags: False)
    model = _model()
    model.save_adapter("a", str(tmp_path / "out"))
    _fill(model, 3.0)
    model.save_adapter("a", str(tmp_path / "out"))
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "out"))
    assert all(bool((t == 3.0).all()) for t in fresh.adapter_state_dict("a").values())
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_ctrl_c_after_the_swap_keeps_the_new_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    model.save_adapter("a", str(tmp_path / "out"))
    _fill(model, 4.0)
    real = artefacts.shutil.rmtree
    calls = []

    def interrupted(path, *args, **kwargs):  # Ctrl-C while the old copy is being removed
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(artefacts.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter("a", str(tmp_path / "out"))
    monkeypatch.undo()
    fresh = AdaptedModel(tiny_model("bert", "masked-lm"))
    fresh.load_adapter(str(tmp_path / "out"))  # the load also tidies the interrupted removal
    assert all(bool((t == 4.0).all()) for t in fresh.adapter_state_dict("a").values())
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --------------------------------------------------------------------------- SIGKILL


def _saver(path: Path, model: AdaptedModel) -> None:
    """The child: save ever-new complete versions until killed."""
    version = 2.0
    while True:
        _fill(model, version)
        model.save_adapter("a", str(path))
        version += 1.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_random_sigkills_never_lose_the_destination(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "out"
    model.save_adapter("a", str(path))
    rng = random.Random(0)
    probe = AdaptedModel(tiny_model("bert", "masked-lm"))
    missing = unloadable = mixed = left_after_kill = 0
    for _ in range(KILLS):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                _saver(path, model)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left_after_kill += bool(_leftovers(tmp_path))
        if not path.is_dir():
            missing += 1
            continue
        try:
            probe.load_adapter(str(path))
        except XlpeftError:
            unloadable += 1
            continue
        values = {float(v) for t in probe.adapter_state_dict("a").values() for v in t.flatten()}
        mixed += len(values) != 1  # one complete version, never parts of two
        probe.delete_adapter("a")
        assert _leftovers(tmp_path) == [], "the load must tidy the killed save's temporaries"
    print(f"\n{KILLS} SIGKILLs: {missing} missing, {unloadable} unloadable, {mixed} mixed; "
          f"{left_after_kill} left temporaries until the next load")
    assert (missing, unloadable, mixed) == (0, 0, 0)
    model.save_adapter("a", str(path))
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_long_destination_names_get_short_temporaries(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / ("y" * 250)  # legal name; ".<name>.xlpeft-new-…" would not be
    model.save_adapter("a", str(path))
    model.save_adapter("a", str(path))
    assert sorted(os.listdir(tmp_path)) == [path.name]
