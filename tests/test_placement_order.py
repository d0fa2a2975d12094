"""A Stack over adapters at different places of a block runs in Stack order, or is refused.

A post-norm (SeqBn) adapter acts at the sublayer's LayerNorm, after a default
Pfeiffer adapter at the sublayer output. ``Stack(seqbn, pfeiffer)`` would run the
Pfeiffer child first; it used to do so silently.
"""

from __future__ import annotations

import pytest
import torch

from tiny import tiny_batch, tiny_model
from xlpeft import AdaptedModel, Stack
from xlpeft.errors import XlpeftValueError


def _model() -> AdaptedModel:
    am = AdaptedModel(tiny_model("bert"))
    am.add_adapter("lang", "madx-language-seqbn")
    am.add_adapter("task", "pfeiffer")
    am.add_adapter("task_seqbn", "pfeiffer-seqbn")
    gen = torch.Generator().manual_seed(0)
    for name in am.adapter_names:
        am.load_adapter_state_dict(name, {k: v + 0.2 * torch.randn(v.shape, generator=gen)
                                          for k, v in am.adapter_state_dict(name).items()})
    return am


def test_post_norm_child_before_a_default_child_is_refused_everywhere() -> None:
    am = _model()
    batch = tiny_batch(am.model, 2)
    before = am(**batch)[0]
    with pytest.raises(XlpeftValueError, match=r"runs 'lang' before 'task', but at encoder\.\d+\.\w+ 'lang' sits "
                                               r"after the LayerNorm .* 'pfeiffer-seqbn'"):
        am.set_active(Stack("lang", "task"))
    assert am.active is None
    with pytest.raises(XlpeftValueError, match="runs 'lang' before 'task'"):
        am(**batch, adapters=[Stack("lang", "task"), "lang"])
    with pytest.raises(XlpeftValueError, match="runs 'lang' before 'task'"):
        am.train_adapters(Stack("lang", "task"))
    after = am(**batch)[0]
    assert torch.equal(before, after)


def test_orders_that_match_the_block_are_accepted() -> None:
    am = _model()
    batch = tiny_batch(am.model, 2)
    am.set_active(Stack("lang", "task_seqbn"))      # both after the LayerNorm: Stack order at one point
    am(**batch)
    am.set_active(Stack("task", "lang"))            # default (earlier point) first, as the block runs
    am(**batch)
    am(**batch, adapters=[Stack("lang", "task_seqbn"), Stack("task", "lang")])
