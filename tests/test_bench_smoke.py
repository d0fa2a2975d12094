"""Smoke tests of ``scripts/bench_*.py``: smallest settings on tiny random backbones.

They check that each script runs end to end and writes the JSON and Markdown it
promises, with the keys readers rely on. Timings are never checked: speed is a
benchmark's report, not a test (DESIGN.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
RATIO_KEYS = {"median_paired_ratio", "ratio_of_medians", "ratio_of_mins"}


def _script(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"xlpeft_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(autouse=True)
def _isolated(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny backbones go to a temporary cache; threads, env and transformers logging are restored."""
    import transformers
    monkeypatch.setenv("OMP_WAIT_POLICY", os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    monkeypatch.setattr(importlib.import_module("_bench"), "BENCH_CACHE", cache)
    threads, verbosity = torch.get_num_threads(), transformers.utils.logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.enable_progress_bar()


def _timing_ok(timing: dict, variants: set[str]) -> None:
    assert set(timing["samples"]) == variants
    assert {"loadavg_start", "loadavg_end", "rounds"} <= set(timing)
    assert all(len(v) == timing["rounds"] >= 1 for v in timing["samples"].values())


def test_bench_core_smoke(tmp_path: Path) -> None:
    core = _script("bench_core")
    core.main(["--backbone", "tiny", "--quick", "--reps", "1", "--warmup", "0", "--threads", "1",
               "--out", str(tmp_path)])
    data = json.loads((tmp_path / "core-tiny.json").read_text())
    assert {"benchmark", "backbone", "batch", "seq", "loss", "env", "args", "results"} <= set(data)
    assert {"loadavg_start", "loadavg_end", "torch_threads", "omp_wait_policy"} <= set(data["env"])
    res = data["results"]
    assert set(res) == {"frozen_vs_full", "xlpeft_vs_peft", "routed8_vs_one_pfeiffer",
                        "routed8_vs_one_lora", "merged_vs_bare"}
    _timing_ok(res["frozen_vs_full"]["timing"], {"full", "adapters"})
    _timing_ok(res["xlpeft_vs_peft"]["timing"], {"xlpeft", "peft"})
    _timing_ok(res["routed8_vs_one_lora"]["timing"], {"one", "routed8"})
    _timing_ok(res["merged_vs_bare"]["timing"], {"bare", "merged", "unmerged"})
    for r in res.values():
        assert set(r["ratio"]) == RATIO_KEYS and "target" in r
    assert res["xlpeft_vs_peft"]["max_abs_diff"] < 1e-4
    memory = res["frozen_vs_full"]["memory"]
    assert set(memory) == {"full", "adapters"}
    for row in memory.values():
        assert {"loaded_rss_mb", "peak_rss_mb", "train_extra_mb", "trainable_params",
                "grad_adamw_analytic_mb"} <= set(row)
    assert memory["adapters"]["trainable_params"] < memory["full"]["trainable_params"]
    assert (tmp_path / "core-tiny.md").read_text().startswith("| comparison")


def test_bench_mlm_smoke(tmp_path: Path) -> None:
    mlm = _script("bench_mlm")
    mlm.main(["--backbone", "tiny", "--quick", "--lines", "200", "--steps", "3", "--reps", "1",
              "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "mlm-tiny-32.json").read_text())
    assert {"benchmark", "batch", "seq", "languages", "env", "results"} <= set(data)
    logits, loop = data["results"]["logits"], data["results"]["loop"]
    _timing_ok(logits["timing"], {"a_masked_trimmed", "b_all_full"})
    assert {"step_median_s", "tokens_per_s", "vocab"} <= set(logits["variants"]["a_masked_trimmed"])
    assert logits["tokens_per_step"] == 4 * 32
    assert set(logits["speedup_a_over_b"]) == RATIO_KEYS
    _timing_ok(loop["timing"], {"lightning", "plain"})
    assert set(loop["ratio"]) == RATIO_KEYS and set(loop["tokens_per_s"]) == {"lightning", "plain"}
    assert "Lightning / plain" in (tmp_path / "mlm-tiny-32.md").read_text()
