"""Shared fixtures: tiny random backbones of every family (see ``tiny.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

_TESTS = Path(__file__).resolve().parent
for _p in (_TESTS.parent, _TESTS):  # the package and ``tiny`` import without installing
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from tiny import (  # noqa: E402  (after the path set-up above)
    ALL_FAMILIES,
    ENCODER_FAMILIES,
    SEQ2SEQ_FAMILIES,
    family_heads,
    tiny_batch as _tiny_batch,
    tiny_model as _tiny_model,
    tiny_tokenizer as _tiny_tokenizer,
)

__all__ = ["ALL_FAMILIES", "ENCODER_FAMILIES", "SEQ2SEQ_FAMILIES"]

# Tiny models gain nothing from intra-op threads, and on a shared 2-core runner the
# OpenMP spin-waits of a second thread cost more than they give.
torch.set_num_threads(1)


@pytest.fixture(params=ALL_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Every supported family in turn."""
    return request.param


@pytest.fixture(params=ENCODER_FAMILIES)
def encoder_family(request: pytest.FixtureRequest) -> str:
    """Every encoder-only family in turn."""
    return request.param


@pytest.fixture(params=SEQ2SEQ_FAMILIES)
def seq2seq_family(request: pytest.FixtureRequest) -> str:
    """Every encoder-decoder family in turn."""
    return request.param


@pytest.fixture(params=family_heads(), ids=lambda fh: f"{fh[0]}-{fh[1]}")
def family_head(request: pytest.FixtureRequest) -> tuple[str, str]:
    """Every (family, head) pair the tiny zoo builds."""
    return request.param


@pytest.fixture(name="tiny_model")
def tiny_model_fixture() -> Callable:
    """``tiny_model(family, head="base")``: a fresh seeded tiny backbone in eval mode."""
    return _tiny_model


@pytest.fixture(name="tiny_batch")
def tiny_batch_fixture() -> Callable:
    """``tiny_batch(model, batch=4, seq=7, seed=0)``: valid padded inputs for ``model``."""
    return _tiny_batch


@pytest.fixture(name="tiny_tokenizer")
def tiny_tokenizer_fixture() -> Callable:
    """``tiny_tokenizer()``: a small offline WordPiece tokenizer."""
    return _tiny_tokenizer


@pytest.fixture
def group(monkeypatch):
    """A one-process gloo group (FSDP needs one); the environment is put back after."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
