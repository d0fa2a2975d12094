"""Smoke tests of ``scripts/bench_sft.py`` and ``scripts/sft_transfer.py`` on tiny random backbones.

They check that the scripts run end to end and write what they promise; no timing or
accuracy is checked (a benchmark reports, a test does not judge speed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from lightning_tiny import save_tiny_backbone
from xlpeft.data.datamodules import load_tokenizer
from xlpeft.lightning.transfer import EvalConfig, predict

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str) -> ModuleType:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"xlpeft_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_sft_quick(tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_BENCH_CACHE", str(tmp_path / "cache"))
    bench = _script("bench_sft")
    monkeypatch.setattr(bench, "tiny_unigram_backbone", _script("_bench").tiny_unigram_backbone)
    monkeypatch.setattr(sys, "argv", ["bench_sft.py", "--quick", "--reps", "1", "--budget", "1",
                                      "--out", str(tmp_path)])
    bench.main()
    report = json.loads((tmp_path / "bench_sft_quick.json").read_text())
    assert set(report["memory"]) == {"full", "phase1", "phase2", "adapter", "phase2-2g"}
    assert report["memory"]["phase2"]["optimizer_state_mb"] < report["memory"]["full"]["optimizer_state_mb"]
    assert set(report["inference"]["samples"]) == {"bare", "sft", "merged"}
    assert (tmp_path / "bench_sft_quick.md").read_text().count("|") > 20


def test_sft_transfer_pieces_on_a_tiny_backbone(tmp_path):
    transfer = _script("sft_transfer")
    backbone = str(save_tiny_backbone(tmp_path / "tiny-bert"))
    cfg = EvalConfig(out=str(tmp_path), targets=("swh",), seeds=(0,), per_genre=2, eval_per_genre=1, passage=1,
                     max_length=32, lines_per_language=20, batch_size=4, bootstrap=50, setups=transfer.SETUPS)
    train, tests = transfer.genre_sets(cfg, load_tokenizer(backbone))
    folder = transfer.language_sfts(cfg, backbone, 2, tmp_path / "cache" / "language-sfts")
    assert sorted(p.name for p in folder.iterdir()) == ["eng", "swh"]
    module = transfer.task_sft(cfg, backbone, folder, train, 0, 4)
    assert module.switched and module.adapted.configs["genre"].method == "sft"
    rows = {}
    for lang, data in tests.items():
        gold = np.asarray(data["label"])
        correct = {s: np.stack([predict(module, data, s, 8) == gold]) for s in transfer.SETUPS}
        rows[lang] = {"role": lang, "madx": transfer.cells(correct, 50), "sft": transfer.cells(correct, 50),
                      "delta": {s: {"delta": 0.0, "lo": 0.0, "hi": 0.0} for s in transfer.SETUPS}}
    table = transfer.markdown({"languages": rows})
    assert table.count("\n") == 1 + 2 * len(transfer.SETUPS)
