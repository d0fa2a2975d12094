"""Parameter accounting that keeps apart the three counts the PEFT literature
asks for: *trainable* (receive gradients now), *changed* (non-zero entries of
the effective update, so pruned weights do not count) and *stored* (bytes in
the adapter file), each also as a percentage of the backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xlpeft.methods._layers import MaskedLinear

if TYPE_CHECKING:
    from xlpeft.core.model import AdaptedModel


@dataclass(frozen=True)
class AdapterCount:
    name: str
    method: str
    parameters: int
    trainable: int
    changed: int
    stored_bytes: int


@dataclass(frozen=True)
class ParameterReport:
    backbone: int
    backbone_trainable: int
    adapters: tuple[AdapterCount, ...]
    fusions: tuple[AdapterCount, ...] = ()
    """AdapterFusion layers, one row per ``Fuse`` key (``a+b``); adapter files do not hold them."""

    def pct(self, n: int) -> float:
        return 100.0 * n / max(1, self.backbone)

    def __str__(self) -> str:
        head = f"{'adapter':<16}{'method':<12}{'params':>12}{'trainable':>12}{'changed':>12}{'stored':>12}{'% backbone':>12}"
        rows = [head, "-" * len(head)]
        for a in (*self.adapters, *self.fusions):
            rows.append(f"{a.name:<16}{a.method:<12}{a.parameters:>12,}{a.trainable:>12,}"
                        f"{a.changed:>12,}{_size(a.stored_bytes):>12}{self.pct(a.parameters):>11.3f}%")
        rows.append(f"backbone: {self.backbone:,} parameters, {self.backbone_trainable:,} trainable")
        return "\n".join(rows)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _changed(module) -> int:
    total = 0
    masked = {id(m.weight): m for m in module.modules() if isinstance(m, MaskedLinear)}
    for p in module.parameters():
        m = masked.get(id(p))
        w = m.effective_weight() if m is not None else p
        total += int((w != 0).sum())
    return total


def parameter_report(model: AdaptedModel) -> ParameterReport:
    rows = []
    for name, config in model.configs.items():
        modules = list(model.adapter_modules(name))
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        tensors = model.adapter_state_dict(name)
        rows.append(AdapterCount(
            name=name,
            method=config.method,
            parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            changed=sum(_changed(m) for m in modules),
            stored_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        ))
    backbone = list(model.model.parameters())
    return ParameterReport(
        backbone=sum(p.numel() for p in backbone),
        backbone_trainable=sum(p.numel() for p in backbone if p.requires_grad),
        adapters=tuple(rows),
        fusions=_fusion_rows(model),
    )


def _fusion_rows(model: AdaptedModel) -> tuple[AdapterCount, ...]:
    """Fusion layers train (``train_adapters(Fuse(...))``) but belong to no adapter."""
    layers: dict[str, list] = {}
    for point in model.points.values():
        for key, fusion in getattr(point, "fusions", {}).items():
            layers.setdefault(key, []).append(fusion)
    rows = []
    for key, modules in layers.items():
        params = [p for m in modules for p in m.parameters()]
        rows.append(AdapterCount(
            name=key, method="fusion", parameters=sum(p.numel() for p in params),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            changed=sum(_changed(m) for m in modules), stored_bytes=0,
        ))
    return tuple(rows)
