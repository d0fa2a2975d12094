"""Lightning ``bf16-mixed`` on CPU: adapter training follows the float32 loss curve.

50 AdamW steps of routed adapters (two languages, batched kernels) on a tiny
masked-LM, once in float32 and once under Lightning's own bf16-mixed forward
context (``MixedPrecision("bf16-mixed", "cpu")``, what ``Trainer(precision=
"bf16-mixed")`` wraps each step in). Adapter weights, their gradients and the
optimiser stay float32; the loss curve stays within 1 % of float32's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from tiny import perturb, tiny_batch, tiny_model

from xlpeft import AdaptedModel
from xlpeft.methods import BottleneckConfig, ConfigUnion, LoRAConfig

STEPS = 50
TOLERANCE = 0.01
"""Largest |loss_bf16 − loss_fp32| / loss_fp32 over the 50 steps."""


def curve(am: AdaptedModel, batches: list[dict], context) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches:
        with context():
            logits = am(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        adapters=batch["langs"]).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["input_ids"].flatten())
        loss.backward()
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in am.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_bf16_mixed_adapter_training_follows_fp32() -> None:
    am = AdaptedModel(tiny_model("bert", "masked-lm"))
    config = ConfigUnion((BottleneckConfig(reduction_factor=1, placement=("attn", "ffn")),
                          LoRAConfig(r=8, targets=("q", "v"))))
    for i, lang in enumerate(("eng", "swh")):
        am.add_adapter(lang, config)
        perturb(am, lang, scale=0.1, seed=i)
    am.train_adapters("eng", "swh")
    am.eval()
    batches = [{**tiny_batch(am.model, batch=6, seed=s % 5), "langs": ["eng", "swh", "swh", "eng", "eng", "swh"]}
               for s in range(STEPS)]
    other = copy.deepcopy(am)
    fp32 = curve(am, batches, contextlib.nullcontext)
    bf16 = curve(other, batches, MixedPrecision("bf16-mixed", "cpu").forward_context)
    assert all(p.dtype == torch.float32 for p in other.parameters())
    assert fp32[-1] < 0.98 * fp32[0]  # it learns, so the curves can differ
    worst = max(abs(a - b) / a for a, b in zip(fp32, bf16))
    assert 0 < worst <= TOLERANCE, (worst, fp32[::10], bf16[::10])  # > 0: bf16 really ran
