"""Lightning training of generators: MAD-G by routed MLM, Hyper-X by task + MLM, checkpoints."""

from __future__ import annotations


import lightning as L
import pytest
import torch

from lightning_tiny import save_tiny_backbone, tiny_trainer, write_bible_files
from xlpeft.data.datamodules import MLMDataModule
from xlpeft.errors import IncompatibleAdapterError
from xlpeft.lightning.generator import GeneratorMLM, HyperXTraining

LANGS = ["eng", "swh"]
SMALL = {"reduction_factor": 4, "language_dim": 8, "typology_hidden": 16}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_backbone(tmp_path_factory.mktemp("gen") / "tiny-bert"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_bible_files(tmp_path_factory.mktemp("text"), LANGS)


def test_madg_trains_the_shared_generator_by_routed_mlm(backbone, files, tmp_path):
    L.seed_everything(0)
    module = GeneratorMLM(backbone, languages=LANGS, eval_languages=["tgl"], lr=1e-2,
                          generator_config={**SMALL, "basis": 4})
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    data = MLMDataModule(LANGS, backbone=backbone, files=files, batch_size=8, max_length=32)
    tiny_trainer(3, limit_val_batches=0, default_root_dir=str(tmp_path)).fit(module, data)
    after = module.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in module.adapted.model.parameters())
    assert "tgl" in module.adapted.configs  # held-out: generated, never trained on
    path = module.export_generator(tmp_path / "gen")
    again = GeneratorMLM(backbone, languages=LANGS, load_generator_from=str(path))
    assert all(torch.equal(a, b) for a, b in zip(again.generator.weights("tgl"), module.generator.weights("tgl")))
    other = save_tiny_backbone(tmp_path / "wide", hidden=48)
    with pytest.raises(IncompatibleAdapterError, match="hidden_size: file 32 vs model 48"):
        GeneratorMLM(str(other), languages=LANGS, load_generator_from=str(path))


def test_hyperx_trains_on_task_plus_mlm(backbone, files, tmp_path):
    L.seed_everything(0)
    module = HyperXTraining(backbone, languages=["swh"], task_languages=["eng"], labels=["a", "b"],
                            task="genre", generator_config=SMALL, lr=1e-2)
    assert {"swh", "eng_genre"} <= set(module.adapted.configs)
    tok_data = MLMDataModule(["swh"], backbone=backbone, files={"swh": files["swh"]}, batch_size=4, max_length=32)
    tok_data.setup("fit")
    mlm = next(iter(tok_data.train_dataloader()))
    task = {"input_ids": mlm["input_ids"], "attention_mask": mlm["attention_mask"],
            "labels": torch.tensor([0, 1, 0, 1])[: len(mlm["langs"])], "langs": ["eng"] * len(mlm["langs"])}
    module.train()
    before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):  # zero-init up-projections: the embeddings get gradient from step 2 on
        opt.zero_grad()
        module.training_step({"mlm": mlm, "task": task}, step).backward()
        opt.step()
    assert not torch.equal(before["task_embedding.weight"], module.generator.task_embedding.weight)
    assert module.task_logits({**task, "langs": ["quy"] * len(task["langs"])}).shape == (len(task["langs"]), 2)
    assert "quy_genre" in module.adapted.configs  # an unseen language gets a generated task adapter


# ---------------------------------------------------------------- generated-weight cache
def _generated_model(kind: str = "madg"):
    from tiny import run, tiny_batch, tiny_model
    from xlpeft import AdaptedModel
    from xlpeft.generators import build_generator

    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    extra = {"basis": 4} if kind == "madg" else {"tasks": ["mlm"]}
    gen = build_generator(kind, am, **SMALL, **extra)
    with torch.no_grad():  # non-identity: up-projections start at zero
        g = torch.Generator().manual_seed(0)
        for p in gen.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    name = gen.attach(am, "swh", "" if kind == "madg" else "mlm")
    batch = tiny_batch(am.model)
    return am, gen, lambda: run(am, batch, adapters=[name] * 4)


@pytest.mark.parametrize("write", ["data_copy", "data_assign", "data_mul", "no_grad_copy"])
@pytest.mark.parametrize("grad", [False, True])
def test_any_parameter_write_changes_the_generated_adapter(write, grad):
    """EMA/SWA-style ``p.data`` writes bump no version counter; the next forward must see them."""
    am, gen, out = _generated_model()
    am.eval()
    with torch.set_grad_enabled(grad):
        before = out()
        torch.testing.assert_close(out(), before)  # nothing changed: same output
        p = gen.up_basis
        new = p.detach() + 0.5 * torch.randn_like(p)
        if write == "data_copy":
            p.data.copy_(new)
        elif write == "data_assign":
            p.data = new.clone()
        elif write == "data_mul":
            p.data.mul_(0.2)
        else:
            with torch.no_grad():
                p.copy_(new)
        after = out()
    assert (after - before).abs().max() > 1e-4, f"{write}: the stale generated adapter was reused"
    gen.clear_cache()
    torch.testing.assert_close(out(), after)  # what a fresh generation gives


@pytest.mark.parametrize("kind", ["madg", "hyperx"])
def test_one_generation_per_language_per_forward(kind):
    """All slots of one forward share one generation (the cache still does its job)."""
    am, gen, out = _generated_model(kind)
    calls = []
    hook = gen.typology.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            out()
            out()
    finally:
        hook.remove()
    assert len(gen.slots) > 1 and 1 <= len(calls) <= 2, (len(gen.slots), len(calls))  # not one per slot


def test_direct_weights_calls_see_data_writes_too():
    am, gen, _ = _generated_model()
    first = gen.weights("swh")
    assert gen.weights("swh") is first  # unchanged parameters: cached
    gen.down_basis.data.mul_(2.0)
    again = gen.weights("swh")
    assert again is not first and not torch.allclose(again[0], first[0])


def test_held_out_languages_in_the_data_never_train_the_generator(tmp_path) -> None:
    """An eval_languages line in a training batch is dropped: a batch of only held-out text changes nothing."""
    import torch

    from lightning_tiny import save_tiny_backbone
    from xlpeft.lightning.generator import GeneratorMLM
    backbone = str(save_tiny_backbone(tmp_path / "tiny"))
    module = GeneratorMLM(backbone, languages=["eng", "spa"], eval_languages=["swh"],
                          generator_config={"reduction_factor": 4, "basis": 2, "language_dim": 4}).eval()
    ids = torch.randint(5, 90, (3, 8))
    labels = torch.where(torch.rand(ids.shape) < 0.5, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
             "langs": ["swh", "swh", "swh"]}
    assert module.training_step(batch, 0) is None
    mixed = dict(batch, langs=["eng", "swh", "spa"])
    loss = module.training_step(mixed, 0)
    only = {k: (v[[0, 2]] if torch.is_tensor(v) else [v[0], v[2]]) for k, v in mixed.items()}
    torch.testing.assert_close(loss, module.training_step(only, 0))
