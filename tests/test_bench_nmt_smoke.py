"""Smoke test of ``scripts/bench_nmt.py`` on a tiny random bert2bert (timings are never checked)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_nmt_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    monkeypatch.syspath_prepend(str(SCRIPTS))
    bench = importlib.import_module("_bench")
    monkeypatch.setattr(bench, "BENCH_CACHE", tmp_path / "cache")
    spec = importlib.util.spec_from_file_location("xlpeft_bench_nmt", SCRIPTS / "bench_nmt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads, verbosity = torch.get_num_threads(), transformers.utils.logging.get_verbosity()
    try:
        module.main(["--backbone", "tiny", "--quick", "--reps", "1", "--warmup", "0", "--threads", "1",
                     "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
    data = json.loads((tmp_path / "nmt-tiny.json").read_text())
    assert {"benchmark", "batch", "seq", "directions", "env", "results"} <= set(data)
    train, gen = data["results"]["train_mixed4_vs_one"], data["results"]["generate_adapters_vs_bare"]
    assert set(train["timing"]["samples"]) == {"mixed4", "one"} and set(gen["tokens_per_s"]) == {"adapters", "bare"}
    assert {"median_paired_ratio", "ratio_of_medians", "ratio_of_mins"} == set(train["ratio"])
    assert "4 directions mixed" in (tmp_path / "nmt-tiny.md").read_text()
