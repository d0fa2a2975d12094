"""Checkpoints execute nothing: a pickled payload never runs, whatever the path or environment.

Before: a ``__reduce__`` payload in ``hyper_parameters`` ran through
``load_from_checkpoint("http://…")`` and ``Trainer.fit(ckpt_path="http://…")``
(Lightning defaults to ``weights_only=False`` for http URLs) and from a local
file when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` was set.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import lightning as L
import pytest
import torch

from lightning_tiny import save_tiny_backbone, tiny_trainer
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import CorruptFileError, XlpeftTypeError, XlpeftValueError
from xlpeft.lightning import MaskedLMAdaptation
from xlpeft.lightning.checkpoint_io import SafeCheckpointIO, primitive
from xlpeft.lightning.cli import cli
from xlpeft.methods import LoRAConfig

LANGS = ["eng", "swh"]
UNSAFE = r"objects other than tensors and plain values .*never runs pickled code"


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pickle")
    save_tiny_backbone(root / "tiny-bert")
    for lang in LANGS:
        (root / f"{lang}.txt").write_text("\n".join(["the lord said unto them", "na nchi ya maji"] * 10) + "\n",
                                          encoding="utf-8")
    return root


def module(root: Path) -> MaskedLMAdaptation:
    return MaskedLMAdaptation(backbone=str(root / "tiny-bert"), languages=LANGS)


def data(root: Path) -> MLMDataModule:
    return MLMDataModule(languages=LANGS, backbone=str(root / "tiny-bert"), batch_size=4, max_length=16,
                         files={lang: str(root / f"{lang}.txt") for lang in LANGS})


@pytest.fixture(scope="module")
def good(root: Path) -> Path:
    """A real 2-step checkpoint."""
    trainer = tiny_trainer(2, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module(root), data(root))
    path = root / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.fixture()
def evil(good: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The good checkpoint with a payload in its hyper-parameters; returns (checkpoint, marker)."""
    ckpt = torch.load(good, weights_only=True)
    marker = tmp_path / "PWNED"
    ckpt["hyper_parameters"]["adapter"] = Payload(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


@pytest.fixture()
def served(evil: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``evil.ckpt`` over http from 127.0.0.1 (the remote case Lightning loads with weights_only=False)."""
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(evil[0].parent))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/evil.ckpt"
    server.shutdown()
    server.server_close()


def test_the_payload_is_real(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # what an unsafe load does
    assert marker.exists()


def test_load_from_checkpoint_over_http_runs_nothing(served, evil):
    with pytest.raises(CorruptFileError, match=UNSAFE):
        MaskedLMAdaptation.load_from_checkpoint(served)
    assert not evil[1].exists()


def test_load_from_checkpoint_ignores_the_force_no_weights_only_env(evil, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path, marker = evil
    for where in (str(path), f"file://{path}"):
        with pytest.raises(CorruptFileError, match=f"{path.name}: the checkpoint holds {UNSAFE}"):
            MaskedLMAdaptation.load_from_checkpoint(where)
    fsspec.filesystem("memory").pipe("/evil.ckpt", path.read_bytes())
    with pytest.raises(CorruptFileError, match=UNSAFE):
        MaskedLMAdaptation.load_from_checkpoint("memory://evil.ckpt")
    assert not marker.exists()


def test_weights_only_false_is_refused(good):
    with pytest.raises(XlpeftValueError, match="`weights_only` can be True or None.*got False"):
        MaskedLMAdaptation.load_from_checkpoint(str(good), weights_only=False)


def test_trainer_fit_ckpt_path_runs_nothing(root, served, evil, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for where in (served, str(evil[0])):
        trainer = tiny_trainer(4, limit_val_batches=0, default_root_dir=str(root))
        with pytest.raises(CorruptFileError, match=UNSAFE):
            trainer.fit(module(root), data(root), ckpt_path=where)
        assert isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    assert not evil[1].exists()


def test_cli_ckpt_path_runs_nothing(root, evil, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args = ["fit", "--model=xlpeft.lightning.MaskedLMAdaptation", f"--model.backbone={root / 'tiny-bert'}",
            f"--model.languages={LANGS}", "--data=xlpeft.data.datamodules.MLMDataModule",
            f"--data.backbone={root / 'tiny-bert'}", f"--data.languages={LANGS}", "--data.max_length=16",
            f"--data.files={ {lang: str(root / f'{lang}.txt') for lang in LANGS} }",
            "--trainer.max_steps=4", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root / 'cli'}", f"--ckpt_path={evil[0]}"]
    with pytest.raises(CorruptFileError, match=UNSAFE):
        cli(args)
    assert not evil[1].exists()


def test_a_good_checkpoint_still_loads_and_resumes(root, good):
    loaded = MaskedLMAdaptation.load_from_checkpoint(str(good))
    assert loaded.languages == LANGS
    trainer = tiny_trainer(3, limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module(root), data(root), ckpt_path=f"file://{good}")
    assert trainer.global_step == 3


@pytest.mark.parametrize("cut", [0, 100], ids=["empty", "truncated"])
def test_an_empty_or_truncated_checkpoint_is_a_clear_error(good, tmp_path, cut):
    path = tmp_path / "cut.ckpt"
    path.write_bytes(good.read_bytes()[:cut])
    what = "the checkpoint is empty" if cut == 0 else "truncated or not a torch checkpoint"
    with pytest.raises(CorruptFileError, match=f"cut.ckpt: {what}"):
        MaskedLMAdaptation.load_from_checkpoint(str(path))
    with pytest.raises(CorruptFileError, match=what):
        SafeCheckpointIO().load_checkpoint(path)


def test_hyper_parameters_are_saved_as_plain_values():
    assert primitive({"path": Path("/x"), "lora": LoRAConfig(r=4), "langs": ("eng",)}, "hp") == \
        {"path": "/x", "lora": LoRAConfig(r=4).to_dict(), "langs": ("eng",)}
    assert "__class__" not in primitive({"__class__": object, "a": 1}, "hp")  # an artefact of locals()
    with pytest.raises(XlpeftTypeError, match=r"hyper-parameter `hp.tokenizer` can be None, bool.*got object"):
        primitive({"tokenizer": object()}, "hp")


def test_a_saved_checkpoint_loads_with_plain_weights_only(good):
    ckpt = torch.load(good, weights_only=True)
    assert ckpt["hyper_parameters"]["languages"] == LANGS or list(ckpt["hyper_parameters"]["languages"]) == LANGS
    (rng,) = ckpt["xlpeft"]["rng"]  # one state per rank
    assert rng["torch"].dtype == torch.uint8
