"""Bad input gives a project error naming it, before anything large is allocated or changed.

Size bombs run in a child process whose address space is capped at 1 GiB above its size
after imports (``RLIMIT_AS``): each must end in an ``XlpeftError``, never a MemoryError
or a kill. Integrity: sha256 of data and config, dtype and value checks, PEFT keys,
backbone fields. Names and paths: printable, bounded, no separators or NUL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xlpeft import AdaptedModel
from xlpeft.errors import (
    ArtefactPathError, CorruptFileError, XlpeftError, XlpeftTypeError, XlpeftValueError, XlpeftWarning,
)
from xlpeft.generators import build_generator, load_generator, save_generator
from xlpeft.methods import BottleneckConfig, LoRAConfig, config_from_dict
from tiny import tiny_model

TESTS = Path(__file__).resolve().parent

BOMBS = textwrap.dedent('''
    import json, resource, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import torch
    from tiny import tiny_model
    from xlpeft import AdaptedModel
    from xlpeft.errors import XlpeftError
    from xlpeft.generators import build_generator, load_generator
    from xlpeft.methods import (BottleneckConfig, CompacterConfig, InvertibleConfig, LoRAConfig,
                                PrefixConfig, PromptConfig)

    model = AdaptedModel(tiny_model("bert", "masked-lm"))
    size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
    bombs = {{
        "lora r=1e7": lambda: model.add_adapter("x", LoRAConfig(r=10**7)),
        "bottleneck rf=1e-9": lambda: model.add_adapter("x", BottleneckConfig(reduction_factor=1e-9)),
        "invertible rf=1e-9": lambda: model.add_adapter("x", InvertibleConfig(reduction_factor=1e-9)),
        "prefix length=1e9": lambda: model.add_adapter("x", PrefixConfig(prefix_length=10**9)),
        "prefix mlp=1e9": lambda: model.add_adapter("x", PrefixConfig(bottleneck_size=10**9)),
        "prompt length=1e9": lambda: model.add_adapter("x", PromptConfig(prompt_length=10**9)),
        "compacter n=1e4": lambda: model.add_adapter("x", CompacterConfig(phm_dim=10**4)),
        "compacter rank=1e7": lambda: model.add_adapter("x", CompacterConfig(phm_rank=10**7)),
        "madg basis=1e9": lambda: build_generator("madg", model, basis=10**9),
        "madg language_dim=1e9": lambda: build_generator("madg", model, language_dim=10**9),
        "madg typology_hidden=1e9": lambda: build_generator("madg", model, typology_hidden=10**9),
        "hyperx source_dim=1e9": lambda: build_generator("hyperx", model, source_dim=10**9),
        "lora r=1e7 from a file": lambda: model.load_adapter(sys.argv[1]),
        "madg basis=1e9 from a file": lambda: load_generator(sys.argv[2], model),
    }}
    out = {{}}
    for name, bomb in bombs.items():
        try:
            bomb()
            out[name] = "no error"
        except XlpeftError as err:
            out[name] = "ok " + str(err)[:100]
        except BaseException as err:
            out[name] = f"raw {{type(err).__name__}}: {{str(err)[:100]}}"
    print(json.dumps(out))
''')


def _model() -> AdaptedModel:
    return AdaptedModel(tiny_model("bert", "masked-lm"))


def _edit(file: Path, edit) -> None:
    meta = json.loads(file.read_text())
    edit(meta)
    file.write_text(json.dumps(meta))


def test_size_bombs_fail_with_a_project_error_under_a_1_gib_address_space(tmp_path: Path) -> None:
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2))
    model.save_adapter("a", str(tmp_path / "lora"))
    _edit(tmp_path / "lora" / "adapter_config.json", lambda m: m["config"].update(r=10**7))
    save_generator(build_generator("madg", model, basis=2), tmp_path / "gen")
    _edit(tmp_path / "gen" / "generator_config.json", lambda m: m["config"].update(basis=10**9))
    script = BOMBS.format(tests=str(TESTS), root=str(TESTS.parent))
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lora"), str(tmp_path / "gen")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(results) == 14
    failed = {k: v for k, v in results.items() if not v.startswith("ok ")}
    assert not failed, failed
    assert "`r` can be 1..32" in results["lora r=1e7"]
    assert "`reduction_factor` can be 0.0625.." in results["bottleneck rf=1e-9"]
    assert "`basis` can be 1..64" in results["madg basis=1e9"]


# --------------------------------------------------------------------------- config values


@pytest.mark.parametrize("make, match", [
    (lambda: BottleneckConfig(reduction_factor="2"), r"`reduction_factor` can be a finite number; got str '2'"),
    (lambda: LoRAConfig(r=2.5), r"`r` can be an integer; got float 2.5"),
    (lambda: LoRAConfig(r=True), r"`r` can be an integer; got bool True"),
    (lambda: LoRAConfig(alpha=float("nan")), r"`alpha` can be a finite number; got float nan"),
    (lambda: LoRAConfig(targets="q"), r"`targets` can be a list of str"),
    (lambda: LoRAConfig(targets=["q", 3]), r"`targets` can be a list of str"),
    (lambda: BottleneckConfig(placement=[["ffn"]]), r"`placement` can be a list of str"),
    (lambda: config_from_dict({"method": ["lora"]}), r"`method` can be a method name .*; got list \['lora'\]"),
    (lambda: config_from_dict({"method": "union", "configs": [{"method": "union", "configs": []}]}),
     "no union inside a union"),
    (lambda: config_from_dict([1, 2]), r"an adapter config needs a 'method' key"),
])
def test_wrong_types_are_named(make, match: str) -> None:
    with pytest.raises((XlpeftTypeError, XlpeftValueError), match=match):
        make()


def test_lists_become_tuples() -> None:
    config = BottleneckConfig(placement=["attn", "ffn"], leave_out=[-1])
    assert config.placement == ("attn", "ffn") and config.leave_out == (-1,)
    assert hash(config) == hash(BottleneckConfig(placement=("attn", "ffn"), leave_out=(-1,)))


def test_bad_dict_config_leaves_the_model_unchanged() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(XlpeftTypeError, match="`reduction_factor` can be a finite number"):
        model.add_adapter("a", {"method": "bottleneck", "reduction_factor": "2"})
    assert model.adapter_names == [] and set(model.state_dict()) == set(before)


# --------------------------------------------------------------------------- names and paths


@pytest.mark.parametrize("name", ["a\x00b", "x" * 10_000, "tab\there", "a\\b", "new\nline"])
def test_bad_adapter_names_are_refused(name: str) -> None:
    with pytest.raises(XlpeftValueError, match="an adapter name must be a non-empty string of at most 128 printable"):
        _model().add_adapter(name, LoRAConfig(r=2))


def test_bad_name_in_a_file_is_refused(tmp_path: Path) -> None:
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2))
    model.save_adapter("a", str(tmp_path / "a"))
    _edit(tmp_path / "a" / "adapter_config.json", lambda m: m.update(name="a\x00" * 5000))
    fresh = _model()
    with pytest.raises(XlpeftError, match="adapter name must be"):
        fresh.load_adapter(str(tmp_path / "a"), verify=False)
    assert fresh.adapter_names == []


@pytest.mark.parametrize("path, match", [
    ("out\x00dir", "cannot contain a NUL"),
    ("x" * 10_000, "names of ≤ 255 bytes"),
    ("/", "root directory"),
])
def test_bad_save_and_load_paths_are_refused(path: str, match: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2))
    with pytest.raises(ArtefactPathError, match=match):
        model.save_adapter("a", path)
    if path != "/":
        with pytest.raises(ArtefactPathError, match=match):
            model.load_adapter(path)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- integrity


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2))
    with torch.no_grad():
        for t in model.adapter_state_dict("a").values():
            t.uniform_(-1, 1)
    model.save_adapter("a", str(tmp_path / "a"))
    return tmp_path / "a"


def _rewrite(saved: Path, change, keep_metadata: bool = True) -> None:
    file = saved / "adapter_model.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata=metadata if keep_metadata else None)


def test_checksums_are_recorded(saved: Path) -> None:
    with safe_open(str(saved / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert len(meta["xlpeft_sha256"]) == 64
    assert set(json.loads(meta["xlpeft_files_sha256"])) == {"adapter_config.json"}


def test_changed_weights_fail_the_checksum_unless_verify_is_off(saved: Path) -> None:
    key = "x"

    def change(t):
        nonlocal key
        key = next(iter(t))
        t[key] = t[key] + 0.5
    _rewrite(saved, change)
    model = _model()
    with pytest.raises(CorruptFileError, match="does not match its sha256.*verify=False"):
        model.load_adapter(str(saved))
    assert model.adapter_names == []
    model.load_adapter(str(saved), verify=False)
    assert model.adapter_names == ["a"]


def test_changed_config_fails_the_checksum(saved: Path) -> None:
    _edit(saved / "adapter_config.json", lambda m: m["config"].update(alpha=99.0))
    with pytest.raises(CorruptFileError, match=r"adapter_config.json does not match the sha256"):
        _model().load_adapter(str(saved))


def test_file_without_checksum_loads_with_a_warning(saved: Path) -> None:
    _rewrite(saved, lambda t: None, keep_metadata=False)
    with pytest.warns(XlpeftWarning, match="has no xlpeft checksum"):
        _model().load_adapter(str(saved))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_are_refused(value: float, saved: Path) -> None:
    def change(t):
        key = next(iter(t))
        t[key][0, 0] = value
    _rewrite(saved, change)
    model = _model()
    with pytest.raises(CorruptFileError, match="NaN or infinite values"):
        model.load_adapter(str(saved), verify=False)
    assert model.adapter_names == []


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.uint8])
def test_non_float_tensors_are_refused_not_cast(dtype: torch.dtype, saved: Path) -> None:
    def change(t):
        key = next(iter(t))
        t[key] = t[key].to(dtype)
    _rewrite(saved, change)
    model = _model()
    with pytest.raises(CorruptFileError, match="has dtype .*never casts silently"):
        model.load_adapter(str(saved), verify=False)
    assert model.adapter_names == []


@pytest.mark.parametrize("field", ["family", "hidden_size", "num_layers"])
def test_absent_backbone_fields_are_refused(field: str, saved: Path) -> None:
    _edit(saved / "adapter_config.json", lambda m: m["backbone"].pop(field))
    with pytest.raises(CorruptFileError, match=f"`backbone` lacks \\['{field}'\\]"):
        _model().load_adapter(str(saved), verify=False)


def test_deeply_nested_json_is_a_corrupt_file(saved: Path, tmp_path: Path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    (saved / "adapter_config.json").write_text(deep)
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        _model().load_adapter(str(saved))
    model = _model()
    save_generator(build_generator("madg", model, basis=2), tmp_path / "gen")
    (tmp_path / "gen" / "generator_config.json").write_text('{"kind": "madg", "config": ' + deep + "}")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        load_generator(tmp_path / "gen", model)


def test_generator_config_that_is_a_list(tmp_path: Path) -> None:
    model = _model()
    save_generator(build_generator("madg", model, basis=2), tmp_path / "gen")
    _edit(tmp_path / "gen" / "generator_config.json", lambda m: m.update(config=[1, 2]))
    with pytest.raises(CorruptFileError, match="`config` can be an object"):
        load_generator(tmp_path / "gen", model)
    (tmp_path / "gen" / "generator_config.json").write_text("[1, 2]")
    with pytest.raises(CorruptFileError, match="holds a JSON list, not an object"):
        load_generator(tmp_path / "gen", model)


# --------------------------------------------------------------------------- PEFT configs


@pytest.fixture
def peft_saved(tmp_path: Path) -> Path:
    model = _model()
    model.add_adapter("a", LoRAConfig(r=2, alpha=4))
    model.save_adapter("a", str(tmp_path / "p"), format="peft")
    return tmp_path / "p"


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(r="abc"), r"`r` can be an integer ≥ 1; got 'abc'"),
    (lambda m: m.update(lora_alpha=[1]), r"`lora_alpha` can be a number > 0; got \[1\]"),
    (lambda m: m.update(lora_dropout=2), r"`lora_dropout` can be a number in \[0, 1\)"),
    (lambda m: m.pop("r"), r"lacks \['r'\]"),
])
def test_bad_peft_values_are_named(edit, match: str, peft_saved: Path) -> None:
    _edit(peft_saved / "adapter_config.json", edit)
    model = _model()
    with pytest.raises(CorruptFileError, match=match):
        model.load_adapter(str(peft_saved), verify=False)
    assert model.adapter_names == []


def test_renamed_peft_key_is_named_and_refused(peft_saved: Path) -> None:
    _edit(peft_saved / "adapter_config.json", lambda m: m.update(lora_alpah=m.pop("lora_alpha")))
    lacks = pytest.raises(CorruptFileError, match=r"lacks \['lora_alpha'\]")
    with warnings.catch_warnings(record=True) as caught, lacks:
        warnings.simplefilter("always")
        _model().load_adapter(str(peft_saved), verify=False)
    assert not caught or "lora_alpah" in str(caught[0].message)


def test_unknown_peft_key_warns_by_name(peft_saved: Path) -> None:
    _edit(peft_saved / "adapter_config.json", lambda m: m.update(use_dorra=False))
    with pytest.warns(XlpeftWarning, match=r"'use_dorra' \(did you mean 'use_dora'\?\)"):
        _model().load_adapter(str(peft_saved), verify=False)


# --------------------------------------------------------------------------- vocabularies


def test_vocabulary_files_have_the_same_guarantees(tmp_path: Path) -> None:
    from lightning_tiny import tiny_bert_tokenizer
    from xlpeft.data.transliterate import transliterate
    from xlpeft.vocab import NewVocabConfig, VocabularySwitch, add_new_vocabulary, load_vocabulary, save_vocabulary

    latin = ["the lord said unto them and he shall be with him", "hello world the book is read"] * 20
    tok = tiny_bert_tokenizer()
    am = _model()
    add_new_vocabulary(am, "sat", [transliterate(t) for t in latin], tok, NewVocabConfig(vocab_size=20, factor_dim=8))
    am.add_adapter("a", LoRAConfig(r=2))
    am.save_adapter("a", str(tmp_path / "adapter"))
    with pytest.raises(ArtefactPathError, match="but no xlpeft vocabulary"):
        save_vocabulary(am, "sat", tmp_path / "adapter")
    path = save_vocabulary(am, "sat", tmp_path / "sat")
    save_vocabulary(am, "sat", tmp_path / "sat")  # its own kind: replaced
    file = path / "vocabulary.safetensors"
    good = file.read_bytes()
    data = bytearray(good)
    data[-3] ^= 0x40
    file.write_bytes(bytes(data))
    other = _model()
    with pytest.raises(CorruptFileError, match="does not match its sha256"):
        load_vocabulary(other, path, tokenizer=tok)
    assert VocabularySwitch.of(other) is None  # nothing was attached
    file.write_bytes(good)
    switch, _ = load_vocabulary(other, path, tokenizer=tok)
    assert "sat" in switch.vocabs
