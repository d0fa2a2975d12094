"""Small building blocks shared by the method modules.

``MaskedLinear`` is an ``nn.Linear`` that honours an optional fixed sparsity
mask (SparseAdapter): the mask lives in a buffer, so it is saved with the
adapter, and the forward multiplies by it, so a pruned weight stays zero in
effect whatever an optimizer (weight decay included) does to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xlpeft.methods.base import check_choice

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """The non-linearity called ``name`` (``relu``, ``gelu``, ``swish`` …)."""
    check_choice("non_linearity", name, tuple(ACTIVATIONS))
    return ACTIVATIONS[name]()


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by ``weight_mask`` when one is set."""

    weight_mask: torch.Tensor | None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_mask", None)

    def set_mask(self, mask: torch.Tensor) -> None:
        """Fix a 0/1 mask of the weight's shape; pruned weights are zeroed now."""
        mask = mask.to(device=self.weight.device, dtype=torch.bool)
        self.weight_mask = mask
        with torch.no_grad():
            self.weight.mul_(mask)

    def effective_weight(self) -> torch.Tensor:
        """The weight actually used in the forward."""
        if self.weight_mask is None:
            return self.weight
        return self.weight * self.weight_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def zero_(layer: nn.Linear) -> nn.Linear:
    """Zero a linear layer in place so its module starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer
