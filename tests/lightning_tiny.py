"""A tiny BERT masked-LM backbone *folder* (model + matching tokenizer) for the Lightning tests.

The Lightning modules load their backbone by path, so the tests save a tiny
random ``BertForMaskedLM`` (vocab 128) next to a WordPiece tokenizer whose
vocabulary has exactly 128 entries: specials, letters (word-initial and ``##``
continuation) and the commonest words of the English/Swahili Bible, so real
corpus text tokenizes without ``[UNK]`` floods. Shared by the Lightning test
files and ``ddp_worker.py``.
"""

from __future__ import annotations

import string
from pathlib import Path

import lightning as L
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

VOCAB = 128
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "and", "of", "to", "that", "in", "he", "shall", "unto", "for", "i", "his", "a",
         "lord", "they", "be", "is", "him", "not", "them", "it", "with", "all", "thou", "na", "ya",
         "wa", "kwa", "mungu", "za", "katika", "la", "hapo", "nchi", "maji", "juu", "uso"]


def tiny_vocab() -> list[str]:
    """128 tokens: specials, punctuation, letters, ``##`` letters, frequent words."""
    letters = list(string.ascii_lowercase)
    vocab = SPECIAL + list(".,;:!?'\"()-") + letters + [f"##{c}" for c in letters] + list("0123456789")
    vocab += [w for w in WORDS if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(VOCAB - len(vocab))]
    if len(vocab) != VOCAB:
        raise RuntimeError(f"tiny vocab has {len(vocab)} entries; expected {VOCAB}")
    return vocab


def tiny_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer with exactly ``VOCAB`` ids."""
    vocab = {w: i for i, w in enumerate(tiny_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def save_tiny_backbone(path: str | Path, hidden: int = 32, ffn: int | None = None, seed: int = 0) -> Path:
    """Save a tiny random ``BertForMaskedLM`` + its tokenizer into ``path``; returns it."""
    path = Path(path)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=ffn or 2 * hidden, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer = tiny_bert_tokenizer()
    if len(tokenizer) != config.vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} ids, model {config.vocab_size}")
    tokenizer.save_pretrained(path)
    return path


def tiny_trainer(max_steps: int, **kwargs: object) -> L.Trainer:
    """A quiet CPU Trainer (no logger, bar, summary or checkpoints unless asked)."""
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0)
    options.update(kwargs)
    return L.Trainer(**options)


def perturb(module: torch.nn.Module, prefixes: tuple[str, ...], scale: float = 0.1, seed: int = 0) -> None:
    """Add noise to parameters whose names start with ``prefixes`` (non-identity adapters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(prefixes):
                param.add_(torch.randn(param.shape, generator=gen) * scale)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every state-dict tensor."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    """State-dict keys whose tensors differ from ``before`` (bit for bit)."""
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def write_bible_files(folder: Path, langs: list[str], lines: int = 40) -> dict[str, str]:
    """``lines`` real Bible lines per language as text files (the same verses in each)."""
    from xlpeft.data.corpora import corpus_text

    files = {}
    for lang in langs:
        files[lang] = str(folder / f"{lang}.txt")
        Path(files[lang]).write_text("\n".join(corpus_text(lang, max_lines=lines)) + "\n", encoding="utf-8")
    return files


class Killed(Exception):
    """Stands for the process dying."""


class KillAt(L.Callback):
    """Dies at the start of the batch after ``step`` (its checkpoint is written by then).

    ``error`` is what "dying" raises: ``Killed`` in one process, ``SystemExit`` in a DDP worker.
    """

    def __init__(self, step: int, error: type[BaseException] = Killed) -> None:
        self.step = step
        self.error = error

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise self.error(f"killed after step {self.step}")
