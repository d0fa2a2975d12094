"""TestTimeAdaptation: EMEA per-layer ensembles and TENT, restored after test, resumable."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_tiny import perturb, save_tiny_backbone, snapshot, tiny_bert_tokenizer, tiny_trainer
from xlpeft import AdaptedModel, Average, Stack
from xlpeft.data.labelled import LabelledDataModule
from xlpeft.errors import IncompatibleAdapterError, XlpeftValueError
from xlpeft.lightning import TaskAdaptation
from xlpeft.lightning.tta import EnsembleWeights, TestTimeAdaptation, entropy

TEXTS = [("mungu na nchi", "pos"), ("juu ya maji", "neg"), ("hapo mungu", "pos"), ("kwa maji", "neg"),
         ("the lord said", "pos"), ("they be not", "neg")]
CANDS = ["eng", "swh", "tgl"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tta")
    backbone = str(save_tiny_backbone(root / "tiny-bert"))
    model = AdaptedModel.from_pretrained(backbone, head="base")
    for i, lang in enumerate(CANDS):
        model.add_adapter(lang, "pfeiffer")
    perturb(model, ("points.", "shared."), scale=0.5, seed=3)
    for lang in CANDS:
        model.save_adapter(lang, str(root / lang))
    other = str(save_tiny_backbone(root / "other-bert", hidden=16))
    foreign = AdaptedModel.from_pretrained(other, head="base").add_adapter("xx", "pfeiffer")
    foreign.save_adapter("xx", str(root / "foreign"))
    (root / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y, "lang": "mig"}) + "\n"
                                             for t, y in TEXTS), encoding="utf-8")
    return {"backbone": backbone, "root": str(root), "test": str(root / "test.jsonl"),
            "foreign": str(root / "foreign")}


def make(setup: dict[str, str]) -> TaskAdaptation:
    module = TaskAdaptation(backbone=setup["backbone"], labels=["neg", "pos"], task_adapter="task",
                            language_adapters={c: f"{setup['root']}/{c}" for c in CANDS}, eval_mode="source")
    perturb(module, ("adapted.points.", "head."), scale=0.5, seed=4)
    return module.eval()


def data(setup: dict[str, str]) -> LabelledDataModule:
    dm = LabelledDataModule(test=setup["test"], labels=["neg", "pos"], backbone=setup["backbone"], batch_size=6)
    dm.tokenizer = tiny_bert_tokenizer()
    return dm


def batch(setup: dict[str, str]) -> dict:
    dm = data(setup)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


def test_uniform_weights_equal_the_core_average(setup):
    module, b = make(setup), batch(setup)
    modules = {k: dict(p.adapters.items()) for k, p in module.adapted.points.items()}
    with torch.no_grad():
        module.eval_setups["mig"] = Stack(Average(*CANDS), "task")
        plain = module(b)
        cb = TestTimeAdaptation(method="uniform", candidates=CANDS)
        cb.setup(None, module, "test")
        cb.adapt(module, b)
        ensembled = module(b)
        module.eval_setups["mig"] = Stack("swh", "task")
        alone = module(b)
    assert isinstance(module.adapted.state.weighers[Average(*CANDS)], EnsembleWeights)
    assert {k: dict(p.adapters.items()) for k, p in module.adapted.points.items()} == modules  # no wrapping
    torch.testing.assert_close(ensembled, plain)
    assert (ensembled - alone).abs().max() > 1e-4  # the ensemble is not one adapter


def test_one_hot_layer_weights_select_one_adapter(setup):
    module, b = make(setup), batch(setup)
    with torch.no_grad():
        module.eval_setups["mig"] = Stack("swh", "task")
        alone = module(b)
        cb = TestTimeAdaptation(method="uniform", candidates=CANDS)
        cb.setup(None, module, "test")
        cb.adapt(module, b)
        cb._ensemble.theta.copy_(torch.tensor([-1e4, 1e4, -1e4]).expand_as(cb._ensemble.theta))
        torch.testing.assert_close(module(b), alone)


def test_entropy_decreases_after_emea_steps(setup):
    module, b = make(setup), batch(setup)
    cb = TestTimeAdaptation(method="emea", steps=10, lr=0.5, candidates=CANDS)
    cb.setup(None, module, "test")
    cb.adapt(module, b)
    lang, before, after = cb.entropy_log[-1]
    assert lang == "mig" and after < before - 1e-4, cb.entropy_log
    weights = cb.layer_weights()
    layers = sum(any(c in p.adapters for c in CANDS) for p in module.adapted.points.values())
    assert weights.shape == (layers, len(CANDS)) and layers == 2  # one Pfeiffer adapter per block
    assert not torch.allclose(weights, torch.full_like(weights, 1 / 3))  # moved away from uniform
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


@pytest.mark.parametrize("method", ["emea", "tent"])
def test_everything_is_restored_after_test(setup, method):
    module = make(setup)
    before = snapshot(module)
    modules = {k: dict(p.adapters.items()) for k, p in module.adapted.points.items()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    cb = TestTimeAdaptation(method=method, steps=2, lr=0.5, candidates=CANDS, reset=False,
                            tent_params=("layernorm", "adapters"))
    tiny_trainer(1, callbacks=[cb]).test(module, data(setup), verbose=False)
    assert cb.entropy_log, "no adaptation ran"
    after = snapshot(module)
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: dict(p.adapters.items()) for k, p in module.adapted.points.items()} == modules
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert module.eval_setups == {}
    assert module.adapted.state.weighers == {}


def test_tent_changes_predictions_inside_test_and_keep_keeps_them(setup):
    module = make(setup)
    ln = next(m for m in module.adapted.model.modules() if isinstance(m, torch.nn.LayerNorm))
    original = ln.weight.detach().clone()
    cb = TestTimeAdaptation(method="tent", steps=3, lr=0.05, keep=True)
    tiny_trainer(1, callbacks=[cb]).test(module, data(setup), verbose=False)
    assert not torch.equal(ln.weight, original)
    cb.restore(module)
    assert torch.equal(ln.weight, original)


def test_state_survives_checkpoint_and_resume(setup, tmp_path):
    module = make(setup)
    cb = TestTimeAdaptation(method="emea", steps=2, lr=0.5, candidates=CANDS, reset=False)
    trainer = tiny_trainer(1, callbacks=[cb], default_root_dir=str(tmp_path))
    trainer.test(module, data(setup), verbose=False)
    path = tmp_path / "tta.ckpt"
    trainer.save_checkpoint(path)
    fresh = TestTimeAdaptation(method="emea", steps=0, lr=0.5, candidates=CANDS, reset=False)
    tiny_trainer(1, callbacks=[fresh]).test(make(setup), data(setup), ckpt_path=str(path), verbose=False)
    assert set(fresh.tables) == {"mig"}
    torch.testing.assert_close(fresh.tables["mig"], cb.tables["mig"])
    assert fresh.entropy_log[: len(cb.entropy_log)] == [tuple(e) for e in cb.entropy_log]
    with pytest.raises(XlpeftValueError, match="method 'emea'"):
        TestTimeAdaptation(method="tent").load_state_dict(cb.state_dict())


def test_no_candidates_is_refused(setup):
    module = make(setup)
    with pytest.raises(XlpeftValueError, match="`candidates` can be .*; got none"):
        TestTimeAdaptation(method="emea").setup(None, module, "test")
    with pytest.raises(XlpeftValueError, match="not loaded"):
        TestTimeAdaptation(method="emea", candidates=["fra"]).setup(None, module, "test")


def test_candidate_for_another_backbone_is_refused(setup):
    module = make(setup)
    cb = TestTimeAdaptation(method="emea", candidate_dirs={"xx": setup["foreign"]})
    with pytest.raises(IncompatibleAdapterError):
        cb.setup(None, module, "test")
    assert "xx" not in module.adapted.configs


@pytest.mark.parametrize("kwargs, match", [({"method": "bogus"}, "`method` can be emea, tent"),
                                           ({"tent_params": ["bias"]}, "`tent_params` can be layernorm"),
                                           ({"steps": -1}, "`steps` must be ≥ 0")])
def test_bad_options(kwargs, match):
    with pytest.raises(XlpeftValueError, match=match):
        TestTimeAdaptation(**kwargs)


def test_typology_picks_candidates(setup):
    cb = TestTimeAdaptation(method="emea", candidates=["eng", "deu", "swh", "tgl", "ind"], top_k=2)
    cb.pool = cb.candidates
    picked = cb.candidates_for("mig")
    assert len(picked) == 2 and set(picked) <= set(cb.candidates)


def test_entropy_of_uniform_logits_is_log_classes():
    assert float(entropy(torch.zeros(3, 4))) == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_a_failed_setup_unloads_what_it_loaded(setup):
    module = make(setup)
    cb = TestTimeAdaptation(method="emea", candidates=["zz", "yy"],
                            candidate_dirs={"zz": f"{setup['root']}/eng"})
    with pytest.raises(XlpeftValueError, match=r"\['yy'\] are not loaded"):
        cb.setup(None, module, "test")
    assert "zz" not in module.adapted.configs


def test_nothing_runs_during_fit(setup):
    cb = TestTimeAdaptation(method="emea", candidates=CANDS)
    cb.setup(None, make(setup), "fit")
    cb.on_validation_batch_start(None, None, {"langs": ["mig"]}, 0)  # would fail if it adapted
    assert cb.entropy_log == []


class FailingHead(torch.nn.Module):
    """The task head, raising on its ``fail_at``-th call (a failure mid-adaptation)."""

    def __init__(self, head: torch.nn.Module, fail_at: int) -> None:
        super().__init__()
        self.head, self.fail_at, self.calls = head, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom mid-adaptation")
        return self.head(x)


@pytest.mark.parametrize("method", ["emea", "tent"])
def test_user_eval_setups_come_back_as_they_were(setup, method):
    module = make(setup)
    mine = {"mig": Stack("eng", "task"), "swh": Stack("swh", "task")}
    module.eval_setups.update(mine)
    cb = TestTimeAdaptation(method=method, steps=1, lr=0.5, candidates=CANDS)
    tiny_trainer(1, callbacks=[cb]).test(module, data(setup), verbose=False)
    assert cb.entropy_log, "no adaptation ran"
    assert module.eval_setups == mine


@pytest.mark.parametrize("method", ["emea", "tent"])
def test_a_failure_mid_adaptation_restores_modes_and_flags(setup, method):
    module = make(setup)
    module.head = FailingHead(module.head, fail_at=2)
    module.train()
    module.adapted.model.embeddings.eval()  # a mixed mode the steps must not flatten
    modes = {n: m.training for n, m in module.named_modules()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    cb = TestTimeAdaptation(method=method, steps=3, lr=0.5, candidates=CANDS)
    cb.setup(None, module, "test")
    with pytest.raises(RuntimeError, match="boom mid-adaptation"):
        cb.adapt(module, batch(setup))
    assert {n: m.training for n, m in module.named_modules()} == modes
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags


def test_a_failed_test_run_restores_the_model(setup):
    module = make(setup)
    module.head = FailingHead(module.head, fail_at=3)
    user = {"mig": Stack("eng", "task")}
    module.eval_setups.update(user)
    names = list(module.adapted.adapter_names)
    before = snapshot(module)
    cb = TestTimeAdaptation(method="emea", steps=3, lr=0.5, candidate_dirs={"xtgl": f"{setup['root']}/tgl"},
                            candidates=["eng", "xtgl"], keep=True)
    with pytest.raises(RuntimeError, match="boom mid-adaptation"):
        tiny_trainer(1, callbacks=[cb]).test(module, data(setup), verbose=False)
    assert module.adapted.adapter_names == names  # the candidate it loaded is gone
    assert module.eval_setups == user
    assert module.adapted.state.weighers == {}
    after = snapshot(module)
    assert all(torch.equal(before[k], after[k]) for k in before)
