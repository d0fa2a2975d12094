"""Resolve a method's sites on a backbone layout into concrete places.

This is the only code that walks a Hugging Face model; what it looks for
comes from the family's ``Layout`` (data), so there is no per-family branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from xlpeft.backbones.layout import Layout, StackLayout
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.methods.base import Dims, Site

_HEADS = ("num_attention_heads", "num_heads", "n_heads")
_HEAD_DIM = ("attention_head_size", "head_dim", "key_value_proj_dim")


@dataclass(frozen=True)
class Place:
    """One concrete place: a point key, the modules to hook and their sizes."""

    key: str
    kind: str
    stack: str
    modules: tuple[nn.Module, ...]
    dims: Dims


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.a.b.0.c`` for ``path == "a.b.0.c"`` (``""`` is root) with a clear error."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise XlpeftKeyError(
            f"layout path {path!r} does not exist in {type(root).__name__} ({err}); "
            "the layout does not fit this model: pass a matching Layout"
        ) from None


def has_module(root: nn.Module, path: str) -> bool:
    try:
        get_module(root, path)
    except XlpeftKeyError:
        return False
    return True


class Backbone:
    """A model seen through its layout: stacks, blocks and sizes."""

    def __init__(self, model: nn.Module, layout: Layout) -> None:
        self.model = model
        self.layout = layout
        self.base = model.base_model
        self.hidden = get_module(self.base, layout.word_embeddings).embedding_dim
        self.vocab_size = get_module(self.base, layout.word_embeddings).num_embeddings
        self.stacks = {name: s for name, s in layout.stacks.items() if has_module(self.base, s.layers)}

    def blocks(self, stack: str) -> nn.ModuleList:
        return get_module(self.base, self.stacks[stack].layers)

    def num_layers(self) -> dict[str, int]:
        return {name: len(self.blocks(name)) for name in self.stacks}

    def stack_root(self, stack: str) -> nn.Module:
        return get_module(self.base, self.stacks[stack].root)

    def lm_output(self) -> nn.Module | None:
        for path in self.layout.lm_output:
            if has_module(self.model, path):
                return get_module(self.model, path)
        return None

    def places(self, site: Site) -> list[Place]:
        """Every concrete place a site names on this backbone."""
        if site.kind == "linear" and site.patterns:
            return self._pattern_places(site)
        out: list[Place] = []
        for stack in (s for s in site.stacks if s in self.stacks):
            out += self._stack_places(site, stack, self.stacks[stack])
        return out

    def _kept(self, stack: str, leave_out: tuple[int, ...]) -> list[int]:
        n = len(self.blocks(stack))
        dropped = {i % n for i in leave_out if -n <= i < n}
        return [i for i in range(n) if i not in dropped]

    def _stack_places(self, site: Site, stack: str, layout: StackLayout) -> list[Place]:
        n = len(self.blocks(stack))
        if site.kind == "embed":
            if layout.embed is None:
                return []
            module = get_module(self.base, layout.embed)
            return [Place(f"{stack}.embed", "embed", stack, (module,), Dims(self.hidden, stack=stack))]
        if site.kind == "lm_output":
            module = self.lm_output()
            # The LM head runs after the last stack (the decoder in seq2seq models).
            if module is None or stack != list(self.stacks)[-1]:
                return []
            return [Place("lm_output", "lm_output", stack, (module,), Dims(self.hidden, stack=stack))]
        out = []
        for i in self._kept(stack, site.leave_out):
            block = self.blocks(stack)[i]
            out += self._block_places(site, stack, layout, block, i, n)
        return out

    def _block_places(self, site: Site, stack: str, layout: StackLayout, block: nn.Module,
                      i: int, n: int) -> list[Place]:
        base = Dims(self.hidden, layer=i, num_layers=n, stack=stack)
        if site.kind == "sublayer" and site.role == "block":  # the block's output: the residual stream
            return [Place(f"{stack}.{i}.block", "sublayer", stack, (block, block), base)]
        if site.kind == "sublayer":
            source = getattr(layout, f"{site.role}_in")
            target = getattr(layout, f"{site.role}_out")
            if source is None or target is None:
                return []  # e.g. cross-attention in an encoder
            mods = (get_module(block, source), get_module(block, target))
            return [Place(f"{stack}.{i}.{site.role}", "sublayer", stack, mods, base)]
        if site.kind == "linear":
            if site.role not in layout.linears:
                return []
            return [self._linear_place(f"{stack}.{i}.{path}", stack, get_module(block, path), base)
                    for path in layout.linears[site.role]]
        if site.kind in ("attention", "prompt"):
            path = layout.attn if site.role in ("", "self") else layout.cross_attn
            if path is None or (site.kind == "prompt" and i != 0):
                return []  # soft prompts: the first block's self-attention only
            attn = get_module(block, path)
            dims = Dims(self.hidden, layer=i, num_layers=n, stack=stack,
                        num_heads=_attr(attn, _HEADS), head_dim=_attr(attn, _HEAD_DIM))
            if site.kind == "prompt":  # + the frozen k/v projections and the vocabulary
                missing = [r for r in ("k", "v") if r not in layout.linears]
                if missing:
                    raise XlpeftValueError(f"prompt tuning reads the 'k' and 'v' linears of block 0; the "
                                           f"{self.layout.family} layout lacks {missing}: add them to its linears")
                mods = (attn, *(get_module(block, layout.linears[r][0]) for r in ("k", "v")),
                        get_module(self.base, self.layout.word_embeddings))
                return [Place(f"{stack}.prompt", "prompt", stack, mods, dims)]
            return [Place(f"{stack}.{i}.{site.role or 'self'}_attn", "attention", stack, (attn,), dims)]
        raise XlpeftValueError(f"site kind {site.kind!r} cannot sit inside a block")

    def _linear_place(self, key: str, stack: str, module: nn.Module, base: Dims) -> Place:
        if not isinstance(module, nn.Linear):
            raise XlpeftValueError(
                f"{key} is a {type(module).__name__}, not nn.Linear; fix the layout's linears"
            )
        dims = Dims(base.hidden, module.in_features, module.out_features, base.layer,
                    base.num_layers, stack=stack)
        return Place(key, "linear", stack, (module,), dims)

    def _pattern_places(self, site: Site) -> list[Place]:
        from xlpeft.backbones.layouts import pattern_targets

        names = pattern_targets(self.model, list(site.patterns))
        out = []
        for name in names:
            module = get_module(self.model, name)
            stack = self._stack_of(module)
            if stack is None:  # a head outside every stack runs after the last one
                stack = list(self.stacks)[-1]
            elif stack not in site.stacks:
                continue
            out.append(self._linear_place(name, stack, module, Dims(self.hidden, stack=stack)))
        return out

    def _stack_of(self, module: nn.Module) -> str | None:
        for name in self.stacks:
            if any(m is module for m in self.stack_root(name).modules()):
                return name
        return None


def _attr(module: nn.Module, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    cfg = getattr(module, "config", None)
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return 0
