"""``AdaptedModel``: a backbone with named adapters, composed and routed.

    model = AdaptedModel.from_pretrained(path, head="masked-lm")
    model.add_adapter("swh", "madx-language")
    model.set_active(Stack("swh", "genre"))
    out = model(**batch, adapters=["swh", "hin", "swh"])   # one setup per example

The backbone is left exactly as it was: adapters live in ``self.points``
(keyed by place) and act through hooks at the layout's places.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from xlpeft.backbones.layout import LINEAR_ROLES, Layout
from xlpeft.core import merging, precision
from xlpeft.core import sft as sparse
from xlpeft.core.composition import Average, Fuse, Setup, fusions, leaves, parallel_branches, validate
from xlpeft.errors import XlpeftKeyError, XlpeftTypeError, XlpeftValueError, close_matches, unknown
from xlpeft.core.inject import Backbone, Place
from xlpeft.methods.base import AdapterConfig, ConfigUnion, config_from_dict
from xlpeft.methods.fusion import Fusion
from xlpeft.methods.presets import preset
from xlpeft.core.placement import check_stack_order
from xlpeft.core.points import AdapterPoint, EmbedPoint, LinearPoint, OutputPoint, SublayerPoint
from xlpeft.core.attention import PrefixPoint, PromptPoint
from xlpeft.core.routing import Router, route_for

_POINTS = {"sublayer": SublayerPoint, "linear": LinearPoint, "embed": EmbedPoint,
           "lm_output": OutputPoint, "attention": PrefixPoint, "prompt": PromptPoint}


def _point_key(key: str) -> str:
    return key.replace(".", "-")


def as_config(config: str | AdapterConfig | dict) -> AdapterConfig:
    """A preset name, a config dict or a config object, as a config object."""
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        return preset(config)
    if isinstance(config, dict):
        return config_from_dict(config)
    raise XlpeftTypeError(
        f"an adapter config can be a preset name, a dict or an AdapterConfig; got {type(config).__name__}"
    )


class AdaptedModel(nn.Module):
    """A Hugging Face model plus named adapters; the backbone is frozen.

    ``adapter_dtype``: None (default) gives adapters float32 parameters where the
    module they adapt is float16/bfloat16 (its own dtype elsewhere), with casts at
    the adapter's boundary; ``"backbone"`` uses that module's dtype; a torch dtype
    forces one. Each adapter sits on the device of the module it adapts.
    """

    def __init__(self, model: nn.Module, layout: Layout | None = None,
                 freeze_backbone: bool = True, tokenizer: Any = None,
                 adapter_dtype: precision.AdapterDtype = None) -> None:
        super().__init__()
        from xlpeft.backbones.layouts import layout_for

        self.model = model
        self.layout = layout or layout_for(model)
        self.tokenizer = tokenizer
        self.backbone = Backbone(model, self.layout)
        self.points = nn.ModuleDict()
        self.shared = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig] = {}
        self._ordered_setups: set[Setup] = set()  # Stack order checked; cleared when adapters move
        self.adapter_dtype = precision.check_adapter_dtype(adapter_dtype)
        self._merges = merging.Ledger()
        self._places: dict[str, dict[str, str]] = {}  # adapter → {its place key: point key}
        self._anchors: dict[str, tuple[nn.Module, ...]] = {}  # point key → its hooked modules, output first
        stacks = list(self.backbone.stacks)
        self.state = Router(stacks, {name: self.backbone.blocks(name) for name in stacks})
        self._active: Setup | None = None
        for name in stacks:
            root = self.backbone.stack_root(name)
            # partials of bound methods (not lambdas): deepcopy then re-binds them to the copy's router
            root.register_forward_pre_hook(functools.partial(self.state.enter_stack, name))
            root.register_forward_hook(functools.partial(self.state.leave_stack, name), always_call=True)
        if freeze_backbone:
            self.model.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, name_or_path: str, head: str = "base", **kwargs: Any) -> AdaptedModel:
        """Load a backbone by Hub repo id (through huggingface_hub's cache) or local path (see ``load_backbone``)."""
        from xlpeft.backbones.loading import load_backbone
        from xlpeft.ops.hub import model_folder

        model, tokenizer = load_backbone(model_folder(name_or_path, kwargs), head=head, **kwargs)
        return cls(model, tokenizer=tokenizer)

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.configs)

    def add_adapter(self, name: str, config: str | AdapterConfig | dict = "pfeiffer",
                    set_active: bool = False) -> AdaptedModel:
        """Attach a new adapter; on any error the model is left as it was."""
        self._check_new_name(name)
        config = as_config(config)
        self._check_targets(config)
        try:
            placed = sparse.build(self, name, config) if sparse.is_sft(config) else self._build(name, config)
        except Exception:
            self._detach(name)
            raise
        if not placed:
            self._detach(name)
            raise XlpeftValueError(
                f"adapter {name!r} ({config.method}) found no place on this "
                f"{self.layout.family} model; check its targets/placement/stacks"
            )
        self.configs[name] = config
        self._ordered_setups.clear()
        if set_active:
            self.set_active(name)
        return self

    def add_sft(self, name: str, indices: dict[str, torch.Tensor],
                values: dict[str, torch.Tensor] | None = None, selection: str = "given") -> AdaptedModel:
        """A sparse fine-tuning: flat ``indices`` (and ``values``) per backbone parameter (``core.sft``)."""
        sparse.add_sft(self, name, indices, values, selection)
        return self

    def _check_new_name(self, name: str) -> None:
        """Names become ModuleDict keys, file names and log keys: printable, ≤ 128, no separators."""
        if not isinstance(name, str):
            raise XlpeftTypeError(f"an adapter name can be a str; got {type(name).__name__}")
        if not name or len(name) > 128 or not name.isprintable() or any(c in name for c in ".+/\\ "):
            shown = repr(name) if len(name) <= 60 else f"{name[:57]!r}… ({len(name)} characters)"
            raise XlpeftValueError(
                "an adapter name must be a non-empty string of at most 128 printable characters without "
                f"'.', '+', '/', '\\' or spaces (e.g. 'swh' or 'genre_task'); got {shown}"
            )
        if hasattr(nn.ModuleDict(), name):  # adapters are ModuleDict keys: `to`, `train` … are taken
            raise XlpeftValueError(
                f"an adapter name cannot be a torch ModuleDict attribute; got {name!r}. "
                f"Use another name, e.g. {name + '_adapter'!r} or a three-letter ISO 639-3 code"
            )
        if name in self.configs:
            raise XlpeftValueError(
                f"an adapter named {name!r} already exists; delete_adapter({name!r}) first or pick another name"
            )

    def _check_targets(self, config: AdapterConfig) -> None:
        for part in config.parts:
            for role in getattr(part, "targets", ()) if not getattr(part, "target_patterns", ()) else ():
                if role not in LINEAR_ROLES:
                    close = close_matches(role, LINEAR_ROLES)
                    raise XlpeftKeyError(
                        f"target {role!r} matches no module role: `targets` can be "
                        f"{', '.join(LINEAR_ROLES)}; got {role!r}."
                        + (f" Did you mean {', '.join(repr(c) for c in close)}?" if close else "")
                        + " For other modules use target_patterns=[regex]."
                    )

    def _build(self, name: str, config: AdapterConfig) -> int:
        placed = 0
        found = self._linear_points()
        for part in config.parts:
            shared = part.build_shared(self._dims0())
            if shared is not None:
                holder = self.shared[name] if name in self.shared else nn.ModuleDict()
                holder[part.method] = shared
                self.shared[name] = holder
            for site in part.sites():
                for place in self.backbone.places(site):
                    key = self._point(place, found)
                    point = self.points[key]
                    if name in point.adapters:
                        raise XlpeftValueError(
                            f"two parts of adapter {name!r} land on {point.key}; split them into two adapters"
                        )
                    point.adapters[name] = part.build(site, place.dims, shared)
                    self._places.setdefault(name, {})[place.key] = key
                    placed += 1
        self._place(name)
        return placed

    def _dims0(self):
        from xlpeft.methods.base import Dims
        return Dims(self.backbone.hidden)

    def _first_param(self) -> torch.Tensor | None:
        return next((p for p in self.model.parameters() if p.is_floating_point()), None)

    def _place(self, name: str) -> None:
        """Each module of ``name`` on its point's device, in the precision policy's dtype."""
        fallback = self._first_param()
        for key, point in self.points.items():
            if name in point.adapters:
                precision.place(point.adapters[name], self._anchors.get(key, ()), self.adapter_dtype,
                                fallback)
        if name in self.shared:
            precision.place(self.shared[name], (), self.adapter_dtype, fallback)

    def _linear_points(self) -> dict[int, str]:
        """id(nn.Linear) → key of its point, for this call only (ids are not kept)."""
        return {id(p.linear): k for k, p in self.points.items() if isinstance(p, LinearPoint)}

    def _point(self, place: Place, found: dict[int, str]) -> str:
        """The key of the one point of ``place``'s module, made on first use.

        A linear is found by identity: reached by role, by regex or from a PEFT
        file, it has one point (named after the first way it was found), so a
        Stack orders every adapter on it.
        """
        if place.kind == "linear" and id(place.modules[0]) in found:
            return found[id(place.modules[0])]
        key = _point_key(place.key)
        if key in self.points:
            if place.kind == "linear":
                raise XlpeftValueError(f"point {key!r} already adapts another module; got a second "
                                       f"linear named {place.key!r}. Rename the pattern target")
            return key
        cls = _POINTS[place.kind]
        point = (cls(self.state, (place.stack,), place.dims.hidden) if cls is SublayerPoint
                 else cls(self.state, (place.stack,)))
        point.attach(*place.modules)
        point.key = place.key
        self.points[key] = point
        out = 1 if place.kind == "sublayer" else 0  # the module whose output the point adapts first
        self._anchors[key] = (place.modules[out], *place.modules[:out], *place.modules[out + 1:])
        if place.kind == "linear":
            found[id(place.modules[0])] = key
        return key

    def adapter_modules(self, name: str) -> Iterator[nn.Module]:
        """Every module of adapter ``name``: one per place, plus its shared parameters."""
        for point in self.points.values():
            if name in point.adapters:
                yield point.adapters[name]
        if name in self.shared:
            yield self.shared[name]

    def _detach(self, name: str) -> None:
        self._ordered_setups.clear()
        for key in list(self.points):
            point = self.points[key]
            if name in point.adapters:
                del point.adapters[name]
            if name in point.merged:
                point.merged.remove(name)
            for fusion in [k for k in getattr(point, "fusions", {}) if name in k.split("+")]:
                del point.fusions[fusion]  # a fusion over a deleted adapter is stale
            if not len(point.adapters):
                point.remove_hooks()
                del self.points[key]
                self._anchors.pop(key, None)
        self._places.pop(name, None)
        if name in self.shared:
            del self.shared[name]

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter (unmerging it first if it was merged: last in, first out)."""
        self.require_adapters(name)
        if self.is_merged(name):
            self.unmerge(name)
        self._detach(name)
        del self.configs[name]
        if name in leaves(self._active):
            self.set_active(None)
        for average in [a for a in self.state.weighers if name in a.children]:
            del self.state.weighers[average]  # a provider for a deleted adapter is stale

    def require_adapters(self, *names: str) -> None:
        """Raise the standard "unknown adapter" error for any name that is not attached."""
        for name in names:
            if name not in self.configs:
                raise unknown("adapter", name, self.configs, hint="Add it with add_adapter or load_adapter.")

    # ------------------------------------------------------------------ setups
    @property
    def active(self) -> Setup | None:
        return self._active

    def set_active(self, setup: Setup | None) -> AdaptedModel:
        """Make ``setup`` run for every example unless a forward routes otherwise."""
        if setup is not None:
            validate(setup, list(self.configs))
        merging.check_setup(self, setup)
        if setup is not None:
            self._prepare(setup)
        self._active = setup
        self.state.set_active(setup)
        return self

    def _prepare(self, setup: Setup) -> None:
        validate(setup, list(self.configs))
        sparse.check_setup(self, setup)  # SFTs only in a Stack; one SFT set per call
        if setup not in self._ordered_setups:  # routed forwards prepare every step: check once
            check_stack_order(setup, self._point_keys_of)
            self._ordered_setups.add(setup)
        for fuse in fusions(setup):
            self._add_fusion(fuse)

    def _point_keys_of(self, name: str) -> set[str]:
        return {key for key, point in self.points.items() if name in point.adapters}

    def _add_fusion(self, fuse: Fuse) -> None:
        fallback = self._first_param()
        for key, point in self.points.items():
            if (isinstance(point, SublayerPoint) and fuse.key not in point.fusions
                    and any(c in point.adapters for c in fuse.children)):
                point.add_fusion(fuse.key)  # placed once, where it is made: casts are hooks
                precision.place(point.fusions[fuse.key], self._anchors.get(key, ()), self.adapter_dtype,
                                fallback)

    def train_adapters(self, *setups: Setup, backbone_params: Sequence[str] = ()) -> AdaptedModel:
        """Train only these adapters (a ``Fuse`` trains its fusion layer).

        ``backbone_params`` adds backbone parameters whose names contain any of
        the given strings (e.g. ``"LayerNorm"`` or an MLM head's ``"cls.predictions"``).
        """
        names = [s for s in setups if isinstance(s, str)]
        self.require_adapters(*names)
        blocks = [s for s in setups if not isinstance(s, str)]
        for s in blocks:
            validate(s, list(self.configs))
        fuses = [f for s in blocks for f in fusions(s)]
        names += [n for s in blocks for n in leaves(s) if not any(n in f.children for f in fuses)]
        merging.check_not_merged(self, names, "train_adapters")
        for s in blocks:
            self._prepare(s)
        for child in self.children():  # a vocabulary switch keeps its own trainability (as before it was a child)
            if child is not self.vocabulary_switch:
                child.requires_grad_(False)
        for name in names:
            for module in self.adapter_modules(name):
                module.requires_grad_(True)
        for fuse in fuses:
            for point in self.points.values():
                if isinstance(point, SublayerPoint) and fuse.key in point.fusions:
                    point.fusions[fuse.key].requires_grad_(True)
        for pname, param in self.model.named_parameters():
            if any(p in pname for p in backbone_params):
                param.requires_grad_(True)
        return self

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the bare backbone inside this block.

        Merged adapters are unmerged (last in, first out) for the block and merged
        again after it; the weights come back bit-identical.
        """
        with merging.suspended(self), self.state.call(disabled=True):  # this thread/task only
            yield

    def set_average_weights(self, average: Average,
                            provider: Callable[[AdapterPoint], torch.Tensor | None] | None) -> AdaptedModel:
        """Weigh ``average``'s children by ``provider(point)`` wherever it runs (None: its own weights).

        Lets a weight vector differ per point (e.g. per layer) and be learned: EMEA's
        test-time ensembles. ``provider`` gets the point (``point.key`` names its place)
        and returns one weight per child, or None there for the Average's own weights.
        """
        self._check_provider(average, provider)
        if provider is None:
            self.state.weighers.pop(average, None)
        else:
            self.state.weighers[average] = provider
        return self

    def _check_provider(self, average: Average, provider: Any) -> None:
        if not isinstance(average, Average):
            raise XlpeftTypeError(f"`average` can be an Average block; got {type(average).__name__} "
                                  f"{average!r}. Wrap the adapters in Average(...)")
        if provider is None:
            return
        validate(average, list(self.configs))
        if not callable(provider):
            raise XlpeftTypeError(f"`provider` can be a callable (point -> weights) or None; got "
                                  f"{type(provider).__name__}. Pass a function of the point")

    @contextlib.contextmanager
    def average_weights(self, average: Average,
                        provider: Callable[[AdapterPoint], torch.Tensor | None]) -> Iterator[None]:
        """``set_average_weights`` for the calls made inside this block (this thread/task only)."""
        self._check_provider(average, provider)
        with self.state.call(overrides={average: provider}):
            yield

    # ------------------------------------------------------------------ forward
    def _routes(self, adapters: Any, decoder_adapters: Any, batch: int | None,
                expandable: bool = False) -> dict | None:
        if adapters is None and decoder_adapters is None:
            return None
        merging.check_routing(self)  # merged weights would act on every example
        if decoder_adapters is not None and len(self.backbone.stacks) < 2:
            raise XlpeftValueError(
                f"`decoder_adapters` needs an encoder-decoder model; this {self.layout.family} model "
                "has only an encoder. Route with `adapters=` instead"
            )
        ref = next(self.model.parameters(), None)
        device = ref.device if ref is not None else None
        enc = route_for(adapters, batch, device, expandable)
        dec = route_for(decoder_adapters, batch, device, expandable) if decoder_adapters is not None else enc
        for route in (enc, dec):
            for setup in (route.setups if route is not None else ()):
                self._prepare(setup)
        stacks = list(self.backbone.stacks)
        routes = {stacks[0]: enc if enc is not None else self.state.active}
        if len(stacks) > 1:
            routes[stacks[1]] = dec if dec is not None else self.state.active
        return routes

    @torch.compiler.disable  # eager: under torch.compile(model) a new mix is new data, not a new graph
    def _call(self, adapters: Any, decoder_adapters: Any, batch: int | None,
              expandable: bool = False) -> contextlib.AbstractContextManager:
        """The frame of one call (``core.routing``): its routes, read by every point."""
        if any(parallel_branches(s) for s in (adapters, decoder_adapters)) or (
                adapters is None and decoder_adapters is None and parallel_branches(self._active)):
            raise XlpeftValueError("Parallel repeats the batch, so it runs in AdaptedModel's forward only, not in "
                                   "generate() or routing(); run those once per adapter instead")
        routes = self._routes(adapters, decoder_adapters, batch, expandable)
        sparse.check_routes(self, routes)
        outer = self.state.routes
        if routes is None and outer is not None and expandable:  # generate() inside routing()
            routes = {k: r.expanding(batch) if r is not None else None for k, r in outer.items()}
        return self.state.call(routes)

    @contextlib.contextmanager
    def routing(self, adapters: Any = None, decoder_adapters: Any = None,
                batch_size: int | None = None) -> Iterator[None]:
        """Route examples to setups for the calls made inside this block, in this thread or task.

        A list has one setup per example: of ``batch_size`` examples when given, else of
        as many as it has entries (a layer seeing another batch size raises).
        """
        with self._call(adapters, decoder_adapters, batch_size):
            yield

    def forward(self, *args: Any, adapters: Any = None, decoder_adapters: Any = None,
                **kwargs: Any) -> Any:
        """The backbone's forward; ``adapters`` routes one setup per example."""
        args, kwargs, adapters = self._parallel(args, kwargs, adapters, decoder_adapters)
        with self._call(adapters, decoder_adapters, _batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def _parallel(self, args: tuple, kwargs: dict, adapters: Any, decoder_adapters: Any) -> tuple[tuple, dict, Any]:
        """A ``Parallel`` setup as a routed call on the batch repeated once per branch (see ``Parallel``)."""
        setup = adapters if adapters is not None else (self._active if decoder_adapters is None else None)
        branches = parallel_branches(setup)
        if branches is None:
            return args, kwargs, adapters
        batch = _batch_size(args, kwargs)
        held = [k for k in ("past_key_values", "encoder_outputs") if kwargs.get(k) is not None]
        if decoder_adapters is not None or batch is None or held:
            raise XlpeftValueError(
                "Parallel repeats the tensor inputs of a forward once per branch: it needs input_ids or "
                f"inputs_embeds and no decoder_adapters, past_key_values or encoder_outputs; got "
                f"{'decoder_adapters' if decoder_adapters is not None else held or 'no tensor inputs'}")
        n = len(branches)

        def repeat(v: Any) -> Any:
            return v.repeat(n, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) and v.dim() and \
                v.shape[0] == batch else v
        return (tuple(repeat(a) for a in args), {k: repeat(v) for k, v in kwargs.items()},
                [b for b in branches for _ in range(batch)])

    def generate(self, *args: Any, adapters: Any = None, decoder_adapters: Any = None,
                 **kwargs: Any) -> Any:
        """``model.generate`` with routing (beams and samples follow their example)."""
        with self._call(adapters, decoder_adapters, _batch_size(args, kwargs), expandable=True):
            return self.model.generate(*args, **kwargs)

    @property
    def vocabulary_switch(self) -> nn.Module | None:
        """The per-language vocabulary point (``xlpeft.vocab.VocabularySwitch``), if one is set."""
        return self._modules.get("vocabulary")

    def set_vocabulary_switch(self, switch: nn.Module | None) -> AdaptedModel:
        """Make ``switch`` this model's vocabulary point, a child module ``vocabulary`` (None: remove it).

        As a child it trains, saves and moves with the model. One model has one switch:
        two would both rewrite the same embedding rows, so a second is refused.
        """
        current = self.vocabulary_switch
        if switch is None:
            if current is not None:
                del self._modules["vocabulary"]
            return self
        if getattr(switch, "router", None) is not self.state:
            raise XlpeftValueError("this VocabularySwitch was built for another model; build one with "
                                   "VocabularySwitch(model) for this model")
        if current is not None and current is not switch:
            raise XlpeftValueError("this model already has an attached VocabularySwitch; add languages to it "
                                   "(switch=…, or VocabularySwitch.of(model)) or detach() it first")
        self.add_module("vocabulary", switch)
        return self

    def activation_checkpointing_enable(self, **checkpoint_kwargs: Any) -> AdaptedModel:
        """Activation (gradient) checkpointing of the backbone's blocks (non-reentrant by default).

        Routing survives the re-run of checkpointed blocks in backward however
        checkpointing was enabled (this method, ``gradient_checkpointing_enable`` on
        ``self.model``, a strategy's ``checkpoint_wrapper``): see ``core.routing``.
        """
        kwargs = {"use_reentrant": False, **checkpoint_kwargs}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers ≥ 5.x
            self.model.activation_checkpointing_enable(kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for stack in self.backbone.stacks:
            self.state.route_checkpointing(stack)
        return self

    # ------------------------------------------------------------------ merging
    def is_merged(self, name: str) -> bool:
        if sparse.is_sft(self.configs.get(name)):
            return sparse.is_merged(self, name)
        return name in self._merges.order

    def merge(self, name: str) -> None:
        """Fold an adapter into the backbone weights (see ``core.merging``; SFTs: ``core.sft.merge``)."""
        if sparse.is_sft(self.configs.get(name)):
            return sparse.merge(self, name)
        merging.merge(self, name)

    def unmerge(self, name: str) -> None:
        """Undo ``merge`` (last in, first out on each linear or parameter)."""
        if sparse.is_sft(self.configs.get(name)):
            return sparse.unmerge(self, name)
        merging.unmerge(self, name)

    def merge_and_unload(self, names: Sequence[str] | None = None) -> list[str]:
        """Merge ``names`` in order for good and delete them; returns the names.

        None: the active setup's adapters (else the merged ones). The weights can
        no longer be unmerged; use it to deploy or to build on a merged backbone.
        """
        return merging.merge_and_unload(self, names)

    def merge_stacks(self) -> dict[str, list[str]]:
        """Place → its merged adapters, oldest first (only places with merges)."""
        return {p.key: list(p.merged) for p in self.points.values() if p.merged}

    def added_biases(self) -> list[str]:
        """Places whose bias-free linear got a bias from a merged BitFit adapter."""
        return sorted(self._merges.added_bias)

    def save_merged(self, path: str, **kwargs: Any) -> Any:
        """Write the backbone with its merged adapters as a plain HF model folder."""
        from xlpeft.ops.export import save_merged
        return save_merged(self, path, **kwargs)

    # ------------------------------------------------------------------ state
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Every tensor of one adapter, keyed ``<place>.<param>``."""
        self.require_adapters(name)
        out: dict[str, torch.Tensor] = {}
        for place, point in self.adapter_places(name).items():
            for k, v in point.adapters[name].state_dict().items():
                out[f"{place}.{k}"] = v
        if name in self.shared:
            for k, v in self.shared[name].state_dict().items():
                out[f"shared.{k}"] = v
        return out

    def adapter_places(self, name: str) -> dict[str, AdapterPoint]:
        """Place key (as the adapter found it: role path or module name) → its point."""
        self.require_adapters(name)
        return {place: self.points[key] for place, key in self._places.get(name, {}).items()}

    def load_adapter_state_dict(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors into an existing, unmerged adapter; keys and shapes must match exactly."""
        self.require_adapters(name)
        merging.check_not_merged(self, [name], "load_adapter_state_dict")
        if sparse.is_sft(self.configs[name]):
            sparse.check_tensors(self, name, tensors)
        own = self.adapter_state_dict(name)
        missing = sorted(set(own) - set(tensors))
        extra = sorted(k for k in set(tensors) - set(own) if not k.endswith("weight_mask"))
        if missing or extra:
            raise XlpeftValueError(
                f"adapter {name!r}: tensors do not match its config; missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for key, value in tensors.items():
            if key.endswith("weight_mask") and key not in own:  # a mask has its weight's shape
                own[key] = own.get(key[:-len("_mask")], value)
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                raise XlpeftValueError(
                    f"adapter {name!r}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
                )
        self._assign(name, tensors)

    def _assign(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from xlpeft.methods._layers import MaskedLinear

        for place, point in self.adapter_places(name).items():
            prefix = place + "."
            _load_into(point.adapters[name], {k[len(prefix):]: v for k, v in tensors.items()
                                              if k.startswith(prefix)}, MaskedLinear)
        if name in self.shared:
            _load_into(self.shared[name], {k[7:]: v for k, v in tensors.items()
                                           if k.startswith("shared.")}, MaskedLinear)

    @torch.no_grad()
    def initialize_adapters(self) -> AdaptedModel:
        """Re-run every adapter's and fusion layer's initialisation, in place.

        For models built on the meta device: ``to_empty`` leaves parameters
        uninitialised, so identity adapters (zero LoRA B, unit (IA)3 scales, zero
        bottleneck up-projections) would not be the identity. Modules keep their
        identity, device and dtype; their values come from a fresh build of
        their config.
        """
        merging.check_not_merged(self, list(self.configs), "initialize_adapters")
        for name, config in self.configs.items():
            for part in config.parts:
                shared = self.shared[name][part.method] if (
                    name in self.shared and part.method in self.shared[name]) else None
                if shared is not None:
                    shared.load_state_dict(part.build_shared(self._dims0()).state_dict())
                for site in part.sites():
                    for place in self.backbone.places(site):
                        point = self.points[self._places[name][place.key]]
                        _reinit(point.adapters[name], part.build(site, place.dims, shared), point)
        for point in self.points.values():
            for fusion in getattr(point, "fusions", {}).values():
                fusion.load_state_dict(Fusion(point.hidden).state_dict())
        return self

    def backbone_info(self) -> dict[str, Any]:
        """What an adapter file records to check it fits a backbone."""
        return {
            "family": self.layout.family,
            "model_type": getattr(self.model.config, "model_type", ""),
            "hidden_size": self.backbone.hidden,
            "num_layers": self.backbone.num_layers(),
            "vocab_size": self.backbone.vocab_size,
        }

    def save_adapter(self, name: str, path: str, format: str = "xlpeft") -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` atomically."""
        from xlpeft.ops.files import save_adapter
        save_adapter(self, name, path, format=format)

    def load_adapter(self, path: str, name: str | None = None, set_active: bool = False,
                     is_trainable: bool = False, verify: bool = True, **hub: Any) -> str:
        """Load an adapter directory (xlpeft, HF PEFT LoRA or AdapterHub) or Hub repo id; returns its name.

        ``hub``: ``revision``, ``cache_dir``, ``local_files_only``, ``token`` for a repo id.

        Loaded adapters are frozen unless ``is_trainable`` (as in PEFT): loading
        one for inference or as a fixed part of a ``Stack`` must not make it
        train, or checkpoint, by accident. ``train_adapters`` overrides this.
        """
        from xlpeft.ops.files import load_adapter
        loaded = load_adapter(self, path, name=name, verify=verify, hub=hub)  # verify=False: skip the sha256 checks
        for module in self.adapter_modules(loaded):
            module.requires_grad_(is_trainable)
        if set_active:
            self.set_active(loaded)
        return loaded

    def push_adapter_to_hub(self, name: str, repo_id: str, **kwargs: Any) -> Any:
        """Upload adapter ``name`` to the Hub repo ``repo_id`` (see ``ops.hub.push_adapter_to_hub``)."""
        from xlpeft.ops.hub import push_adapter_to_hub
        return push_adapter_to_hub(self, name, repo_id, **kwargs)

    def average_adapters(self, new_name: str, names: Sequence[str],
                         weights: Sequence[float] | None = None) -> AdaptedModel:
        """Weight-space average of same-config adapters (AdapterSoup; see ``ops.arithmetic``)."""
        from xlpeft.ops.arithmetic import average_adapters
        average_adapters(self, new_name, names, weights)
        return self

    def add_fusion(self, fuse: Fuse) -> AdaptedModel:
        """Make ``fuse``'s fusion layers (frozen, as ``set_active`` would) without activating it."""
        if not isinstance(fuse, Fuse):
            raise XlpeftTypeError(f"`fuse` can be a Fuse block; got {type(fuse).__name__} {fuse!r}")
        self._prepare(fuse)
        return self

    def save_setup(self, setup: Setup, path: str) -> Any:
        """Write ``setup`` with its adapters and fusion layers as one directory (see ``ops.setups``)."""
        from xlpeft.ops.setups import save_setup
        return save_setup(self, setup, path)

    def load_setup(self, path: str, set_active: bool = True, is_trainable: bool = False,
                   verify: bool = True) -> Setup:
        """Load a ``save_setup`` directory; returns its setup (active unless ``set_active=False``)."""
        from xlpeft.ops.setups import load_setup
        return load_setup(self, path, set_active=set_active, is_trainable=is_trainable, verify=verify)

    def parameter_report(self):
        """Trainable, changed and stored counts per adapter (see ``report``)."""
        from xlpeft.ops.report import parameter_report
        return parameter_report(self)


def _reinit(module: nn.Module, fresh: nn.Module, point: AdapterPoint) -> None:
    """Copy a freshly built module's values into ``module`` (dtype and device kept)."""
    if isinstance(point, LinearPoint):  # DoRA's magnitude starts at its linear's norm
        point.bind(fresh)
    module.load_state_dict(fresh.state_dict())
    if getattr(module, "from_vocab", False):  # soft prompts copy random vocabulary rows
        module.init_from_vocabulary(point.embeddings.weight)


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], masked_cls: type) -> None:
    """``load_state_dict`` that also restores sparsity masks (None buffers)."""
    for sub_name, sub in module.named_modules():
        if isinstance(sub, masked_cls):
            key = f"{sub_name}.weight_mask" if sub_name else "weight_mask"
            if key in tensors:
                sub.weight_mask = tensors[key].to(device=sub.weight.device, dtype=torch.bool)
    with torch.no_grad():
        for pname, param in module.named_parameters():
            param.copy_(tensors[pname].to(param.dtype))
        for bname, buf in module.named_buffers():
            if buf is not None and not bname.endswith("weight_mask") and bname in tensors:
                buf.copy_(tensors[bname])


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    for value in args:
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None
