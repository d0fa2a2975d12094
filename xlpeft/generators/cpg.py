"""Contextual parameter generation for multilingual NMT: encoder and decoder adapters from language embeddings.

Platanios, Sachan, Neubig & Mitchell 2018, "Contextual Parameter Generation
for Universal Neural Machine Translation" (EMNLP, arXiv:1808.08493): the
encoder's parameters are generated from the source language's embedding, the
decoder's from the target's. Here, as in Üstün, Bérard, Besacier & Gallé 2021
("Multilingual Unsupervised Neural Machine Translation with Denoising
Adapters", EMNLP) and MAD-G, what is generated is small: a bottleneck adapter
per encoder and decoder layer, on a frozen shared model.

    language ℓ ─► λ_ℓ: learned embedding (random or typology-initialised)
                       or typology MLP (URIEL: any language lang2vec knows)
    slot s in encoder ∪ decoder:  W = Σ_k (M_s λ)_k B_k        (MAD-G's low-rank form, madg.py)

    src ─► encoder slots read λ_src          tgt ─► decoder slots read λ_tgt

Each language is one named generated adapter with slots in both stacks; the
translation module routes the encoder by source and the decoder by target, so a
pair never trained together (spa→por after spa→eng and eng→por) needs no new
module, and with typology embeddings a language never trained on gets one too.
``materialise`` writes a language's generated adapter as an ordinary bottleneck
adapter (both stacks) that loads without the generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import nn

from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.generators.base import Weights
from xlpeft.generators.madg import MadGConfig, MadGGenerator
from xlpeft.methods.bottleneck import BottleneckConfig
from xlpeft.typology import uriel_code

Embedding = Literal["typology", "learned"]
Init = Literal["typology", "random"]
EMBEDDINGS, INITS = get_args(Embedding), get_args(Init)
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class CPGConfig(MadGConfig):
    """A CPG generator: MAD-G's low-rank emission over encoder and decoder slots, one embedding per language."""

    embedding: Embedding = "typology"
    """Language embedding: ``typology`` (MLP of URIEL features) or ``learned`` (one vector per language)."""
    languages: tuple[str, ...] = ()
    """Languages with a learned embedding (``learned`` only)."""
    init: Init = "typology"
    """Initial learned embeddings: ``typology`` (the typology MLP's output at init) or ``random``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embedding not in EMBEDDINGS:
            raise XlpeftValueError(f"`embedding` can be {', '.join(map(repr, EMBEDDINGS))}; got {self.embedding!r}")
        if self.init not in INITS:
            raise XlpeftValueError(f"`init` can be {', '.join(map(repr, INITS))}; got {self.init!r}")
        if self.embedding == "learned" and not self.languages:
            raise XlpeftValueError("a `learned` CPG embedding needs `languages` (the languages given a vector); "
                                   "got none. List them, or use embedding='typology'")
        if self.embedding == "typology" and self.languages:
            raise XlpeftValueError(f"`languages` can be given with embedding='learned' only; got {list(self.languages)} "
                                   "with 'typology' (every language URIEL knows has an embedding)")

    def adapter_config(self) -> BottleneckConfig:
        """The static adapter a generated one equals: encoder and decoder slots."""
        return BottleneckConfig(reduction_factor=self.reduction_factor, non_linearity=self.non_linearity,
                                placement=tuple(self.placement), leave_out=tuple(self.leave_out), stacks=STACKS)


class CPGGenerator(MadGGenerator):
    """Emits one language's encoder and decoder adapters from its embedding λ."""

    kind = "cpg"

    def __init__(self, config: CPGConfig, hidden: int, slots: list[str],
                 backbone: dict[str, Any] | None = None) -> None:
        stacks = {s.split(".", 1)[0] for s in slots}
        if not set(STACKS) <= stacks:
            raise XlpeftValueError(f"a CPG generator emits encoder and decoder adapters: it needs an encoder-decoder "
                                   f"backbone; this one gives slots in {sorted(stacks)} only")
        super().__init__(config, hidden, slots, backbone)
        self.table = nn.ParameterDict()
        if config.embedding == "learned":
            d = config.language_dim
            for lang in config.languages:
                code = uriel_code(lang)
                start = self.typology(code).detach() if config.init == "typology" else torch.randn(d) / math.sqrt(d)
                self.table[code] = nn.Parameter(start.clone())
            self.typology.requires_grad_(False)  # used only to initialise: no gradient reaches it

    def language_embedding(self, code: str) -> torch.Tensor:
        """λ of a URIEL code: its learned vector, or the typology MLP's output."""
        if self.config.embedding == "typology":
            return self.typology(code)
        if code not in self.table:
            raise XlpeftKeyError(f"no learned CPG embedding for {code!r}: languages can be "
                                 f"{', '.join(self.table)}; got {code!r}. Add it to `languages` (and train), "
                                 "or use embedding='typology' to generate for languages without text")
        return self.table[code]

    def _generate(self, language: str, task: str) -> Weights:
        return self.emit(self.language_embedding(language))

    def knows(self, language: str) -> bool:
        """Whether an adapter can be generated for ``language`` (typology: any URIEL code)."""
        return self.config.embedding == "typology" or uriel_code(language) in self.table


