"""Tiny random backbones of every supported family, built from configs (no downloads).

Shared by the whole test suite: ``tiny_model(family, head)`` gives a fresh,
seeded model in eval mode and ``tiny_batch(model)`` valid inputs for it (with
padding, and a decoder side shorter than the encoder side so that tests can
tell the two stacks apart by shape); ``tiny_tokenizer()`` a WordPiece tokenizer.

Attention runs through transformers' default ``sdpa`` implementation: it is what
users get, and on CPU in eval mode it is deterministic, so equivalence tests stay
exact without falling back to ``eager``.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    EncoderDecoderConfig,
    EncoderDecoderModel,
    M2M100Config,
    MarianConfig,
    MBartConfig,
    MT5Config,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    XLMRobertaConfig,
)

HIDDEN = 32
VOCAB = 128
LAYERS = 2
HEADS = 4
FFN = 64

ENCODER_FAMILIES = ["bert", "xlm-roberta"]
SEQ2SEQ_FAMILIES = ["t5", "mt5", "mbart", "m2m_100", "marian", "encoder-decoder"]
ALL_FAMILIES = ENCODER_FAMILIES + SEQ2SEQ_FAMILIES

ENCODER_HEADS = ["base", "masked-lm", "seq-cls", "token-cls"]
SEQ2SEQ_HEADS = ["base", "seq2seq"]

_AUTO = {
    "base": AutoModel,
    "masked-lm": AutoModelForMaskedLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}


def heads_for(family: str) -> list[str]:
    """Heads a family supports in the tiny zoo."""
    return ENCODER_HEADS if family in ENCODER_FAMILIES else SEQ2SEQ_HEADS


def family_heads() -> list[tuple[str, str]]:
    """Every (family, head) pair, for parametrisation."""
    return [(f, h) for f in ALL_FAMILIES for h in heads_for(f)]


def _bert_config(**extra: object) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, pad_token_id=0, **extra,
    )


def _bart_like(cls: type[PretrainedConfig], **extra: object) -> PretrainedConfig:
    return cls(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
        encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, max_position_embeddings=64, **extra,
    )


def _t5_like(cls: type[PretrainedConfig], **extra: object) -> PretrainedConfig:
    return cls(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
        num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **extra,
    )


def tiny_config(family: str) -> PretrainedConfig:
    """The config of a tiny random backbone of ``family``."""
    if family == "bert":
        return _bert_config()
    if family == "xlm-roberta":
        return XLMRobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            intermediate_size=FFN, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        )
    if family == "t5":
        return _t5_like(T5Config, feed_forward_proj="relu")
    if family == "mt5":
        return _t5_like(MT5Config, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    if family == "mbart":
        return _bart_like(MBartConfig, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    if family == "m2m_100":
        return _bart_like(M2M100Config, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    if family == "marian":
        return _bart_like(
            MarianConfig, decoder_vocab_size=VOCAB, pad_token_id=VOCAB - 1, eos_token_id=0,
            decoder_start_token_id=VOCAB - 1,
        )
    if family == "encoder-decoder":
        config = EncoderDecoderConfig.from_encoder_decoder_configs(
            _bert_config(), _bert_config(is_decoder=True, add_cross_attention=True)
        )
        config.pad_token_id = 0
        config.decoder_start_token_id = 2
        return config
    raise KeyError(f"no tiny config for family {family!r}; known: {', '.join(ALL_FAMILIES)}")


def tiny_model(family: str, head: str = "base") -> nn.Module:
    """A fresh tiny random ``family`` model with ``head``, seeded and in eval mode."""
    if head not in heads_for(family):
        raise KeyError(f"family {family!r} has heads {heads_for(family)}; got {head!r}")
    config = tiny_config(family)
    torch.manual_seed(0)
    if family == "encoder-decoder":  # AutoModel has no mapping for EncoderDecoderConfig
        model = EncoderDecoderModel(config=config)
    else:
        if head in ("seq-cls", "token-cls"):
            config.num_labels = 3
        model = _AUTO[head].from_config(config)
    return model.eval()


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def tiny_batch(model: nn.Module, batch: int = 4, seq: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid inputs for ``model``: random ids, padding at the end of some rows, and
    ``decoder_input_ids`` (length ``seq - 2``) when the model is an encoder-decoder."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().num_embeddings
    pad = _pad_id(model)
    ids = torch.randint(4, vocab - 1, (batch, seq), generator=gen)
    lengths = torch.tensor([seq - (i % 3) for i in range(batch)])  # rows 1, 2 … padded
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    out = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "is_encoder_decoder", False):
        out["decoder_input_ids"] = torch.randint(4, vocab - 1, (batch, max(seq - 2, 1)), generator=gen)
    return out


TOKENIZER_WORDS = ["hello", "world", "the", "a", "book", "read", "##s", "##ing", "habari", "ya", "dunia", "kitabu"]


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A small BERT-style WordPiece tokenizer (ids < ``VOCAB``), built offline with ``tokenizers``."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + TOKENIZER_WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )


def default_head(family: str) -> str:
    """The LM head a family is usually tested with."""
    return "masked-lm" if family in ENCODER_FAMILIES else "seq2seq"


def main_output(out) -> torch.Tensor:
    """The output every head has: logits, else the last hidden state."""
    return out["logits"] if "logits" in out else out["last_hidden_state"]


@torch.no_grad()
def run(model, batch: dict, **kw) -> torch.Tensor:
    """``main_output`` of one no-grad forward."""
    return main_output(model(**batch, **kw))


@torch.no_grad()
def perturb(am, name: str, scale: float = 0.3, seed: int = 0) -> None:
    """Make every parameter of adapter ``name`` non-identity (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    for module in am.adapter_modules(name):
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
