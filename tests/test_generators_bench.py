"""Smoke test of scripts/bench_generators.py on the tiny backbone (timings are reported, never checked)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_generators_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("xlpeft_bench_generators", SCRIPTS / "bench_generators.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--backbone", "tiny", "--quick", "--reps", "1", "--warmup", "0", "--budget", "1",
                 "--threads", "1", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "generators-tiny-madg.json").read_text())
    res = payload["results"]
    assert res["max_abs_diff_generated_vs_materialised"] == 0.0
    assert {"inference_one", "inference_routed4", "inference_cold", "train_step"} <= set(res)
    assert set(res["inference_one"]["ratio"]) == {"median_paired_ratio", "ratio_of_medians", "ratio_of_mins"}
    assert "| inference_one: generated / static |" in (tmp_path / "generators-tiny-madg.md").read_text()
    assert "torch" in sys.modules
