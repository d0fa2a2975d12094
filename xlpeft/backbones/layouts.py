"""The built-in family layouts (transformers 5.x) and the registry that picks one.

Each family is data: a ``Layout`` (see ``layout.py``) whose paths were read off
the transformers modeling code and are checked against tiny random models in
``tests/test_layouts.py``. ``layout_for(model)`` picks by ``config.model_type``
and keeps only the stacks the model really has (``T5EncoderModel`` has no
decoder). Models no layout covers can still be targeted by module-name
patterns with ``pattern_targets``.

Conventions worth knowing when reading the paths:

* ``""`` is ``model.base_model`` itself. BERT-like roots are ``""`` so that the
  stack covers its embeddings, as every seq2seq stack does (``embed`` always lies
  inside ``root``). Resolve with ``get_module`` and build names with ``join``.
* Seq2seq families keep three ``nn.Embedding`` modules (``shared``,
  ``encoder.embed_tokens``, ``decoder.embed_tokens``) that share one weight
  ``Parameter``; only the last two run in ``forward``. ``word_embeddings`` is
  what ``get_input_embeddings()`` returns (``shared``, or ``encoder.embed_tokens``
  for Marian), so hook ``embed``, never ``word_embeddings``, and replace the
  embedding through ``set_input_embeddings``. ``embed`` outputs are already
  scaled by sqrt(d_model) in mBART/M2M100 (scaled embedding modules) but not in
  Marian, which scales after ``embed_tokens``.
* T5 blocks are ``layer.0`` self-attention, ``layer.1`` cross-attention
  (decoder only) and then FFN, so the FFN is ``layer.1`` in the encoder and
  ``layer.2`` in the decoder. T5 attention modules return tuples, hence
  ``attn_out`` is the ``o`` projection.
* ``t5`` covers the ReLU FFN (``wi``); ``t5-gated`` the gated one (``wi_0``,
  ``wi_1``: T5 v1.1, Flan-T5) with the same ``model_type``; ``layout_for``
  takes the one whose paths exist.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from torch import nn

from xlpeft.backbones.layout import LINEAR_ROLES, Layout, StackLayout
from xlpeft.errors import XlpeftKeyError, XlpeftTypeError, XlpeftValueError, close_matches, unknown

__all__ = [
    "LAYOUTS", "get_module", "join", "layout_for", "lm_output_path", "missing_paths", "pattern_targets",
    "register_layout",
]


# --------------------------------------------------------------------------- paths


def join(*parts: str) -> str:
    """Dotted path of ``parts``, skipping empty ones (``join("bert", "")`` is ``"bert"``)."""
    return ".".join(p for p in parts if p)


def get_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path`` below ``root`` (``""`` is ``root``); raises ``AttributeError``."""
    return root.get_submodule(path)


def _safe_get(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return get_module(root, path)
    except AttributeError:
        return None


def _exists(root: nn.Module, path: str) -> bool:
    return _safe_get(root, path) is not None


# --------------------------------------------------------------------------- families


def _bert_stack(base: str, root: str, cross: bool = False) -> StackLayout:
    """A BERT-like stack; ``base`` is the path of the ``BertModel`` (embeddings + encoder)."""
    linears = {
        "q": ("attention.self.query",), "k": ("attention.self.key",), "v": ("attention.self.value",),
        "o": ("attention.output.dense",), "ffn_up": ("intermediate.dense",), "ffn_down": ("output.dense",),
    }
    extra: dict[str, object] = {}
    if cross:
        linears |= {
            "cross_q": ("crossattention.self.query",), "cross_k": ("crossattention.self.key",),
            "cross_v": ("crossattention.self.value",), "cross_o": ("crossattention.output.dense",),
        }
        extra = dict(cross_in="crossattention.self", cross_out="crossattention.output.dense",
                     cross_attn="crossattention.self", cross_ln_in="crossattention.self",
                     cross_ln_out="crossattention.output.LayerNorm")
    return StackLayout(
        root=root, layers=join(base, "encoder.layer"), embed=join(base, "embeddings"),
        attn_in="attention.self", attn_out="attention.output.dense",
        ffn_in="intermediate.dense", ffn_out="output.dense", attn="attention.self",
        # Post-LN paths: the residual is each sublayer's input; the norm follows the residual add.
        attn_ln_in="attention.self", attn_ln_out="attention.output.LayerNorm",
        ffn_ln_in="intermediate.dense", ffn_ln_out="output.LayerNorm",
        linears=linears, **extra,
    )


def _t5_stack(name: str, gated: bool) -> StackLayout:
    """A T5 stack (``encoder``/``decoder``); the FFN sits after the optional cross-attention."""
    ffn = "layer.2.DenseReluDense" if name == "decoder" else "layer.1.DenseReluDense"
    up = (f"{ffn}.wi_0", f"{ffn}.wi_1") if gated else (f"{ffn}.wi",)
    sa = "layer.0.SelfAttention"
    linears = {"q": (f"{sa}.q",), "k": (f"{sa}.k",), "v": (f"{sa}.v",), "o": (f"{sa}.o",),
               "ffn_up": up, "ffn_down": (f"{ffn}.wo",)}
    extra: dict[str, object] = {}
    if name == "decoder":
        ca = "layer.1.EncDecAttention"
        linears |= {"cross_q": (f"{ca}.q",), "cross_k": (f"{ca}.k",), "cross_v": (f"{ca}.v",),
                    "cross_o": (f"{ca}.o",)}
        extra = dict(cross_in=ca, cross_out=f"{ca}.o", cross_attn=ca)
    return StackLayout(
        root=name, layers=f"{name}.block", embed=f"{name}.embed_tokens",
        attn_in=sa, attn_out=f"{sa}.o", ffn_in=ffn, ffn_out=ffn, attn=sa, linears=linears, **extra,
    )


def _bart_stack(name: str) -> StackLayout:
    """A BART-like stack (mBART, M2M100/NLLB, Marian): ``encoder`` or ``decoder``."""
    linears = {"q": ("self_attn.q_proj",), "k": ("self_attn.k_proj",), "v": ("self_attn.v_proj",),
               "o": ("self_attn.out_proj",), "ffn_up": ("fc1",), "ffn_down": ("fc2",)}
    extra: dict[str, object] = {}
    if name == "decoder":
        linears |= {"cross_q": ("encoder_attn.q_proj",), "cross_k": ("encoder_attn.k_proj",),
                    "cross_v": ("encoder_attn.v_proj",), "cross_o": ("encoder_attn.out_proj",)}
        extra = dict(cross_in="encoder_attn", cross_out="encoder_attn.out_proj", cross_attn="encoder_attn")
    return StackLayout(
        root=name, layers=f"{name}.layers", embed=f"{name}.embed_tokens",
        attn_in="self_attn", attn_out="self_attn.out_proj", ffn_in="fc1", ffn_out="fc2", attn="self_attn",
        linears=linears, **extra,
    )


def _seq2seq(
    family: str, model_types: tuple[str, ...], stack: Callable[..., StackLayout], word_embeddings: str, **kw: object
) -> Layout:
    return Layout(
        family=family, model_types=model_types,
        stacks={"encoder": stack("encoder", **kw), "decoder": stack("decoder", **kw)},
        word_embeddings=word_embeddings, lm_output=("lm_head",),
    )


_BUILTIN = (
    # BERT, mBERT and the embedded default backbone.
    Layout("bert", ("bert",), {"encoder": _bert_stack("", "")},
           "embeddings.word_embeddings", ("cls.predictions.decoder",)),
    Layout("xlm-roberta", ("xlm-roberta",), {"encoder": _bert_stack("", "")},
           "embeddings.word_embeddings", ("lm_head.decoder",)),
    _seq2seq("t5", ("t5",), _t5_stack, "shared", gated=False),
    _seq2seq("t5-gated", ("t5",), _t5_stack, "shared", gated=True),
    _seq2seq("mt5", ("mt5",), _t5_stack, "shared", gated=True),
    _seq2seq("mbart", ("mbart",), _bart_stack, "shared"),
    _seq2seq("m2m_100", ("m2m_100",), _bart_stack, "shared"),  # also NLLB
    _seq2seq("marian", ("marian",), _bart_stack, "encoder.embed_tokens"),  # `shared` exists only if tied
    # EncoderDecoderModel bert2bert; its base_model is itself, the decoder a BertLMHeadModel.
    Layout("encoder-decoder", ("encoder-decoder",),
           {"encoder": _bert_stack("encoder", "encoder"), "decoder": _bert_stack("decoder.bert", "decoder", True)},
           "encoder.embeddings.word_embeddings", ("decoder.cls.predictions.decoder",)),
)


# --------------------------------------------------------------------------- registry

LAYOUTS: dict[str, Layout] = {}
"""Known layouts by family. Add to it with ``register_layout``."""


def _check(layout: Layout) -> None:
    """Reject layouts that are malformed before any model is seen."""
    if not isinstance(layout, Layout):
        raise XlpeftTypeError(f"register_layout takes a Layout; got {type(layout).__name__}")
    if not layout.family or not layout.model_types or not layout.stacks:
        raise XlpeftValueError(f"layout {layout.family!r} needs a family, model_types and at least one stack")
    for stack_name, stack in layout.stacks.items():
        for role, paths in stack.linears.items():
            if role not in LINEAR_ROLES:
                hint = f"(layout {layout.family!r}, stack {stack_name!r})"
                raise unknown("linear role", role, LINEAR_ROLES, hint=hint)
            if isinstance(paths, str) or not paths:
                raise XlpeftValueError(
                    f"linears[{role!r}] of layout {layout.family!r} must be a non-empty tuple of paths; got {paths!r}"
                )


def register_layout(layout: Layout, *, replace: bool = False) -> Layout:
    """Add ``layout`` so ``layout_for`` finds it; later registrations win for a shared ``model_type``."""
    _check(layout)
    if layout.family in LAYOUTS and not replace:
        raise XlpeftValueError(
            f"a layout for family {layout.family!r} is already registered; pass replace=True to override it"
        )
    LAYOUTS.pop(layout.family, None)  # re-insert last so it is tried first
    LAYOUTS[layout.family] = layout
    return layout


for _layout in _BUILTIN:
    register_layout(_layout)


def _block_paths(stack: StackLayout) -> dict[str, str]:
    names = ("attn_in", "attn_out", "ffn_in", "ffn_out", "attn", "cross_in", "cross_out", "cross_attn",
             "attn_ln_in", "attn_ln_out", "ffn_ln_in", "ffn_ln_out", "cross_ln_in", "cross_ln_out")
    return {n: getattr(stack, n) for n in names if getattr(stack, n) is not None}


def _stack_problems(base: nn.Module, stack: StackLayout) -> list[str]:
    """Paths of ``stack`` that do not resolve (or resolve to the wrong kind) in ``base``."""
    problems = [p for p in (stack.root, stack.embed) if p is not None and not _exists(base, p)]
    layers = get_module(base, stack.layers) if _exists(base, stack.layers) else None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return problems + [f"{stack.layers} (a non-empty nn.ModuleList)"]
    for i, block in enumerate(layers):
        problems += [join(stack.layers, str(i), p) for p in _block_paths(stack).values() if not _exists(block, p)]
        for paths in stack.linears.values():
            problems += [
                f"{join(stack.layers, str(i), p)} (an nn.Linear)"
                for p in paths if not isinstance(_safe_get(block, p), nn.Linear)
            ]
    return problems


def missing_paths(model: nn.Module, layout: Layout) -> list[str]:
    """Paths of ``layout`` (relative to ``model.base_model``) that ``model`` lacks.

    A stack whose ``root`` is absent is skipped (encoder-only variants of seq2seq
    families); a model with none of the stacks is reported by their roots.
    """
    base = model.base_model
    present = [s for s in layout.stacks.values() if _exists(base, s.root)]
    if not present:
        return [s.root for s in layout.stacks.values()]
    problems = [p for s in present for p in _stack_problems(base, s)]
    if not _exists(base, layout.word_embeddings):
        problems.append(layout.word_embeddings)
    return problems


def layout_for(model: nn.Module) -> Layout:
    """The layout of ``model``, chosen by ``config.model_type``, restricted to the stacks it has."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not model_type or not hasattr(model, "base_model"):
        raise XlpeftTypeError(
            f"layout_for takes a transformers PreTrainedModel with config.model_type; got {type(model).__name__}"
        )
    candidates = [lay for lay in reversed(LAYOUTS.values()) if model_type in lay.model_types]
    if not candidates:
        known = {t for lay in LAYOUTS.values() for t in lay.model_types}
        raise unknown(
            "model_type", model_type, known,
            hint="Describe the model with xlpeft.backbones.layout.Layout and add it with register_layout(), "
                 "or target its linears by name with pattern_targets().",
        )
    report = []
    for lay in candidates:
        problems = missing_paths(model, lay)
        if not problems:
            base = model.base_model
            stacks = {n: s for n, s in lay.stacks.items() if _exists(base, s.root)}
            return lay if len(stacks) == len(lay.stacks) else dataclasses.replace(lay, stacks=stacks)
        report.append(f"{lay.family!r} lacks {', '.join(problems[:4])}{' …' if len(problems) > 4 else ''}")
    raise XlpeftValueError(
        f"{type(model).__name__} (model_type {model_type!r}) does not match any registered layout: "
        + "; ".join(report)
        + ". Register a matching Layout with register_layout(), or use pattern_targets()."
    )


def lm_output_path(model: nn.Module, layout: Layout) -> str | None:
    """The first ``layout.lm_output`` candidate present in ``model`` (from the top), ``None`` for bare models."""
    return next((p for p in layout.lm_output if isinstance(_safe_get(model, p), nn.Linear)), None)


# --------------------------------------------------------------------------- patterns


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def pattern_targets(model: nn.Module, patterns: Iterable[str] | str) -> list[str]:
    """Full names of the ``nn.Linear`` modules whose name ``re.fullmatch``-es any pattern.

    Full match (as in HF PEFT's regex ``target_modules``) so ``"query"`` does not
    silently also catch ``"query_proj_extra"``: write ``r".*\\.query"`` for a
    suffix. Every pattern must match something, which catches typos early.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise XlpeftValueError("pattern_targets needs at least one pattern; got none")
    names = _linear_names(model)
    hits: set[str] = set()
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise XlpeftValueError(f"pattern {pattern!r} is not a valid regular expression: {err}") from err
        matched = {n for n in names if regex.fullmatch(n)}
        if not matched:
            raise _no_match(pattern, names, model)
        hits |= matched
    return [n for n in names if n in hits]  # model order


def _no_match(pattern: str, names: list[str], model: nn.Module) -> XlpeftKeyError:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close_leaves = close_matches(pattern, leaves, n=3)
    example = ".*\\." + (close_leaves or leaves or ["name"])[0]
    close = close_matches(pattern, names, n=3) + close_leaves
    msg = (
        f"pattern {pattern!r} matches no nn.Linear in {type(model).__name__}; patterns must match the whole "
        f"module name (re.fullmatch), e.g. r'{example}'."
    )
    if close:
        msg += f" Close candidates: {', '.join(repr(c) for c in close)}."
    msg += f" Linear leaf names here: {', '.join(leaves[:20]) or '(none)'}."
    return XlpeftKeyError(msg)
