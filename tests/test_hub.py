"""Hub repo ids: loaded offline from a cache laid out as huggingface_hub lays it; pushes mocked at HfApi."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel
from xlpeft.errors import XlpeftTypeError, XlpeftValueError

ADAPTERHUB = Path(__file__).parent / "fixtures" / "adapterhub"


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Put ``folder``'s files in ``cache`` as the Hub client does: blobs by hash, snapshot symlinks, refs."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # repo ids are not local paths here
    return cache


@pytest.fixture
def hub_backbone(tmp_path: Path, offline_cache: Path) -> torch.nn.Module:
    model = tiny_model("bert", "base")
    model.save_pretrained(tmp_path / "saved")
    cache_repo(offline_cache, "someorg/tiny-bert", tmp_path / "saved", "a" * 40)
    return model


def test_backbone_and_adapter_by_repo_id_offline(hub_backbone, tmp_path: Path, offline_cache: Path) -> None:
    model = AdaptedModel.from_pretrained("someorg/tiny-bert")
    batch = tiny_batch(model.model)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, hub_backbone(**batch).last_hidden_state)
        model.add_adapter("swh", "pfeiffer")
        for p in model.adapter_modules("swh"):
            for q in p.parameters():
                q.normal_(0, 0.2)
    model.set_active("swh")
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_adapter("swh", str(tmp_path / "swh"))
    cache_repo(offline_cache, "someorg/swh-adapter", tmp_path / "swh", "b" * 40)
    other = AdaptedModel.from_pretrained("someorg/tiny-bert")
    assert other.load_adapter("someorg/swh-adapter", name="swh2", set_active=True) == "swh2"
    with torch.no_grad():
        assert torch.equal(other(**batch).last_hidden_state, expected)
    other.load_adapter("someorg/swh-adapter", name="pinned", revision="b" * 40)  # a commit hash too


def test_adapterhub_adapter_by_repo_id(offline_cache: Path) -> None:
    cache_repo(offline_cache, "someorg/tiny-xlmr", ADAPTERHUB / "xlm-roberta" / "model", "c" * 40)
    cache_repo(offline_cache, "AdapterHub/tiny-xlmr-seqbn", ADAPTERHUB / "xlm-roberta" / "seqbn", "d" * 40)
    model = AdaptedModel.from_pretrained("someorg/tiny-xlmr")
    model.load_adapter("AdapterHub/tiny-xlmr-seqbn", set_active=True)
    from safetensors.torch import load_file
    outputs = load_file(str(ADAPTERHUB / "outputs.safetensors"))
    with torch.no_grad():
        out = model(input_ids=outputs["input_ids"], attention_mask=outputs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(out, outputs["xlm-roberta/seqbn"], atol=1e-5, rtol=0)


def test_uncached_ids_give_clear_errors(hub_backbone, offline_cache: Path) -> None:
    with pytest.raises(XlpeftValueError, match=r"'someorg/missing' is no local folder and not in the Hugging "
                                               r"Face cache .*offline \(HF_HUB_OFFLINE"):
        AdaptedModel.from_pretrained("someorg/missing")
    model = AdaptedModel.from_pretrained("someorg/tiny-bert")
    with pytest.raises(XlpeftValueError, match="adapter 'someorg/nope' at revision 'v2' is no local folder"):
        model.load_adapter("someorg/nope", revision="v2")
    with pytest.raises(XlpeftValueError, match="apply to Hub repo ids"):
        model.load_adapter(str(ADAPTERHUB / "bert" / "seqbn"), revision="main")
    with pytest.raises(XlpeftTypeError, match="Hub arguments can be"):
        model.load_adapter("someorg/nope", branch="main")
    assert model.adapter_names == []


def test_local_files_only_without_offline_env(hub_backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    model = AdaptedModel.from_pretrained("someorg/tiny-bert", local_files_only=True)
    assert model.layout.family == "bert"


class FakeApi:
    """``huggingface_hub.HfApi`` at its boundary: records calls, keeps a copy of the uploaded folder."""

    calls: list = []

    def __init__(self, token=None) -> None:
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        FakeApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, create_pr=None, **kw):
        keep = Path(FakeApi.keep) / repo_id.replace("/", "--")
        shutil.copytree(folder_path, keep)
        FakeApi.calls.append(("upload_folder", repo_id, commit_message, self.token))
        return "commit-info"


def test_push_adapter_to_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls, FakeApi.keep = [], tmp_path
    model = AdaptedModel(tiny_model("bert", "base"))
    model.add_adapter("swh", "madx-language-seqbn")
    assert model.push_adapter_to_hub("swh", "me/swh-adapter", private=True, token="t0k") == "commit-info"
    model.add_adapter("lora", "lora")
    model.push_adapter_to_hub("lora", "me/lora-adapters", format="adapters")
    assert FakeApi.calls[:2] == [("create_repo", "me/swh-adapter", True, True),
                                 ("upload_folder", "me/swh-adapter", "Upload xlpeft adapter swh", "t0k")]
    pushed = tmp_path / "me--swh-adapter"
    assert {p.name for p in pushed.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert "library_name: xlpeft" in (pushed / "README.md").read_text()
    again = AdaptedModel(tiny_model("bert", "base"))
    assert again.load_adapter(str(pushed)) == "swh"
    assert again.load_adapter(str(tmp_path / "me--lora-adapters")) == "lora"  # AdapterHub layout
    assert (tmp_path / "me--lora-adapters" / "adapter.safetensors").is_file()
    with pytest.raises(XlpeftValueError, match="'owner/name'"):
        model.push_adapter_to_hub("swh", "no spaces/allowed here")


def test_embedded_names_and_local_paths_never_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xlpeft.ops.hub import adapter_folder, model_folder

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    for name in ("embedded", "embedded-base", "xlpeft/multilingual-e5-small"):
        assert model_folder(name, {}) == name
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    kwargs = {"revision": "main"}
    assert model_folder("owner/name", kwargs) == "owner/name" and kwargs == {"revision": "main"}
    assert adapter_folder("owner/name") == "owner/name"  # a local folder of that name wins
