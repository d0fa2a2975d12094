"""Vocabulary trimming: keep only the pieces a corpus uses.

A multilingual backbone spends most of its parameters on embedding rows for
250k pieces; a language adapter trained on one language's text touches a few
thousand. ``trim_vocabulary`` tokenises the texts, keeps the special tokens,
every piece used (at least ``min_count`` times) and ``keep_ids``, and writes a
new HF folder whose Unigram tokenizer holds only those pieces (renumbered in
their old order, scores kept) and whose embedding rows, LM output rows (tied or
not) and vocabulary-sized logit biases are gathered to match. ``xlpeft_trim.json``
records the old→new id map.

Why tokenisation is unchanged (``min_count=1``): Unigram picks the best-scoring
segmentation; the old best one uses only kept pieces, and a subset has no better
one. Unknown characters cost ``min(score) - 10``, so the lowest-scoring piece is
always kept to leave that penalty as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xlpeft.errors import XlpeftValueError

__all__ = ["TRIM_FILE", "count_ids", "load_id_map", "trim_vocabulary"]

log = logging.getLogger(__name__)

TRIM_FILE = "xlpeft_trim.json"
_BATCH = 1024
_CONFIG_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id", "decoder_start_token_id")


def trim_vocabulary(model_dir: str | Path, texts: Iterable[str], out_dir: str | Path,
                    min_count: int = 1, keep_ids: Iterable[int] = ()) -> Path:
    """Write a copy of ``model_dir`` whose vocabulary is what ``texts`` use; return ``out_dir``."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir, out_dir = _source_dir(model_dir), Path(out_dir)
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise XlpeftValueError(f"`min_count` can be an int >= 1; got {min_count!r}")
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    log.info("trimming the vocabulary of %s to the pieces the texts use", model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    spec = _unigram_spec(tok, model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    counts = count_ids(tok, texts, len(spec["model"]["vocab"]))
    kept = _kept_ids(spec, tok, config, counts, min_count, keep_ids)
    old_to_new = {int(old): new for new, old in enumerate(kept)}
    tmp = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.tmp")
    try:
        _save_model(model_dir, kept, old_to_new, tmp)
        _save_tokenizer(tok, _trimmed_spec(spec, kept, old_to_new), tmp)
        _write_record(tmp, model_dir, kept, old_to_new, min_count, counts)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("vocabulary trimmed: %d → %d rows, written to %s", len(counts), len(kept), out_dir)
    return out_dir


def load_id_map(trimmed_dir: str | Path) -> dict[int, int]:
    """The old→new id map saved by ``trim_vocabulary``."""
    record = json.loads((Path(trimmed_dir) / TRIM_FILE).read_text(encoding="utf-8"))
    return {int(k): v for k, v in record["old_to_new"].items()}


def _source_dir(model_dir: str | Path) -> Path:
    from xlpeft.backbones.embedded import EMBEDDED_BACKBONE, embedded_backbone_path

    if str(model_dir) == EMBEDDED_BACKBONE:
        return embedded_backbone_path()
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise XlpeftValueError(f"`model_dir` can be a HF model folder with config.json or "
                               f"{EMBEDDED_BACKBONE!r}; got {os.fspath(model_dir)!r}")
    return path


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a non-empty folder that is not an earlier trim output."""
    if out_dir.is_file() or (out_dir.is_dir() and any(out_dir.iterdir())
                             and not (out_dir / TRIM_FILE).is_file()):
        raise XlpeftValueError(
            f"`out_dir` can be a new folder, an empty one or an earlier trim output; got "
            f"{out_dir}, which holds other files. Choose another path or empty it.")


def _unigram_spec(tok: Any, model_dir: Path) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    kind = spec.get("model", {}).get("type")
    if kind != "Unigram":
        raise XlpeftValueError(
            f"the tokenizer model can be Unigram (SentencePiece: XLM-R, mT5, mBART …); got "
            f"{kind or type(tok).__name__} in {model_dir}. Trimming other models is not supported.")
    n = len(spec["model"]["vocab"])
    outside = [t["content"] for t in spec.get("added_tokens", []) if t["id"] >= n]
    if outside:
        raise XlpeftValueError(
            f"added tokens can be pieces of the Unigram vocabulary (ids < {n}); got "
            f"{outside[:5]} beyond it in {model_dir}. Trimming such tokenizers is not supported.")
    return spec


def count_ids(tok: Any, texts: Iterable[str], vocab_size: int) -> np.ndarray:
    """How often each id occurs when ``tok`` encodes ``texts`` (special tokens included)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in _batches(texts):
        ids = tok.backend_tokenizer.encode_batch(batch, add_special_tokens=True)
        flat = np.fromiter((i for enc in ids for i in enc.ids), dtype=np.int64)
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    if isinstance(texts, str):
        raise XlpeftValueError("`texts` can be an iterable of strings; got one str. Wrap it: [text]")
    it = iter(texts)
    while batch := list(islice(it, _BATCH)):
        bad = next((t for t in batch if not isinstance(t, str)), None)
        if bad is not None:
            raise XlpeftValueError(f"`texts` can hold str only; got {type(bad).__name__}")
        yield batch


def _kept_ids(spec: dict, tok: Any, config: Any, counts: np.ndarray, min_count: int,
              keep_ids: Iterable[int]) -> np.ndarray:
    """Sorted old ids to keep: specials, used pieces, ``keep_ids``, the min-score piece."""
    n = len(counts)
    extra = [int(i) for i in keep_ids]
    bad = [i for i in extra if not 0 <= i < n]
    if bad:
        raise XlpeftValueError(f"`keep_ids` can hold ids in [0, {n}); got {bad[:5]}")
    model = spec["model"]
    scores = np.array([s for _, s in model["vocab"]], dtype=np.float64)
    keep = (counts >= min_count)
    keep[extra] = True
    keep[[t["id"] for t in spec.get("added_tokens", [])]] = True
    keep[[i for i in _config_ids(config) + list(tok.all_special_ids) if 0 <= i < n]] = True
    keep[int(np.argmin(scores))] = True  # keeps the unknown-character penalty unchanged
    if model.get("unk_id") is not None:
        keep[model["unk_id"]] = True
    if model.get("byte_fallback"):
        keep[[i for i, (p, _) in enumerate(model["vocab"]) if p.startswith("<0x")]] = True
    return np.flatnonzero(keep)


def _config_ids(config: Any) -> list[int]:
    out: list[int] = []
    for name in _CONFIG_IDS:
        value = getattr(config, name, None)
        out += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
    return out


def _trimmed_spec(spec: dict, kept: np.ndarray, old_to_new: dict[int, int]) -> dict:
    """The tokenizer JSON (changed in place) with only the kept pieces and every id renumbered."""
    model = spec["model"]
    model["vocab"] = [model["vocab"][i] for i in kept.tolist()]
    if model.get("unk_id") is not None:
        model["unk_id"] = old_to_new[model["unk_id"]]
    spec["added_tokens"] = [{**t, "id": old_to_new[t["id"]]} for t in spec.get("added_tokens", [])]
    if isinstance(spec.get("padding"), dict) and spec["padding"].get("pad_id") in old_to_new:
        spec["padding"]["pad_id"] = old_to_new[spec["padding"]["pad_id"]]
    spec["post_processor"] = _remap_processor(spec.get("post_processor"), old_to_new)
    return spec


def _remap_processor(proc: Any, old_to_new: dict[int, int]) -> Any:
    """Renumber the special-token ids inside a post-processor (Template, Roberta, Bert, Sequence)."""
    if not isinstance(proc, dict):
        return proc
    kind = proc.get("type")
    if kind == "Sequence":
        proc["processors"] = [_remap_processor(p, old_to_new) for p in proc["processors"]]
    elif kind == "TemplateProcessing":
        for special in proc.get("special_tokens", {}).values():
            special["ids"] = [old_to_new[i] for i in special["ids"]]
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            proc[key] = [proc[key][0], old_to_new[proc[key][1]]]
    return proc


def _save_tokenizer(tok: Any, spec: dict, out_dir: Path) -> None:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(json.dumps(spec))
    special = {k: str(v) for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    new = type(tok)(tokenizer_object=backend, model_max_length=tok.model_max_length, **special)
    new.save_pretrained(str(out_dir))


def _save_model(model_dir: Path, kept: np.ndarray, old_to_new: dict[int, int], out_dir: Path) -> None:
    """Gather every vocabulary-sized tensor, load it into a fresh smaller model, save.

    Done on the state dict rather than with ``resize_token_embeddings``, which in
    transformers 5 ties an untied BERT decoder bias and so loses it on save.
    """
    model = _load_model(model_dir)
    rows = model.get_input_embeddings().num_embeddings
    if int(kept[-1]) >= rows:
        raise XlpeftValueError(
            f"the tokenizer ids can be below the model's {rows} embedding rows; got "
            f"{int(kept[-1])} in {model_dir}. Tokenizer and weights do not belong together.")
    index = torch.as_tensor(kept, dtype=torch.long)
    axes = _vocab_axes(model, rows)
    state = {k: v.index_select(axes[k], index) if k in axes else v for k, v in model.state_dict().items()}
    config = model.config
    config.vocab_size = len(kept)
    _remap_config(config, old_to_new)
    smaller = type(model)(config).to(model.dtype)
    smaller.load_state_dict(state, strict=True)
    smaller.tie_weights()
    smaller.save_pretrained(str(out_dir))


def _vocab_axes(model: Any, rows: int) -> dict[str, int]:
    """State-dict keys indexed by token id, with the axis: embedding rows, LM output rows, logit biases."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    row_params = {id(emb.weight)} | ({id(out.weight)} if out is not None else set())
    axes = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in row_params:
            axes[name] = 0
        elif name.endswith("bias") and tensor.dim() >= 1 and tensor.shape[-1] == rows:
            axes[name] = tensor.dim() - 1
    return axes


def _load_model(model_dir: Path) -> Any:
    """The folder's own architecture (so an MLM head travels along), else the bare model."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    return (cls or transformers.AutoModel).from_pretrained(model_dir)


def _remap_config(config: Any, old_to_new: dict[int, int]) -> None:
    for name in _CONFIG_IDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, old_to_new[value])
        elif isinstance(value, list):
            setattr(config, name, [old_to_new[v] for v in value])


def _write_record(out_dir: Path, model_dir: Path, kept: np.ndarray, old_to_new: dict[int, int],
                  min_count: int, counts: np.ndarray) -> None:
    parent = model_dir / "xlpeft_source.json"
    record = {
        "source": os.fspath(model_dir.resolve()), "min_count": min_count,
        "old_vocab_size": int(len(counts)), "new_vocab_size": int(len(kept)),
        "tokens_counted": int(counts.sum()),
        "parent_source": json.loads(parent.read_text(encoding="utf-8")) if parent.is_file() else None,
        "old_to_new": {str(k): v for k, v in old_to_new.items()},
    }
    (out_dir / TRIM_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder into place, swapping out an earlier trim output."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out_dir)
        return
    except OSError:
        pass
    stale = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
    os.rename(out_dir, stale)
    os.rename(tmp, out_dir)
    shutil.rmtree(stale, ignore_errors=True)
