"""DDP on CPU (gloo, 2 processes): ranks end with identical adapters, exported once,
and report identical per-language validation results over the whole validation set.

Runs ``tests/ddp_worker.py`` in a subprocess (its own session, so a hang is
killed with all its ranks). Plain ``strategy="ddp"`` is refused by
MaskedLMAdaptation for routed multi-language runs (it hangs: see the worker);
the worker uses ``ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240


def run_worker(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(out), *args], cwd=str(ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the rank it started
        output, _ = proc.communicate()
        pytest.fail(f"DDP worker hung for {TIMEOUT} s; its output ends:\n{output[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available in this build")
def test_ddp_ranks_agree_and_export_once(tmp_path):
    result = run_worker(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "rank 0 of 2 done at step 4" in result.stdout and "rank 1 of 2 done at step 4" in result.stdout
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    init = load_file(str(tmp_path / "init.safetensors"))
    assert rank0.keys() == rank1.keys() == init.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    for lang in ("eng", "swh"):
        assert any(not torch.equal(rank0[k], init[k]) for k in rank0 if k.startswith(f"{lang}/")), \
            f"adapter {lang} did not train"
    exported = sorted(p.name for p in (tmp_path / "adapters").iterdir())
    assert exported == ["eng", "swh"], exported
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and "adapter" in p.name] == ["adapters"]
    assert result.stdout.count("[xlpeft] adapter written to") == 2, "export ran on more than one rank"
    for lang in ("eng", "swh"):
        saved = load_file(str(tmp_path / "adapters" / lang / "adapter_model.safetensors"))
        assert all(torch.equal(v, rank0[f"{lang}/{k}"]) for k, v in saved.items())
    # evaluation: every rank reports the results of the whole validation set
    results = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in (0, 1)]
    assert results[0] == results[1], "ranks report different validation results"
    assert set(results[0]["mlm"]) == {"eng", "swh"} and set(results[0]["task"]) == {"eng", "swh"}
    assert all(row["examples"] == 8 for row in results[0]["task"].values()), results[0]["task"]
