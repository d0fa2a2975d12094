"""Smoke test of ``scripts/bench_tta.py``: the smallest settings on a tiny random backbone."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_tta_writes_ratios_and_memory(tmp_path, monkeypatch):
    import transformers
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setattr(importlib.import_module("_bench"), "BENCH_CACHE", tmp_path / "cache")
    spec = importlib.util.spec_from_file_location("xlpeft_bench_tta", SCRIPTS / "bench_tta.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main(["--backbone", "tiny", "--quick", "--reps", "1", "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.enable_progress_bar()
    report = json.loads((tmp_path / "bench_tta.json").read_text())
    variants = {"uniform", "emea1", "emea10", "emea10-ckpt"}  # -ckpt: activation checkpointing in the steps
    assert set(report["timing"]["samples"]) == {"plain", *variants}
    assert set(report["ratios"]) == variants
    assert {"median_paired_ratio", "ratio_of_medians", "ratio_of_mins"} <= set(report["ratios"]["emea10"])
    assert set(report["memory"]) == {"plain", *variants}
    assert all(m["extra_peak_mb"] >= 0 for m in report["memory"].values())
    assert "emea10 vs plain" in (tmp_path / "bench_tta.md").read_text()
    assert "xlpeft_bench_tta" not in sys.modules
