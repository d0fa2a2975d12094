"""A bert2bert ``EncoderDecoderModel`` warm-started from one encoder folder.

Rothe et al. 2020, "Leveraging Pre-trained Checkpoints for Sequence
Generation Tasks" (TACL): encoder and decoder both start from a pretrained
BERT-like encoder; only the decoder's cross-attention is new.

    encoder folder ──► encoder  (copy)
                   └─► decoder  (copy, is_decoder, add_cross_attention: new, random)
                        └─► LM head tied to the (shared) word embeddings

No pretrained seq2seq weights ship in any package xlpeft can install, so this
is the embedded default translation backbone (from the embedded e5 encoder).
The decoder's LM head is tied to the decoder's word embeddings (a copy of
the encoder's); with a 250k-piece vocabulary trim it first (``trim.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from xlpeft.backbones.loading import quiet_load_report
from xlpeft.errors import XlpeftValueError

__all__ = ["is_encoder_only", "warm_start_bert2bert"]


def is_encoder_only(name_or_path: str | Path) -> bool:
    """Whether a folder holds an encoder-only BERT-like model (not a seq2seq one)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(name_or_path))
    return not getattr(config, "is_encoder_decoder", False) and config.model_type in ("bert", "xlm-roberta",
                                                                                      "roberta", "electra")


def warm_start_bert2bert(encoder_path: str | Path, decoder_layers: int | None = None,
                         encoder_layers: int | None = None, seed: int = 0) -> tuple[nn.Module, Any]:
    """``(EncoderDecoderModel, tokenizer)`` with both sides copied from ``encoder_path``.

    ``encoder_layers`` / ``decoder_layers`` keep at most the first N layers of
    each side (a CPU-sized model; a shallow decoder as in deep-encoder/shallow-decoder
    NMT); ``None`` keeps them all. Cross-attention is initialised with ``seed``
    so two warm starts are identical.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertLMHeadModel, EncoderDecoderModel

    path = str(encoder_path)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "is_encoder_decoder", False):
        raise XlpeftValueError(
            f"warm start needs an encoder-only model folder; {path!r} is already a {config.model_type} "
            "encoder-decoder. Load it directly with head='seq2seq'"
        )
    for name, value in (("decoder_layers", decoder_layers), ("encoder_layers", encoder_layers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise XlpeftValueError(f"`{name}` can be a positive int (at most this many layers) or None; got {value!r}")
    have = config.num_hidden_layers
    with quiet_load_report():  # the dropped layers and MLM head are unused on purpose
        encoder = AutoModel.from_pretrained(path, add_pooling_layer=False,
                                            num_hidden_layers=min(encoder_layers or have, have))
    dec_config = AutoConfig.from_pretrained(path, is_decoder=True, add_cross_attention=True,
                                            num_hidden_layers=min(decoder_layers or have, have))
    torch.manual_seed(seed)
    decoder = BertLMHeadModel(dec_config)
    _copy_decoder(encoder, decoder, path)
    model = EncoderDecoderModel(encoder=encoder, decoder=decoder)
    decoder.tie_weights()  # LM head = the decoder's own copy of the word embeddings
    tokenizer = AutoTokenizer.from_pretrained(path)
    _set_special_ids(model, tokenizer)
    return model.eval(), tokenizer


def _copy_decoder(encoder: nn.Module, decoder: nn.Module, path: str) -> None:
    """Encoder weights into the decoder (self-attention, FFN, embeddings); MLM head if present."""
    own = decoder.bert.state_dict()
    missing = own.keys() - {k for k in encoder.state_dict() if k in own}
    decoder.bert.load_state_dict({k: v for k, v in encoder.state_dict().items() if k in own}, strict=False)
    new = sorted(k for k in missing if "crossattention" not in k)
    if new:
        raise XlpeftValueError(f"{path}: the encoder lacks decoder weights {new[:4]}; is it a BERT-like model?")
    _copy_mlm_head(decoder, path)


def _copy_mlm_head(decoder: nn.Module, path: str) -> None:
    from safetensors import safe_open

    files = list(Path(path).glob("*.safetensors"))
    if not files:
        return
    head = {k: v for k, v in decoder.cls.state_dict().items() if not k.endswith("decoder.weight")}
    with safe_open(str(files[0]), "pt") as fh:
        found = {k: fh.get_tensor(f"cls.{k}") for k in head if f"cls.{k}" in fh.keys()}
    decoder.cls.load_state_dict(found, strict=False)


def _set_special_ids(model: nn.Module, tokenizer: Any) -> None:
    """Decoder starts from CLS/BOS, stops at SEP/EOS; pad is the encoder's pad."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = start
        config.bos_token_id = start
        config.eos_token_id = end
        config.pad_token_id = tokenizer.pad_token_id
    model.config.decoder.eos_token_id = end
    model.config.tie_word_embeddings = True
