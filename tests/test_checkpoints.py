"""Adapter-only Lightning checkpoints, resume, backbone mismatch, AdapterExport."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tiny import changed, save_tiny_backbone, snapshot, tiny_trainer
from xlpeft import AdaptedModel
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import IncompatibleAdapterError, XlpeftValueError
from xlpeft.lightning import AdapterExport, MaskedLMAdaptation

LANGS = ["eng", "swh"]
TEXT = {"eng": ["the lord said unto them", "and he shall be with him", "thou shall not", "in the beginning"],
        "swh": ["hapo mwanzo mungu", "na nchi ya maji", "juu ya uso wa maji", "mungu katika nchi"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A backbone with a wide FFN (so adapters are a small fraction) and text files."""
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny_backbone(root / "tiny-bert", ffn=512)
    save_tiny_backbone(root / "wide-bert", hidden=48)
    for lang, lines in TEXT.items():
        (root / f"{lang}.txt").write_text("\n".join(lines * 5) + "\n", encoding="utf-8")
    return root


def data(root: Path) -> MLMDataModule:
    files = {lang: str(root / f"{lang}.txt") for lang in LANGS}
    return MLMDataModule(languages=LANGS, backbone=str(root / "tiny-bert"), files=files, batch_size=4,
                         max_length=16)


def module(root: Path, name: str = "tiny-bert", **kwargs) -> MaskedLMAdaptation:
    return MaskedLMAdaptation(backbone=str(root / name), languages=LANGS, lr=1e-2, warmup_steps=2, **kwargs)


def adapters(m: MaskedLMAdaptation) -> dict[str, torch.Tensor]:
    return {f"{lang}/{k}": v.clone() for lang in LANGS for k, v in m.adapted.adapter_state_dict(lang).items()}


@pytest.fixture(scope="module")
def trained(root: Path) -> dict:
    """6 steps with a checkpoint every 3; returns paths and the adapters at step 6."""
    L.seed_everything(0)
    m = module(root)
    ckpt = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=3, save_top_k=-1,
                           filename="{step}")
    tiny_trainer(6, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt],
                 default_root_dir=str(root)).fit(m, data(root))
    return {"path": root / "ckpt" / "step=6.ckpt", "adapters": adapters(m), "module": m}


def test_checkpoint_holds_adapters_and_optimizer_not_the_backbone(root, trained):
    path = trained["path"]
    assert path.is_file() and (root / "ckpt" / "step=3.ckpt").is_file()
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    m = trained["module"]
    frozen = {id(p) for p in m.adapted.model.parameters()}
    own = m.state_dict(keep_vars=True)
    assert keys and not any(id(own[k]) in frozen for k in keys), "a frozen backbone tensor was saved"
    assert all(k.startswith(("adapted.points.", "adapted.shared.")) for k in keys), sorted(keys)[:5]
    assert keys == {k for k, v in own.items() if v.requires_grad}
    assert ckpt["xlpeft"]["backbone"]["hidden_size"] == 32 and set(ckpt["xlpeft"]["adapters"]) == set(LANGS)
    (state,) = ckpt["optimizer_states"]
    n_trainable = sum(1 for p in m.parameters() if p.requires_grad)
    assert len(state["state"]) == n_trainable and all("exp_avg" in s for s in state["state"].values())
    (sched,) = ckpt["lr_schedulers"]
    assert sched["last_epoch"] == 6
    backbone_bytes = (root / "tiny-bert" / "model.safetensors").stat().st_size
    rng_bytes = 16_000  # the global RNG states an exact resume restores (torch, Python, NumPy: ~10 KB)
    assert path.stat().st_size < backbone_bytes / 3 + rng_bytes, (path.stat().st_size, backbone_bytes)


class _AtStart(L.Callback):
    def on_train_start(self, trainer: L.Trainer, pl_module: MaskedLMAdaptation) -> None:
        self.step = trainer.global_step
        self.adapters = adapters(pl_module)
        self.lr_step = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_resume_continues_at_the_saved_step_with_the_saved_adapters(root, trained):
    L.seed_everything(1)
    fresh = module(root)
    spy = _AtStart()
    trainer = tiny_trainer(9, limit_val_batches=0, callbacks=[spy], default_root_dir=str(root))
    trainer.fit(fresh, data(root), ckpt_path=str(trained["path"]))
    assert spy.step == 6 and spy.lr_step == 6
    assert spy.adapters.keys() == trained["adapters"].keys()
    assert all(torch.equal(spy.adapters[k], v) for k, v in trained["adapters"].items())
    assert trainer.global_step == 9
    assert any(not torch.equal(v, trained["adapters"][k]) for k, v in adapters(fresh).items())


def test_backbone_is_intact_after_loading_a_checkpoint(root, trained):
    loaded = MaskedLMAdaptation.load_from_checkpoint(str(trained["path"]))
    assert all(torch.equal(v, trained["adapters"][k]) for k, v in adapters(loaded).items())
    reference = module(root)
    base = {k: v for k, v in snapshot(reference.adapted.model).items()}
    assert all(torch.equal(base[k], v) for k, v in loaded.adapted.model.state_dict().items())


def test_a_checkpoint_refuses_another_backbone(root, trained):
    with pytest.raises(IncompatibleAdapterError,
                       match=r"another backbone \(hidden_size: checkpoint 32 vs model 48\); use the backbone"):
        MaskedLMAdaptation.load_from_checkpoint(str(trained["path"]), backbone=str(root / "wide-bert"))


def test_a_checkpoint_with_other_languages_is_refused(root, trained):
    with pytest.raises(XlpeftValueError, match=r"checkpoint does not match this module: unexpected \['adapted"):
        MaskedLMAdaptation.load_from_checkpoint(str(trained["path"]), languages=["eng"])


def test_adapter_export_round_trip(root, tmp_path):
    L.seed_everything(0)
    m = module(root)
    tiny_trainer(3, limit_val_batches=0, callbacks=[AdapterExport(dirpath=str(tmp_path / "out"))]).fit(m, data(root))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == LANGS
    fresh = AdaptedModel.from_pretrained(str(root / "tiny-bert"), head="masked-lm").eval()
    for lang in LANGS:
        assert fresh.load_adapter(str(tmp_path / "out" / lang)) == lang
    m.eval()
    ids = torch.tensor([[2, 50, 51, 52, 3], [2, 90, 91, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        for route in (["eng", "swh"], ["swh", "eng"]):
            want = m.adapted(input_ids=ids, attention_mask=mask, adapters=route).logits
            got = fresh(input_ids=ids, attention_mask=mask, adapters=route).logits
            assert torch.equal(want, got)
        bare = fresh(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(bare, got), "the exported adapters must have trained"


def test_loaded_adapters_are_frozen_unless_trainable(root, trained, tmp_path):
    trained["module"].adapted.save_adapter("swh", str(tmp_path / "swh"))
    fresh = MaskedLMAdaptation(backbone=str(root / "tiny-bert"), languages=["eng"])
    name = fresh.adapted.load_adapter(str(tmp_path / "swh"))
    assert not any(p.requires_grad for m in fresh.adapted.adapter_modules(name) for p in m.parameters())
    fresh.adapted.delete_adapter(name)
    fresh.adapted.load_adapter(str(tmp_path / "swh"), is_trainable=True)
    assert all(p.requires_grad for m in fresh.adapted.adapter_modules("swh") for p in m.parameters())


def test_a_checkpoint_loads_beside_an_extra_frozen_adapter(root, trained, tmp_path):
    """E.g. test-time adaptation loads candidate adapters before the checkpoint is restored."""
    trained["module"].adapted.save_adapter("eng", str(tmp_path / "eng"))
    fresh = module(root)
    fresh.adapted.load_adapter(str(tmp_path / "eng"), name="extra")  # frozen, not in the checkpoint
    ckpt = torch.load(trained["path"], map_location="cpu", weights_only=True)
    fresh.load_state_dict(ckpt["state_dict"])
    assert all(torch.equal(v, trained["adapters"][k]) for k, v in adapters(fresh).items())
    fresh.adapted.add_adapter("new", "pfeiffer")  # trainable and absent: still refused
    with pytest.raises(XlpeftValueError, match="missing .*adapters.new"):
        fresh.load_state_dict(ckpt["state_dict"])


def test_a_wrong_shaped_tensor_loads_nothing(root, trained):
    """Before: torch's raw RuntimeError came after the other 15 tensors were already copied."""
    ckpt = torch.load(trained["path"], map_location="cpu", weights_only=True)
    state = dict(ckpt["state_dict"])
    key = sorted(state)[-1]  # copied last, so every other tensor would have been written first
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    fresh = module(root)
    before = snapshot(fresh)
    with pytest.raises(IncompatibleAdapterError,
                       match=rf"checkpoint tensor '{re.escape(key)}' can be .* got .*Nothing was loaded"):
        fresh.load_state_dict(state)
    assert not changed(before, fresh)
    state[key] = ckpt["state_dict"][key].double()  # right shape, wrong dtype: refused too
    with pytest.raises(IncompatibleAdapterError, match=r"torch.float32 \(this module's\); got .* torch.float64"):
        fresh.load_state_dict(state)
    assert not changed(before, fresh)
