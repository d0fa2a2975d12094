"""TaskAdaptation: task adapter over frozen language adapters, eval routing, metrics, span F1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_tiny import changed, perturb, save_tiny_backbone, snapshot, tiny_bert_tokenizer, tiny_trainer
from xlpeft import AdaptedModel, Stack
from xlpeft.data.labelled import LabelledDataModule
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.lightning import TaskAdaptation
from xlpeft.lightning.spans import span_f1, spans

POS = ["the lord said unto them", "and he shall be with him", "the lord is with them", "he is the lord"]
NEG = ["thou shall not", "they be not", "not for them", "it is not"]
SWH = [("mungu na nchi", "pos"), ("juu ya maji", "neg"), ("hapo mungu", "pos"), ("kwa maji", "neg")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny backbone, perturbed eng/swh language adapters saved as directories, toy data files."""
    root = tmp_path_factory.mktemp("task")
    backbone = str(save_tiny_backbone(root / "tiny-bert"))
    model = AdaptedModel.from_pretrained(backbone, head="base")
    for lang in ("eng", "swh"):
        model.add_adapter(lang, "madx-language")
    perturb(model, ("points.", "shared."), seed=1)
    for lang in ("eng", "swh"):
        model.save_adapter(lang, str(root / lang))
    rows = [f"{t}\tpos" for t in POS] + [f"{t}\tneg" for t in NEG]
    (root / "train.tsv").write_text("\n".join(rows * 3) + "\n", encoding="utf-8")
    (root / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y, "lang": "swh"}) + "\n"
                                             for t, y in SWH), encoding="utf-8")
    return {"backbone": backbone, "eng": str(root / "eng"), "swh": str(root / "swh"),
            "train": str(root / "train.tsv"), "test": str(root / "test.jsonl")}


def make(setup: dict[str, str], **kwargs) -> TaskAdaptation:
    options = dict(backbone=setup["backbone"], labels=["neg", "pos"], lr=1e-2,
                   language_adapters={"eng": setup["eng"], "swh": setup["swh"]})
    return TaskAdaptation(**{**options, **kwargs})


def data(setup: dict[str, str], **kwargs) -> LabelledDataModule:
    dm = LabelledDataModule(train=setup["train"], val=setup["train"], test=setup["test"],
                            backbone=setup["backbone"], batch_size=8, **kwargs)
    dm.tokenizer = tiny_bert_tokenizer()
    return dm


def fixed_loss(module: TaskAdaptation, dm: LabelledDataModule) -> float:
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        loss = F.cross_entropy(module(batch), batch["labels"])
    module.train()
    return float(loss)


def test_seq_cls_trains_task_adapter_and_head_only(setup):
    torch.manual_seed(0)
    module = make(setup)
    dm = data(setup)
    dm.setup("fit")
    assert not any(p.requires_grad for n, p in module.adapted.named_parameters()
                   if ".eng." in n or ".swh." in n or n.startswith(("shared.eng", "shared.swh")))
    before, loss_before = snapshot(module), fixed_loss(module, dm)
    tiny_trainer(25, limit_val_batches=0).fit(module, dm)
    moved = changed(before, module)
    assert any(".task." in k for k in moved) and {"head.1.weight", "head.1.bias"} <= moved
    assert all(".task." in k or k.startswith("head.") for k in moved), sorted(moved)[:5]
    assert fixed_loss(module, dm) < loss_before - 0.2


def test_results_per_language_have_accuracy_and_macro_f1(setup):
    module = make(setup)
    trainer = tiny_trainer(1)
    dm = data(setup)
    trainer.test(module, dm, verbose=False)
    assert set(module.results) == {"swh"}
    row = module.results["swh"]
    assert set(row) == {"accuracy", "macro_f1", "examples"} and row["examples"] == len(SWH)
    assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    assert "test/swh/accuracy" in trainer.callback_metrics
    trainer.validate(module, dm, verbose=False)
    assert set(module.results) == {"eng"} and "val/eng/macro_f1" in trainer.callback_metrics


@pytest.mark.parametrize("mode, expected", [
    ("own", {"eng": Stack("eng", "task"), "swh": Stack("swh", "task")}),
    ("source", {"eng": Stack("eng", "task"), "swh": Stack("eng", "task"), "tgl": Stack("eng", "task")}),
    ("none", {"eng": "task", "swh": "task", "tgl": "task"}),
])
def test_eval_modes_route_as_documented(setup, mode, expected):
    module = make(setup, eval_mode=mode)
    for lang, setup_ in expected.items():
        assert module.language_setup(lang, training=False) == setup_
        assert module.language_setup(lang, training=True) == Stack("eng", "task"), "training uses the source"


def test_eval_mode_changes_the_outputs_of_a_target_language(setup):
    module = make(setup).eval()
    perturb(module.adapted, ("points.",), seed=2)  # a non-identity task adapter too
    tok = tiny_bert_tokenizer()
    enc = tok(["mungu na nchi"], return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "langs": ["swh"]}
    outputs = {}
    with torch.no_grad():
        for mode in ("own", "source", "none"):
            module.eval_mode = mode
            outputs[mode] = module(batch)
        hidden = module.adapted(**{k: batch[k] for k in ("input_ids", "attention_mask")},
                                adapters=[Stack("swh", "task")]).last_hidden_state
    torch.testing.assert_close(outputs["own"], module.head(hidden.mean(1)))
    assert not torch.allclose(outputs["own"], outputs["source"])
    assert not torch.allclose(outputs["source"], outputs["none"])


def test_token_cls_with_bio_tags_reports_span_f1(setup, tmp_path):
    rows = [{"tokens": ["the", "lord", "said", "unto", "them"], "tags": ["O", "B-PER", "O", "O", "O"]},
            {"tokens": ["hapo", "mwanzo", "mungu"], "tags": ["O", "B-TIME", "B-PER"], "lang": "swh"},
            {"tokens": ["and", "the", "lord", "god"], "tags": ["O", "B-PER", "I-PER", "I-PER"]}]
    path = tmp_path / "ner.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3), encoding="utf-8")
    dm = LabelledDataModule(train=str(path), val=str(path), task="token-cls", backbone=setup["backbone"],
                            batch_size=4)
    module = make(setup, labels=dm.labels, task="token-cls")
    trainer = tiny_trainer(8)
    trainer.fit(module, dm)
    trainer.validate(module, dm, verbose=False)
    assert set(module.results) == {"eng", "swh"}
    for row in module.results.values():
        assert {"accuracy", "span_f1", "examples"} <= set(row) and 0.0 <= row["span_f1"] <= 1.0


def test_task_adaptation_argument_errors(setup):
    with pytest.raises(XlpeftValueError, match="`task` can be seq-cls, token-cls; got 'ner'"):
        make(setup, task="ner")
    with pytest.raises(XlpeftValueError, match=r"`labels` needs at least two label names; got \['pos'\]"):
        make(setup, labels=["pos"])
    with pytest.raises(XlpeftValueError, match="`eval_mode` can be own, source, none; got 'target'"):
        make(setup, eval_mode="target")


def test_spans_golden():
    assert spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert spans(["I-PER", "I-PER", "O"]) == {("PER", 0, 2)}, "an I- without B- starts a span"
    assert spans(["B-PER", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 2)}
    assert spans(["B-PER", "B-PER", "I-PER"]) == {("PER", 0, 1), ("PER", 1, 3)}
    assert spans(["O", "O"]) == set()


def test_span_f1_golden():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert span_f1(gold, gold) == 1.0
    assert span_f1(gold, [["B-PER", "I-PER", "O", "O"]]) == pytest.approx(2 / 3)  # P 1, R 1/2
    assert span_f1(gold, [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)  # PER boundary wrong
    assert span_f1(gold, [["B-LOC", "I-LOC", "O", "B-LOC"]]) == pytest.approx(0.5)  # PER type wrong
    # micro over sentences: tp 2 (X, Y), fp 1 (W), fn 1 (Z) → P = R = F = 2/3
    gold = [["B-X"], ["B-Y", "I-Y"], ["B-Z"], ["O"]]
    pred = [["B-X"], ["B-Y", "I-Y"], ["O"], ["B-W"]]
    assert span_f1(gold, pred) == pytest.approx(2 / 3)
    assert span_f1([["O", "O"]], [["O", "O"]]) == 0.0


def test_own_eval_mode_without_the_language_adapter_is_an_error_naming_it(setup):
    module = make(setup, eval_mode="own")
    with pytest.raises(XlpeftKeyError, match="'tgl'.*loaded: eng, swh"):
        module.language_setup("tgl", training=False)
    bare = make(setup, language_adapters={})  # no language adapter at all: the task adapter alone
    assert bare.language_setup("tgl", training=False) == "task"


# ---------------------------------------------------------------- zero-shot features
def _batch(texts: list[str], langs: list[str], labels: list[int] | None = None) -> dict:
    enc = tiny_bert_tokenizer()(texts, padding=True, return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "langs": langs}
    if labels is not None:
        out["labels"] = torch.tensor(labels)
    return out


def test_predict_step_returns_per_example_predictions_with_language_and_label(setup):
    module = make(setup).eval()
    dm = data(setup)
    dm.setup("test")
    out = tiny_trainer(1).predict(module, dm.test_dataloader())
    assert len(out) == 1 and set(out[0]) >= {"preds", "logits", "langs", "labels", "label_names"}
    row = out[0]
    assert row["langs"] == ["swh"] * len(SWH) and row["preds"].shape == (len(SWH),)
    assert row["labels"].tolist() == [1, 0, 1, 0] and row["label_names"] == ["neg", "pos"]
    torch.testing.assert_close(row["preds"], row["logits"].argmax(-1))
    with torch.no_grad():
        torch.testing.assert_close(row["logits"], module(next(iter(dm.test_dataloader()))))


def test_train_mode_own_routes_each_training_example_to_its_language(setup):
    module = make(setup, train_mode="own")
    assert module.language_setup("swh", training=True) == Stack("swh", "task")
    assert module.language_setup("eng", training=True) == Stack("eng", "task")
    with pytest.raises(XlpeftKeyError, match="training_mode='own' needs a language adapter for 'tgl'"):
        module.language_setup("tgl", training=True)
    perturb(module.adapted, ("points.",), seed=2)
    batch = _batch(["mungu na nchi", "the lord said"], ["swh", "eng"])
    module.train()
    for m in module.modules():  # no dropout: compare with explicit routing
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    mixed = module(batch)
    hidden = module.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            adapters=[Stack("swh", "task"), Stack("eng", "task")]).last_hidden_state
    from xlpeft.lightning.base import mean_pool
    torch.testing.assert_close(mixed, module.head(mean_pool(hidden, batch["attention_mask"])))
    with pytest.raises(XlpeftValueError, match="`train_mode` can be source, own; got 'all'"):
        make(setup, train_mode="all")


def test_language_dropout_runs_some_training_examples_under_the_task_adapter_alone(setup):
    module = make(setup, train_mode="own", language_dropout=0.5)
    torch.manual_seed(0)
    setups = module.setups(["swh"] * 64, training=True)
    dropped = sum(s == "task" for s in setups)
    assert 10 < dropped < 54 and all(s in ("task", Stack("swh", "task")) for s in setups)
    assert module.setups(["swh"] * 64, training=False) == [Stack("swh", "task")] * 64  # never at eval
    assert make(setup, train_mode="own").setups(["swh"] * 64, training=True) == [Stack("swh", "task")] * 64
    with pytest.raises(XlpeftValueError, match=r"`language_dropout` can be a probability in \[0, 1\); got 1.5"):
        make(setup, language_dropout=1.5)


def test_language_leave_out_drops_the_language_adapter_in_the_last_block(setup):
    full, lean = make(setup).eval(), make(setup, language_leave_out=(-1,)).eval()
    assert set(full.adapted.adapter_places("swh")) == {"encoder.0.ffn", "encoder.1.ffn", "encoder.embed"}
    assert set(lean.adapted.adapter_places("swh")) == {"encoder.0.ffn", "encoder.embed"}
    kept = lean.adapted.adapter_state_dict("swh")
    assert all(torch.equal(v, full.adapted.adapter_state_dict("swh")[k]) for k, v in kept.items())
    assert not any(p.requires_grad for k, p in lean.adapted.named_parameters() if ".swh." in k)
    lean.load_state_dict(full.state_dict(), strict=False)  # same task adapter and head
    batch = _batch(["mungu na nchi"], ["swh"])
    with torch.no_grad():
        assert (full(batch) - lean(batch)).abs().max() > 1e-5
