"""Fuzzing the inputs a user or a file can hand xlpeft: adapter configs, adapter files, PEFT
configs, random byte flips of saved files.

Every outcome must be a project error (``XlpeftError``) that left the model exactly as it was,
or a correct load; never a raw exception, never a silently changed model.
``XLPEFT_FUZZ_EXAMPLES`` (examples per hypothesis test, default 100) and ``XLPEFT_FLIPS``
(byte flips, default 240) scale the runs up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftError
from xlpeft.methods import LoRAConfig
from xlpeft.methods.base import CONFIG_CLASSES
from xlpeft.methods.presets import preset
from tiny import tiny_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("XLPEFT_FUZZ_EXAMPLES", "100"))
FLIPS = int(os.environ.get("XLPEFT_FLIPS", "240"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))

FIELDS = sorted({f.name for cls in CONFIG_CLASSES.values() if dataclasses.is_dataclass(cls)
                 for f in dataclasses.fields(cls)})
WORDS = ["ffn", "attn", "cross", "q", "v", "k", "o", "ffn_up", "ffn_down", "encoder", "decoder", "relu",
         "gelu", "tanh", "sequential", "parallel", "random", "vocab", "", "bogus", ".*query", "(", "\x00"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0.01, 64), st.sampled_from(WORDS),
    st.text(max_size=12),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=4), st.dictionaries(st.text(max_size=4), SCALARS, max_size=2))


def _model() -> AdaptedModel:
    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    model.add_adapter("old", LoRAConfig(r=2))
    with torch.no_grad():
        for t in model.adapter_state_dict("old").values():
            t.uniform_(-1, 1)
    return model


def _state(model: AdaptedModel) -> tuple[list[str], dict[str, torch.Tensor]]:
    return list(model.adapter_names), {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: AdaptedModel, before: tuple) -> bool:
    names, state = before
    now = model.state_dict()
    return model.adapter_names == names and set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def _attempt(model: AdaptedModel, before: tuple, action) -> str | None:
    """Run ``action``; a project error must leave the model as it was. Returns the new adapter's name."""
    try:
        return action()
    except XlpeftError:
        assert _unchanged(model, before), "a failed operation changed the model"
        return None


# --------------------------------------------------------------------------- configs and files


def _paths(tree: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(meta: dict, path: tuple, value: object, delete: bool) -> dict:
    meta = json.loads(json.dumps(meta))
    if not path:
        return value if not delete else {}
    node = meta
    for step in path[:-1]:
        node = node[step]
    if delete and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return meta


BASES = [preset(name).to_dict() for name in ("pfeiffer", "houlsby", "lora", "ia3", "bitfit", "prefix", "prompt",
                                              "compacter", "madx-language", "unipelt")]


@st.composite
def adapter_configs(draw) -> object:
    """Mostly real configs with one or two fields changed, sometimes anything at all."""
    if not draw(st.integers(0, 9)):
        method = draw(st.one_of(st.sampled_from(sorted(CONFIG_CLASSES) + ["union"]), SCALARS))
        keys = draw(st.lists(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), max_size=4, unique=True))
        return {"method": method, **{k: draw(VALUES) for k in keys}}
    config = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(_paths(config)))
        config = _mutate(config, path, draw(VALUES), draw(st.integers(0, 4)) == 0)
    return config


def test_fuzz_adapter_configs() -> None:
    model = _model()
    before = _state(model)

    @SETTINGS
    @given(adapter_configs())
    def check(config: object) -> None:
        if _attempt(model, before, lambda: model.add_adapter("a", config)) is None:
            return
        again = model.configs["a"]
        assert type(again).__name__ and again.to_dict()  # a usable config came out
        model.delete_adapter("a")
        assert _unchanged(model, before), "add then delete must restore the model"

    check()


def _fuzz_directory(saved: Path, tmp: Path, loaded_ok, config_name: str = "adapter_config.json",
                    load=None, examples: int = EXAMPLES) -> None:
    meta = json.loads((saved / config_name).read_text())
    paths = _paths(meta)
    model = _model()
    before = _state(model)
    load = load or (lambda verify: model.load_adapter(str(tmp), verify=verify))

    @settings(SETTINGS, max_examples=examples)
    @given(st.sampled_from(paths), VALUES, st.booleans(), st.booleans())
    def check(path: tuple, value: object, delete: bool, verify: bool) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        text = json.dumps(_mutate(meta, path, value, delete), allow_nan=True)
        (tmp / config_name).write_text(text)
        loaded = _attempt(model, before, lambda: load(verify))
        if loaded is not None:
            assert not verify or text == json.dumps(meta), "a changed config passed the checksum"
            loaded_ok(model, loaded)

    check()


def test_fuzz_adapter_files(tmp_path: Path) -> None:
    src = _model()
    src.add_adapter("a", "madx-language")
    with torch.no_grad():
        for t in src.adapter_state_dict("a").values():
            t.uniform_(-1, 1)
    src.save_adapter("a", str(tmp_path / "a"))
    want = {k: v.clone() for k, v in src.adapter_state_dict("a").items()}

    def loaded_ok(model: AdaptedModel, name: str) -> None:
        got = model.adapter_state_dict(name)
        same = [k for k in want if k in got and got[k].shape == want[k].shape]
        assert all(torch.equal(got[k], want[k]) for k in same), "weights changed on the way in"
        model.delete_adapter(name)

    _fuzz_directory(tmp_path / "a", tmp_path / "work", loaded_ok)


def test_fuzz_peft_configs(tmp_path: Path) -> None:
    src = _model()
    src.add_adapter("a", LoRAConfig(r=2, alpha=4, targets=("q", "v")))
    with torch.no_grad():
        for t in src.adapter_state_dict("a").values():
            t.uniform_(-1, 1)
    src.save_adapter("a", str(tmp_path / "p"), format="peft")
    weights = sorted(v.flatten()[0].item() for v in src.adapter_state_dict("a").values())

    def loaded_ok(model: AdaptedModel, name: str) -> None:
        config = model.configs[name]
        assert isinstance(config, LoRAConfig) and config.r == 2
        assert sorted(v.flatten()[0].item() for v in model.adapter_state_dict(name).values()) == weights
        model.delete_adapter(name)

    _fuzz_directory(tmp_path / "p", tmp_path / "work", loaded_ok)


def test_fuzz_generator_files(tmp_path: Path) -> None:
    from xlpeft.generators import build_generator, load_generator, save_generator

    model = _model()
    gen = build_generator("madg", model, basis=2)
    save_generator(gen, tmp_path / "g")
    want = {k: v.clone() for k, v in gen.state_dict().items()}

    def loaded_ok(_, again) -> None:
        got = again.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want if k in got and got[k].shape == want[k].shape)

    _fuzz_directory(tmp_path / "g", tmp_path / "work", loaded_ok, "generator_config.json",
                    lambda verify: load_generator(tmp_path / "work", model, verify=verify), max(10, EXAMPLES // 2))


def test_fuzz_adapter_names(tmp_path: Path) -> None:
    model = _model()
    before = _state(model)

    @SETTINGS
    @given(st.text(max_size=200))
    def check(name: str) -> None:
        if _attempt(model, before, lambda: model.add_adapter(name, LoRAConfig(r=2))) is None:
            return
        model.save_adapter(name, str(tmp_path / "n"))
        model.delete_adapter(name)
        assert model.load_adapter(str(tmp_path / "n")) == name
        model.delete_adapter(name)
        assert _unchanged(model, before)

    check()


# --------------------------------------------------------------------------- byte flips


def test_random_byte_flips_never_load_silently(tmp_path: Path) -> None:
    src = _model()
    src.add_adapter("a", "madx-language")
    with torch.no_grad():
        for t in src.adapter_state_dict("a").values():
            t.uniform_(-1, 1)
    src.save_adapter("a", str(tmp_path / "a"))
    want = {k: v.clone() for k, v in src.adapter_state_dict("a").items()}
    names = ("adapter_model.safetensors", "adapter_config.json")
    files = {name: (tmp_path / "a" / name).read_bytes() for name in names}
    model = _model()
    before = _state(model)
    rng = random.Random(0)
    outcomes = {"refused": 0, "correct": 0, "silent": 0}
    for i in range(FLIPS):
        name = "adapter_config.json" if i % 6 == 5 else "adapter_model.safetensors"
        data = bytearray(files[name])
        data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(tmp_path / "a", work)
        (work / name).write_bytes(bytes(data))
        loaded = _attempt(model, before, lambda: model.load_adapter(str(work)))
        if loaded is None:
            outcomes["refused"] += 1
            continue
        got = model.adapter_state_dict(loaded)
        same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        outcomes["correct" if same and model.configs[loaded] == src.configs["a"] else "silent"] += 1
        model.delete_adapter(loaded)
    print(f"\n{FLIPS} byte flips: {outcomes}")
    assert outcomes["silent"] == 0
    assert _unchanged(model, before)
