"""Per-language new-vocabulary embeddings, switched by the model's routing.

Pfeiffer et al. 2021, "UNKs Everywhere: Adapting Multilingual Language Models
to New Scripts": pieces shared with the old vocabulary keep their embedding
(lexical-overlap initialisation); new pieces get a factorised embedding
E = μ + F·G, G = top-k principal components of the original embeddings (frozen,
shared knowledge), F (V_new × k) the only new matrix per language.

    ids ─► [pre-hook: ids ≥ V_old → 0] word_embeddings [hook: rows of routed
            language with id ≥ V_old ← μ + F·G] ─► embeddings (+ invertible) ─► encoder
    MLM head ─► decoder (tied) ─► [hook: routed language: old columns it lacks = -inf,
            + new columns h·(μ + F·G)ᵀ + b] ─► logits, width V_old + max V_new

Which examples use which vocabulary comes from the same ``Route`` every
adapter point reads (routing once per forward): an example whose setup
contains language ``sat`` (e.g. ``Stack("sat", "genre")``) uses ``sat``'s
vocabulary. In a mixed batch every row's logits are padded with -inf to the
widest vocabulary present; column j ≥ V_old means "new piece j − V_old of
that row's language". Nothing of the backbone changes; ``detach`` removes the hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xlpeft.core.composition import Setup, leaves
from xlpeft.errors import XlpeftValueError, unknown
from xlpeft.core.inject import get_module
from xlpeft.core.points import Point
from xlpeft.methods.base import check_positive


@dataclass(frozen=True)
class NewVocabConfig:
    """How a new script's vocabulary and embeddings are built."""

    vocab_size: int = 4000
    """SentencePiece pieces to train on the target corpus."""
    factor_dim: int = 64
    """k: width of F; G keeps the top-k principal components of the old embeddings."""
    model_type: str = "unigram"
    """SentencePiece model: ``unigram`` or ``bpe``."""
    train_shared: bool = False
    """Also train a per-language copy of the shared pieces' embeddings (else they stay the backbone's)."""
    init_scale: float = 1.0
    """New pieces' F rows ~ N(0, init_scale · std of the old embeddings' coordinates)."""
    seed: int = 0
    """Seed of vocabulary training and of F's initialisation."""

    def __post_init__(self) -> None:
        check_positive("vocab_size", self.vocab_size)
        check_positive("factor_dim", self.factor_dim)
        check_positive("init_scale", self.init_scale, allow_zero=True)
        if self.model_type not in ("unigram", "bpe"):
            raise XlpeftValueError(f"`model_type` can be 'unigram', 'bpe'; got {self.model_type!r}")


def principal_factors(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean μ, G (k × D, top-k principal directions) and the old rows' coordinate std (k)."""
    if not 0 < k <= weight.shape[1]:
        raise XlpeftValueError(f"`factor_dim` can be 1 … {weight.shape[1]} (the hidden size); got {k}")
    w = weight.detach().double()
    mean = w.mean(0)
    x = w - mean
    _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues: the last k are the top
    g = vectors[:, -k:].flip(-1).T.contiguous()
    return mean.float(), g.float(), (x @ g.T).std(0).float()


class NewVocabulary(nn.Module):
    """One language's new pieces (μ + F·G) and output bias; optionally its shared rows."""

    def __init__(self, old_weight: torch.Tensor, old_bias: torch.Tensor | None, shared: dict[int, int],
                 num_new: int, config: NewVocabConfig) -> None:
        super().__init__()
        v_old = old_weight.shape[0]
        self.old_size = v_old
        self.config = config
        mean, g, std = principal_factors(old_weight, config.factor_dim)
        gen = torch.Generator().manual_seed(config.seed)
        self.register_buffer("mean", mean)
        self.register_buffer("G", g)
        self.F = nn.Parameter(torch.randn(num_new, config.factor_dim, generator=gen) * std * config.init_scale)
        base_bias = old_bias.detach().float() if old_bias is not None else torch.zeros(v_old)
        self.bias = nn.Parameter(torch.full((num_new,), float(base_bias.mean())))
        ids = torch.tensor(sorted(set(shared.values())), dtype=torch.long)
        keep = torch.zeros(v_old, dtype=torch.bool)
        keep[ids] = True
        self.register_buffer("keep_old", keep)
        self.register_buffer("shared_ids", ids)
        self.train_shared = config.train_shared
        if config.train_shared:  # lexical overlap: an exact copy of the original rows
            slot = torch.full((v_old,), -1, dtype=torch.long)
            slot[ids] = torch.arange(len(ids))
            self.register_buffer("slot_of_old", slot)
            self.shared_rows = nn.Parameter(old_weight.detach()[ids].clone().float())
            self.shared_bias = nn.Parameter(base_bias[ids].clone())

    @property
    def num_new(self) -> int:
        return self.F.shape[0]

    def weight(self) -> torch.Tensor:
        """Embeddings of the new pieces: μ + F·G."""
        return self.mean + self.F @ self.G

    def embed(self, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Replace the rows of ``out`` (old-embedding lookups) this vocabulary owns."""
        is_new = (ids >= self.old_size).unsqueeze(-1)
        rows = self.weight().to(out.dtype)[(ids - self.old_size).clamp(0, self.num_new - 1)]
        result = torch.where(is_new, rows, out)
        if self.train_shared:
            slot = self.slot_of_old[ids.clamp(max=self.old_size - 1)]
            has = ((slot >= 0) & ~is_new.squeeze(-1)).unsqueeze(-1)
            result = torch.where(has, self.shared_rows.to(out.dtype)[slot.clamp(min=0)], result)
        return result

    def logits(self, h: torch.Tensor, old: torch.Tensor, width: int) -> torch.Tensor:
        """Logits over this language's vocabulary, -inf elsewhere, ``width`` columns."""
        old = old.masked_fill(~self.keep_old, float("-inf"))
        if self.train_shared:
            own = h @ self.shared_rows.to(h.dtype).T + self.shared_bias.to(h.dtype)
            old = old.index_copy(-1, self.shared_ids, own)
        new = h @ self.weight().to(h.dtype).T + self.bias.to(h.dtype)
        return _pad(torch.cat([old, new], -1), width)


def _pad(logits: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - logits.shape[-1]
    if extra <= 0:
        return logits
    fill = logits.new_full((*logits.shape[:-1], extra), float("-inf"))
    return torch.cat([logits, fill], -1)


def build_vocabulary(adapted: Any, shared: dict[int, int], num_new: int, config: NewVocabConfig) -> NewVocabulary:
    """A vocabulary for ``adapted``'s backbone, attached nowhere (loading builds aside first)."""
    embedding = get_module(adapted.backbone.base, adapted.layout.word_embeddings)
    output = adapted.backbone.lm_output()
    bias = getattr(output, "bias", None) if output is not None else None
    return NewVocabulary(embedding.weight, bias, shared, num_new, config)


class VocabularySwitch(Point):
    """Named per-language vocabularies on an ``AdaptedModel``, selected by its routing.

    A vocabulary point (``core.points.Point``): attached, it is the model's child
    ``vocabulary`` (``AdaptedModel.set_vocabulary_switch``), so it trains, saves and
    moves with the model, and one model has at most one.
    """

    def __init__(self, adapted: Any) -> None:
        super().__init__(adapted.state, tuple(adapted.backbone.stacks))
        self.vocabs = nn.ModuleDict()
        self.tokenizers: dict[str, Any] = {}  # lang -> NewVocabTokenizer (SentencePiece model + id map)
        object.__setattr__(self, "adapted", adapted)  # a reference, not a child
        object.__setattr__(self, "embedding", get_module(adapted.backbone.base, adapted.layout.word_embeddings))
        self.old_size = self.embedding.num_embeddings
        object.__setattr__(self, "output", adapted.backbone.lm_output())
        self.key = "vocabulary"
        self.attach()

    @staticmethod
    def of(adapted: Any) -> VocabularySwitch | None:
        """The switch whose hooks are on ``adapted`` now, if any."""
        switch = adapted.vocabulary_switch
        return switch if switch is not None and switch.handles else None

    def attach(self, *_modules: nn.Module) -> None:
        """Register the hooks (done at construction; again after ``detach``)."""
        if self.handles:
            return
        self.adapted.set_vocabulary_switch(self)  # refuses a second switch on one model
        self.handles = [self.embedding.register_forward_pre_hook(self._pre),
                        self.embedding.register_forward_hook(self._post)]
        if self.output is not None:
            self.handles.append(self.output.register_forward_hook(self._on_logits))

    # ----------------------------------------------------------------- vocabularies
    def add(self, lang: str, shared: dict[int, int], num_new: int, config: NewVocabConfig,
            tokenizer: Any = None) -> NewVocabulary:
        """Build ``lang``'s vocabulary from the backbone's embeddings (see the module docstring).

        ``tokenizer`` (its ``NewVocabTokenizer``) is kept so ``save_vocabulary`` can write it.
        """
        return self.put(lang, self.build(shared, num_new, config), tokenizer)

    def build(self, shared: dict[int, int], num_new: int, config: NewVocabConfig) -> NewVocabulary:
        """A vocabulary on this backbone, not attached yet (``put`` attaches it)."""
        return build_vocabulary(self.adapted, shared, num_new, config)

    def put(self, lang: str, vocab: NewVocabulary, tokenizer: Any = None) -> NewVocabulary:
        """Attach a built vocabulary under ``lang``."""
        if lang in self.vocabs:
            raise XlpeftValueError(f"language {lang!r} already has a new vocabulary; remove({lang!r}) first")
        self.vocabs[lang] = vocab.to(self.embedding.weight.device)
        if tokenizer is not None:
            self.tokenizers[lang] = tokenizer
        return self.vocabs[lang]

    def remove(self, lang: str) -> None:
        if lang not in self.vocabs:
            raise unknown("new vocabulary", lang, self.vocabs.keys())
        del self.vocabs[lang]
        self.tokenizers.pop(lang, None)

    def detach(self) -> None:
        """Remove the hooks: the model is exactly the backbone (plus adapters) again."""
        self.remove_hooks()
        if self.adapted.vocabulary_switch is self:
            self.adapted.set_vocabulary_switch(None)

    def _vocab_of(self, setup: Setup) -> NewVocabulary | None:
        name = next((n for n in leaves(setup) if n in self.vocabs), None)
        return None if name is None else self.vocabs[name]

    def _acts(self, route: Any) -> bool:
        return any(n in self.vocabs for n in route.names)

    def _check_range(self, ids: torch.Tensor) -> None:
        """Refuse ids beyond the backbone's vocabulary with a clear error where that costs no sync.

        On an accelerator (or compiled) the check would stall the host every forward: there
        the embedding's own index check reports such ids instead.
        """
        if ids.device.type != "cpu" or torch.compiler.is_compiling() or not ids.numel():
            return
        top = int(ids.max())
        if top >= self.old_size:
            raise _out_of_range(top, self.old_size, list(self.vocabs))

    # ----------------------------------------------------------------- hooks
    def _pre(self, module: nn.Module, args: tuple) -> tuple | None:
        ids = args[0]
        route = self._route()
        self._keep(None if route is None else ids)
        if route is None:
            self._check_range(ids)
            return None
        return (ids.masked_fill(ids >= self.old_size, 0), *args[1:])

    def _post(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        ids = self._take()
        route = self._route()
        if ids is None or route is None:
            return None
        return route.dispatch(self._embed_group, ids, out)

    def _embed_group(self, setup: Setup, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        vocab = self._vocab_of(setup)
        if vocab is None:
            self._check_range(ids)
            return out
        return vocab.embed(ids, out)

    def _on_logits(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        route = self._route()
        if route is None:
            return None
        width = self.old_size + max(self.vocabs[n].num_new for n in route.names if n in self.vocabs)

        def group(setup: Setup, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            vocab = self._vocab_of(setup)
            return _pad(logits, width) if vocab is None else vocab.logits(h, logits, width)
        return route.dispatch(group, args[0], out)


def _out_of_range(top: int, size: int, langs: list[str]) -> XlpeftValueError:
    return XlpeftValueError(
        f"token id {top} is outside the backbone vocabulary (size {size}); ids ≥ {size} belong to a new "
        f"vocabulary, so route those examples to its language ({', '.join(langs) or 'none added'}) "
        "with adapters=[…]")
