"""Multilingual NMT with language-specific modules.

Philip et al. 2020, "Monolingual Adapters for Zero-Shot Neural Machine
Translation" (EMNLP): one adapter per language, the source's in every encoder
layer, the target's in every decoder layer. Bapna & Firat 2019, "Simple,
Scalable Adaptation for Neural Machine Translation" (EMNLP): one adapter per
language pair. Üstün et al. 2021 (denoising adapters): language adapters
trained on monolingual text (noised → clean), then plugged in here. Gheini et
al. 2021, "Cross-Attention is All You Need": tune cross-attention only.

    src_lang ─► encoder  ─ layer: Stack(<src module>, *shared) ─┐
    tgt_lang ─► decoder  ─ layer: Stack(<tgt module>, *shared) ◄┘ ─► tokens
                 monolingual: <src>/<tgt> = language codes; pair: both "<src>_<tgt>"

Routing is per example through the core (one batch mixes directions, in
training and in ``generate``); generation starts each example with its
target-language token where the backbone uses one (M2M100/NLLB/mBART-50).
An encoder-only backbone folder (e.g. the embedded e5) is warm-started into a
bert2bert ``EncoderDecoderModel``. BLEU and chrF (torchmetrics, ×100) per
direction: ``SacreBLEUScore`` / ``CHRFScore`` states per direction, summed
across ranks at epoch end (corpus scores of the whole set on every rank);
token losses are summed on device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F

from xlpeft.core.composition import Setup, Stack
from xlpeft.data.parallel import Seq2SeqFormat
from xlpeft.errors import XlpeftKeyError, XlpeftValueError
from xlpeft.lightning.base import AdapterModule
from xlpeft.lightning.metrics import PerKey, Sums, group_rows
from xlpeft.core.model import AdaptedModel

# Literal choices: the CLI refuses another value while parsing, before the backbone loads
Modules = Literal["monolingual", "pair", "none"]
BackbonePart = Literal["none", "all", "decoder", "cross-attention"]
MODULES = get_args(Modules)
BACKBONE_PARTS: dict[str, tuple[str, ...]] = {
    "none": (), "all": ("",), "decoder": ("decoder",),
    "cross-attention": ("crossattention", "encoder_attn", "EncDecAttention"),  # bert, bart-like, t5-like names
}
"""``train_backbone`` choice → substrings of the backbone parameter names it trains."""


def pair_name(src: str, tgt: str) -> str:
    """Adapter name of a language-pair module."""
    return f"{src}_{tgt}"


def load_translation_backbone(backbone: str, decoder_layers: int | None = None,
                              encoder_layers: int | None = None) -> AdaptedModel:
    """A seq2seq backbone by name or path; an encoder-only folder is warm-started (bert2bert)."""
    from xlpeft.backbones.embedded import backbone_path
    from xlpeft.backbones.loading import load_backbone
    from xlpeft.backbones.warmstart import is_encoder_only, warm_start_bert2bert

    path = backbone_path(backbone)
    if Path(path).is_dir() and is_encoder_only(path):
        model, tokenizer = warm_start_bert2bert(path, decoder_layers, encoder_layers)
    else:
        model, tokenizer = load_backbone(path, head="seq2seq")
    return AdaptedModel(model, tokenizer=tokenizer)


class TranslationAdaptation(AdapterModule):
    """Seq2seq translation with per-language (or per-pair) modules routed per example.

    Args:
        backbone: A seq2seq model (name or folder), or an encoder ("embedded") warm-started
            into bert2bert.
        modules: "monolingual" (source adapter in the encoder, target adapter in the decoder),
            "pair" (one adapter per direction) or "none" (train the backbone only).
        languages: Languages given a module (monolingual).
        directions: Directions given a module (pair), as src-tgt.
        adapter: Preset name or config dict of each module.
        shared: Name -> preset/config of modules every example runs (after its language module).
        language_adapters: Language code -> trained module folder to load (frozen unless train_loaded).
        train_loaded: Train the loaded modules too.
        train_backbone: Backbone parts that train: none, all, decoder, cross-attention.
        encoder_layers: Keep at most this many encoder layers (bert2bert warm start).
        decoder_layers: Keep at most this many decoder layers (bert2bert warm start).
        lang_tokens: Language code -> token used as its tag. Under `xlpeft fit` leave it out: it
            follows `data.init_args.lang_tokens`.
        max_new_tokens: Generation length limit.
        num_beams: Beam size for generation (1 = greedy).
        label_smoothing: Label smoothing of the cross-entropy.
        export_model: Folder the whole trained backbone is written to at the end of fit.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear warm-up steps before the linear decay.
    """

    def __init__(self, backbone: str = "embedded", modules: Modules = "monolingual",
                 languages: Sequence[str] = (), directions: Sequence[str] = (),
                 adapter: str | dict = "pfeiffer", shared: Mapping[str, str | dict] | None = None,
                 language_adapters: Mapping[str, str] | None = None, train_loaded: bool = False,
                 train_backbone: BackbonePart = "none", encoder_layers: int | None = None,
                 decoder_layers: int | None = None,
                 lang_tokens: Mapping[str, str] | None = None, max_new_tokens: int = 64,
                 num_beams: int = 1, label_smoothing: float = 0.0, export_model: str | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.0, warmup_steps: int = 0) -> None:
        init_args = {k: v for k, v in locals().items() if k != "self"}
        if modules not in MODULES:
            raise XlpeftValueError(f"`modules` can be {', '.join(MODULES)}; got {modules!r}")
        if train_backbone not in BACKBONE_PARTS:
            raise XlpeftValueError(f"`train_backbone` can be {', '.join(BACKBONE_PARTS)}; got {train_backbone!r}")
        super().__init__(backbone, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         adapted=load_translation_backbone(backbone, decoder_layers, encoder_layers))
        self.save_hyperparameters(init_args)
        self.modules_kind = modules
        self.format = Seq2SeqFormat.for_model(self.adapted.model.config, self.adapted.tokenizer, lang_tokens) \
            if self.adapted.tokenizer is not None else None
        self.shared_names = list(shared or {})
        trained = self._add_modules(languages, directions, adapter, shared or {}, language_adapters or {})
        self.adapted.train_adapters(*trained, backbone_params=BACKBONE_PARTS[train_backbone])
        self.adapted.train()
        self.scores = PerKey(direction_metrics)
        self.results: dict[str, dict[str, float]] = {}

    def _add_modules(self, languages: Sequence[str], directions: Sequence[str], adapter: str | dict,
                     shared: Mapping[str, str | dict], loaded: Mapping[str, str]) -> list[str]:
        """Load, then create missing modules; return the names that train."""
        from xlpeft.data.parallel import parse_direction

        for name, path in loaded.items():
            self.adapted.load_adapter(path, name=name)
        wanted = list(languages) if self.modules_kind == "monolingual" else []
        if self.modules_kind == "pair":
            wanted = [pair_name(*parse_direction(d)) for d in directions]
        for name in wanted:
            if name not in self.adapted.configs:
                self.adapted.add_adapter(name, adapter)
        for name, config in shared.items():
            if name not in self.adapted.configs:
                self.adapted.add_adapter(name, config)
        names = [n for n in [*wanted, *shared] if n not in loaded or self.hparams.train_loaded]
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------ routing
    def _module(self, name: str, role: str, direction: str) -> str | None:
        if self.modules_kind == "none":
            return None
        if name not in self.adapted.configs:
            raise XlpeftKeyError(
                f"no {self.modules_kind} module for {f'the {role} of ' if role else ''}direction {direction!r}: modules can be "
                f"{', '.join(self.adapted.adapter_names) or '(none)'}; got {name!r}. Add it to "
                f"`{'languages' if self.modules_kind == 'monolingual' else 'directions'}` or load it with "
                "`language_adapters`")
        return name

    def _stack(self, name: str | None) -> Setup | None:
        parts = ([name] if name else []) + self.shared_names
        return None if not parts else parts[0] if len(parts) == 1 else Stack(*parts)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.require_ddp_find_unused(routed=True)

    def setups(self, src_langs: Sequence[str], tgt_langs: Sequence[str]) -> tuple[list | None, list | None]:
        """Per-example encoder setups (by source) and decoder setups (by target)."""
        enc, dec = [], []
        for s, t in zip(src_langs, tgt_langs, strict=True):
            direction = f"{s}-{t}"
            if self.modules_kind == "pair":
                e = d = self._module(pair_name(s, t), "", direction)
            else:
                e, d = self._module(s, "source", direction), self._module(t, "target", direction)
            enc.append(self._stack(e))
            dec.append(self._stack(d))
        if all(x is None for x in enc + dec):
            return None, None
        return enc, dec

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Logits of the labels (teacher forcing), routed per example."""
        enc, dec = self.setups(batch["src_langs"], batch["tgt_langs"])
        labels = batch["labels"]
        shift = getattr(self.adapted.model, "prepare_decoder_input_ids_from_labels", None)
        # the model's own right shift (mBART wraps its last token); without one, it shifts `labels` itself
        target = {"decoder_input_ids": shift(labels=labels)} if shift is not None else {"labels": labels}
        out = self.adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           adapters=enc, decoder_adapters=dec, **target)
        return out.logits

    def token_losses(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Per-token cross-entropy (0 at padding), shape ``labels``."""
        logits = self(batch)
        labels = batch["labels"]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                               reduction="none", label_smoothing=self.hparams.label_smoothing).view_as(labels)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.token_losses(batch)
        loss = losses.sum() / (batch["labels"] != -100).sum().clamp_min(1)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["src_langs"]))
        return loss

    # ------------------------------------------------------------------ generation
    def decoder_prefix(self, tgt_langs: Sequence[str], device: torch.device) -> torch.Tensor:
        """``[start]`` or ``[start, <tgt-lang token>]`` per example (the forced language token)."""
        config = self.adapted.model.generation_config
        start = config.decoder_start_token_id
        if start is None:
            start = self.adapted.model.config.decoder_start_token_id
        rows = []
        for lang in tgt_langs:
            tag = self.format.lang_id(lang) if self.format is not None else None
            rows.append([start] if tag is None else [start, tag])
        return torch.tensor(rows, dtype=torch.long, device=device)

    @torch.no_grad()
    def generate_ids(self, batch: Mapping[str, Any], **kwargs: Any) -> torch.Tensor:
        """Generated ids after the prefix, each example with its own modules."""
        enc, dec = self.setups(batch["src_langs"], batch["tgt_langs"])
        prefix = self.decoder_prefix(batch["tgt_langs"], batch["input_ids"].device)
        options = {"max_new_tokens": self.hparams.max_new_tokens, "num_beams": self.hparams.num_beams,
                   "do_sample": False, **kwargs}
        out = self.adapted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    decoder_input_ids=prefix, adapters=enc, decoder_adapters=dec, **options)
        return out[:, prefix.shape[1]:]

    def translate(self, batch: Mapping[str, Any], **kwargs: Any) -> list[str]:
        """Detokenised translations of a batch."""
        if self.adapted.tokenizer is None:
            raise XlpeftValueError("translate needs the backbone's tokenizer; got a backbone without one")
        ids = self.generate_ids(batch, **kwargs)
        return [t.strip() for t in self.adapted.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        losses = self.token_losses(batch)
        per_example = torch.stack([losses.sum(1), (batch["labels"] != -100).sum(1).to(losses.dtype)], 1)
        hyps = self.translate(batch)  # decoding reads the generated ids on the host anyway
        refs = batch["references"]
        directions = [f"{s}-{t}" for s, t in zip(batch["src_langs"], batch["tgt_langs"])]
        for direction, rows, index in group_rows(directions, losses.device, host=True):
            metrics = self.scores[direction]
            metrics["bleu"].update([hyps[i] for i in index], [[refs[i]] for i in index])
            metrics["chrf"].update([hyps[i] for i in index], [[refs[i]] for i in index])
            part = per_example if rows is None else per_example.index_select(0, rows)
            metrics["loss"].update(torch.cat([part.sum(0), part.new_full((1,), len(index))]))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self.results = {}
        for direction, values in self.scores.compute().items():  # synced across ranks
            loss, tokens, examples = values["loss"].tolist()
            if examples:
                self.results[direction] = {"bleu": 100 * float(values["bleu"]), "chrf": 100 * float(values["chrf"]),
                                           "loss": loss / max(1.0, tokens), "examples": int(examples)}
        stage = "test" if self._trainer is not None and self.trainer.testing else "val"
        for direction, row in self.results.items():
            for key in ("bleu", "chrf", "loss"):
                self.log(f"{stage}/{direction}/{key}", row[key])

    on_test_epoch_end = on_validation_epoch_end

    def on_train_end(self) -> None:
        """Write the whole backbone (for a base model trained here) when ``export_model`` is set."""
        target = self.hparams.export_model
        if target and (self._trainer is None or self.trainer.is_global_zero):
            self.export_model(target)

    def export_model(self, directory: str | Path) -> Path:
        """Save the backbone (+ tokenizer) as a HF folder a later job loads as ``backbone``."""
        path = Path(directory)
        self.adapted.model.save_pretrained(str(path))
        if self.adapted.tokenizer is not None:
            self.adapted.tokenizer.save_pretrained(str(path))
        return path


def direction_metrics() -> dict[str, Any]:
    """One direction's metrics: corpus BLEU and chrF states, summed loss / tokens / examples."""
    from torchmetrics.text import CHRFScore, SacreBLEUScore

    return {"bleu": SacreBLEUScore(), "chrf": CHRFScore(), "loss": Sums(3)}


def score_outputs(outputs: Mapping[str, list[tuple[str, str, float, int]]]) -> dict[str, dict[str, float]]:
    """BLEU, chrF (torchmetrics SacreBLEUScore / CHRFScore, ×100) and loss per direction."""
    from torchmetrics.text import CHRFScore, SacreBLEUScore

    out = {}
    for direction, rows in sorted(outputs.items()):
        hyps, refs = [r[0] for r in rows], [[r[1]] for r in rows]
        tokens = max(1, sum(r[3] for r in rows))
        out[direction] = {"bleu": 100 * float(SacreBLEUScore()(hyps, refs)),
                          "chrf": 100 * float(CHRFScore()(hyps, refs)),
                          "loss": sum(r[2] for r in rows) / tokens, "examples": len(rows)}
    return out
