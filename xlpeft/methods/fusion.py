"""AdapterFusion: attention over the outputs of several adapters.

Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning".

    h ─┬─► adapter_1 ─► o_1 ─┐
       ├─► …              ─┼─► Σ_i softmax_i(q(h)·k(o_i) / T) · v(o_i)
       └─► adapter_n ─► o_n ─┘

``v`` starts as the identity and ``q``/``k`` near zero, so a new fusion
begins as the plain average of its adapters' outputs.
"""

from __future__ import annotations

import torch
from torch import nn


class Fusion(nn.Module):
    """Trainable attention that mixes adapter outputs per token."""

    def __init__(self, hidden: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        # no key bias: q·(K·o_i + b) adds q·b to every score alike, which softmax cancels, so a
        # bias there could never learn (its gradient is exactly zero, up to rounding)
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.value = nn.Linear(hidden, hidden)
        for layer in (self.query, self.key):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.query.bias)
        with torch.no_grad():
            self.value.weight.copy_(torch.eye(hidden))
            self.value.bias.zero_()
        self.temperature = temperature

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(outputs, dim=-2)                       # [..., n, H]
        scores = (self.query(h).unsqueeze(-2) * self.key(stacked)).sum(-1)
        probs = torch.softmax(scores / self.temperature, dim=-1)     # [..., n]
        return (probs.unsqueeze(-1) * self.value(stacked)).sum(-2)
