"""Load a backbone (and its tokenizer) by hub name or local folder, with xlpeft errors.

A thin layer over ``AutoConfig`` + the Auto class of the requested head: it
names heads the way xlpeft's jobs do, checks the head fits the model type before
loading weights, and turns transformers' ``OSError``s about missing files or
network into one ``XlpeftValueError`` that says what was expected.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from xlpeft.errors import XlpeftValueError, unknown

__all__ = ["HEADS", "load_backbone"]

log = logging.getLogger(__name__)

HEADS: dict[str, str] = {
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "causal-lm": "AutoModelForCausalLM",
}
"""xlpeft head name → transformers Auto class name."""

# Keyword arguments about *where* files come from: they go to config, model and tokenizer.
_HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download", "proxies",
               "subfolder", "trust_remote_code")

# Files whose presence shows a local folder carries a tokenizer (AutoTokenizer would
# otherwise build an empty default one from config.json alone).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "sentencepiece.model", "source.spm", "tokenizer.model")

_WHERE = ("it must be a local Hugging Face model folder (config.json + weights) or a hub model name "
          "reachable from here (network, or already in the HF cache when offline)")


def _local_folder(name_or_path: str | os.PathLike[str]) -> Path | None:
    """The folder ``name_or_path`` names, ``None`` for a hub name; raises if a path is clearly wrong."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    looks_local = (
        isinstance(name_or_path, os.PathLike) or path.is_absolute() or text.startswith((".", "~"))
        or text.count("/") > 1 or os.sep != "/" and os.sep in text
    )
    if not path.exists():
        if looks_local:
            raise XlpeftValueError(f"no folder at {text!r}; {_WHERE}")
        return None
    if not path.is_dir() or not (path / "config.json").is_file():
        raise XlpeftValueError(f"{text!r} is not a model folder (no config.json in it); {_WHERE}")
    return path


def _auto_class(head: str, config: Any) -> Any:
    """The Auto class for ``head``, checked against ``config``'s type before any weights load."""
    auto = getattr(transformers, HEADS[head])
    if type(config) in auto._model_mapping:
        return auto
    if head == "base" and type(config) in transformers.AutoModelForSeq2SeqLM._model_mapping:
        return transformers.AutoModelForSeq2SeqLM  # e.g. EncoderDecoderModel: no bare class
    fits = [h for h, name in HEADS.items() if type(config) in getattr(transformers, name)._model_mapping]
    raise XlpeftValueError(
        f"head {head!r} is not available for model_type {config.model_type!r}; it can be "
        f"{', '.join(repr(h) for h in fits) or '(none)'}"
    )


def _tokenizer(name: str, folder: Path | None, hub: dict[str, Any]) -> Any | None:
    if folder is not None and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(name, **hub)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, ImportError) as err:
        log.warning("no tokenizer loaded for %r: %s", name, err)
        return None


def load_backbone(
    name_or_path: str | os.PathLike[str], head: str = "base", *, tokenizer: bool = True, **kwargs: Any
) -> tuple[nn.Module, Any | None]:
    """Load ``(model, tokenizer_or_None)`` from a hub name or a local folder.

    ``head`` is one of ``HEADS``. ``kwargs`` go to the Auto class's
    ``from_pretrained`` (``dtype=``, ``attn_implementation=``, ``num_labels=`` …);
    hub arguments such as ``revision`` or ``local_files_only`` also reach the
    tokenizer. The tokenizer is ``None`` when the folder has none (or
    ``tokenizer=False``).
    """
    if head not in HEADS:
        raise unknown("head", head, HEADS)
    folder = _local_folder(name_or_path)
    name = os.fspath(folder) if folder is not None else os.fspath(name_or_path)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config = transformers.AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as err:
        raise XlpeftValueError(f"cannot load the config of {name!r}; {_WHERE}. Cause: {err}") from err
    auto = _auto_class(head, config)
    try:
        model = auto.from_pretrained(name, **kwargs)
    except OSError as err:
        raise XlpeftValueError(f"cannot load the weights of {name!r}; {_WHERE}. Cause: {err}") from err
    return model, (_tokenizer(name, folder, hub) if tokenizer else None)
