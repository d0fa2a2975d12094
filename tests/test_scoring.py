"""mlm_scores: held-out MLM under any setup, paired masks, clear errors."""

from __future__ import annotations

import math

import pytest

from lightning_tiny import perturb, save_tiny_backbone
from xlpeft import AdaptedModel, Average
from xlpeft.errors import XlpeftError, XlpeftValueError
from xlpeft.lightning.scoring import mlm_scores

TEXTS = ["in the beginning god created the heaven and the earth", "and the earth was without form",
         "and god said let there be light", "and there was light"] * 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_tiny_backbone(tmp_path_factory.mktemp("scoring") / "tiny")
    m = AdaptedModel.from_pretrained(str(path), head="masked-lm")
    for name in ("a", "b"):
        m.add_adapter(name, {"method": "bottleneck", "reduction_factor": 4})
    perturb(m, ("points.",), scale=0.5, seed=3)
    return m


def test_scores_are_deterministic_and_setups_differ(model) -> None:
    bare = mlm_scores(model, TEXTS, None, batch_size=5)
    assert bare == mlm_scores(model, TEXTS, None, batch_size=5)  # same masks every call
    with_a = mlm_scores(model, TEXTS, "a", batch_size=5)
    assert with_a["tokens"] == bare["tokens"] > 0  # the same masked positions: a paired comparison
    assert with_a["loss"] != pytest.approx(bare["loss"])
    assert 0 <= with_a["accuracy"] <= 1 and with_a["perplexity"] == pytest.approx(math.exp(with_a["loss"]))
    avg = mlm_scores(model, TEXTS, Average("a", "b"), batch_size=5)
    assert avg["tokens"] == bare["tokens"]


def test_a_setup_equals_the_active_adapter_forward(model) -> None:
    """Scoring under 'a' equals activating 'a' and computing the masked loss by hand."""
    import torch
    import torch.nn.functional as F

    from xlpeft.data.collators import MLMCollator
    tok = model.tokenizer
    got = mlm_scores(model, TEXTS[:4], "a", batch_size=4, seed=7)
    collate = MLMCollator(mask_id=tok.mask_token_id, pad_id=tok.pad_token_id or 0, vocab_size=len(tok),
                          special_ids=tuple(tok.all_special_ids), seed=7)
    batch = collate([{"input_ids": ids, "lang": ""} for ids in tok(TEXTS[:4], truncation=True,
                                                                   max_length=64)["input_ids"]])
    model.eval()
    model.set_active("a")
    try:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        model.set_active(None)
    mask = batch["labels"] != -100
    assert got["loss"] == pytest.approx(float(F.cross_entropy(logits[mask], batch["labels"][mask])), rel=1e-5)


def test_errors(model) -> None:
    with pytest.raises(XlpeftValueError, match="`texts` can be a list of non-empty lines"):
        mlm_scores(model, ["", "  "])
    with pytest.raises(XlpeftError, match="zzz"):
        mlm_scores(model, TEXTS, "zzz")
