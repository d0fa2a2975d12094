"""Translation with generated language modules (contextual parameter generation, ``xlpeft.generators.cpg``).

Platanios et al. 2018 (CPG); Üstün et al. 2021-style adapters: every language's
encoder and decoder adapters come from one generator conditioned on its
embedding, routed per example like ``TranslationAdaptation``'s monolingual
modules (encoder by source, decoder by target) in training and in ``generate``.

    batch: spa→nah, nah→spa, spa→ote ─► encoder: [spa, nah, spa]  decoder: [nah, spa, ote]
           each name a generated adapter; one backward trains the generator from every direction

A direction never trained (any source, any target among the languages) needs no
new module; with ``embedding: typology`` a language without text is attached on
first use, its adapters generated from URIEL. ``AdapterExport`` writes each
language's generated adapter materialised (ordinary bottleneck directories, both
stacks); ``export_generator`` writes the generator itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xlpeft.errors import XlpeftValueError
from xlpeft.generators.cpg import CPGGenerator
from xlpeft.generators.files import build_generator, load_generator, save_generator
from xlpeft.lightning.translation import BACKBONE_PARTS, BackbonePart, TranslationAdaptation


class CPGTranslation(TranslationAdaptation):
    """Multilingual NMT whose per-language encoder/decoder adapters a shared generator emits.

    Args:
        backbone: A seq2seq model (name or folder), or an encoder ("embedded") warm-started into bert2bert.
        languages: Languages attached when the module is built (trained ones); others are attached on
            first use when the generator knows them (typology embeddings).
        generator_config: CPGConfig fields: embedding (typology or learned), init, reduction_factor,
            basis, language_dim, placement, ... With learned embeddings `languages` defaults to these.
        load_generator_from: A CPG generator folder (export_generator) to start from.
        export_generator: Folder the trained generator is written to at the end of fit.
        shared: Name -> preset/config of modules every example runs (after its language module).
        train_backbone: Backbone parts that train too: none, all, decoder, cross-attention.
        encoder_layers: Keep at most this many encoder layers (bert2bert warm start).
        decoder_layers: Keep at most this many decoder layers (bert2bert warm start).
        lang_tokens: Language code -> tag token. Under `xlpeft fit` it follows the data's.
        max_new_tokens: Generation length limit.
        num_beams: Beam size for generation.
        label_smoothing: Label smoothing of the cross-entropy.
        export_model: Folder the whole backbone is written to at the end of fit.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    def __init__(self, backbone: str = "embedded", languages: Sequence[str] = (),
                 generator_config: dict[str, Any] | None = None, load_generator_from: str | None = None,
                 export_generator: str | None = None, shared: Mapping[str, str | dict] | None = None,
                 train_backbone: BackbonePart = "none", encoder_layers: int | None = None,
                 decoder_layers: int | None = None, lang_tokens: Mapping[str, str] | None = None,
                 max_new_tokens: int = 64, num_beams: int = 1, label_smoothing: float = 0.0,
                 export_model: str | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        if not list(languages):
            raise XlpeftValueError("`languages` can be one or more language codes (those of the training "
                                   "directions); got []")
        super().__init__(backbone, modules="none", shared=shared, train_backbone=train_backbone,
                         encoder_layers=encoder_layers, decoder_layers=decoder_layers, lang_tokens=lang_tokens,
                         max_new_tokens=max_new_tokens, num_beams=num_beams, label_smoothing=label_smoothing,
                         export_model=export_model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        self.hparams.clear()  # this class's arguments only (checkpoints rebuild it from them)
        self.save_hyperparameters(init_args)
        self.generator = self._generator(generator_config or {}, load_generator_from, languages)
        self.languages = [self.generator.attach(self.adapted, lang, name=lang) for lang in languages]
        self.modules_kind = "monolingual"  # routed per language, like TranslationAdaptation's modules
        self.adapted.train_adapters(*self.languages, *self.shared_names, backbone_params=BACKBONE_PARTS[train_backbone])

    def _generator(self, fields: dict[str, Any], path: str | None, languages: Sequence[str]) -> CPGGenerator:
        if path:
            generator = load_generator(path, self.adapted)
        else:
            if fields.get("embedding") == "learned":
                fields = {"languages": list(languages), **fields}
            generator = build_generator("cpg", self.adapted, **fields)
        if not isinstance(generator, CPGGenerator):
            raise XlpeftValueError(f"`load_generator_from` can be a CPG generator folder; got a {generator.kind} "
                                   f"generator at {path}. Train one with CPGTranslation(export_generator=...)")
        return generator

    def _module(self, name: str, role: str, direction: str) -> str | None:
        """A language's generated module, attached on first use when the generator knows it."""
        if name not in self.adapted.configs and self.generator.knows(name):
            self.generator.attach(self.adapted, name, name=name)
        return super()._module(name, role, direction)

    def export_adapters(self, directory: str | Path, names: list[str] | None = None) -> list[Path]:
        """Each language's generated adapter, materialised as an ordinary adapter directory (rank zero)."""
        if getattr(self, "_trainer", None) is not None and not self.trainer.is_global_zero:
            return []
        wanted = names or [n for n in self.adapted.adapter_names if n not in self.shared_names]
        out = []
        for name in wanted:
            if name in self.shared_names:
                out += super().export_adapters(directory, [name])
            else:
                out.append(self.generator.materialise(name, Path(directory) / name, name=name))
        return out

    def on_train_end(self) -> None:
        super().on_train_end()
        target = self.hparams.export_generator
        if target and (self._trainer is None or self.trainer.is_global_zero):
            save_generator(self.generator, target)
        self.generator.clear_cache()
