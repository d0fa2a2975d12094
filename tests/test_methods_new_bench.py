"""Smoke test of ``scripts/bench_methods.py`` on a tiny backbone: it runs and reports every method.

Timings are never checked (a benchmark reports, people judge); the activation-memory
column is, where it is a fact of the graph rather than of the machine: Ladder
Side-Tuning keeps less for backward than a Pfeiffer adapter (no backprop through
the backbone), and dropping the adapters of half the blocks keeps less too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_methods_runs_on_a_tiny_backbone(tmp_path) -> None:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("xlpeft_bench_methods", SCRIPTS / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    payload = module.main(["--backbone", "tiny", "--quick", "--budget", "1", "--out", str(tmp_path)])
    rows = payload["rows"]
    assert {"pfeiffer", "krona", "loreft", "adamix", "said", "far", "intrinsic-prompt", "s4", "ladder",
            "pfeiffer-drop-half"} <= set(rows)
    assert rows["ladder"]["activations_ratio"] < 1 and rows["pfeiffer-drop-half"]["activations_ratio"] < 1
    assert all(r["trainable"] > 0 and r["step_s"] > 0 for r in rows.values())
    assert json.loads((tmp_path / "methods-tiny.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert (tmp_path / "methods-tiny.md").read_text().startswith("| method |")
