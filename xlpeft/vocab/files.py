"""A new-script language's vocabulary as a directory, written atomically, never pickled.

    <dir>/vocabulary_config.json        language, NewVocabConfig, sizes, backbone identity
         /sentencepiece.model           the SentencePiece model (tokenise the language anywhere)
         /vocabulary.safetensors        F, bias (+ shared rows), μ, G, the piece → id map

μ and G are stored, not recomputed: an eigendecomposition may flip signs on
another machine, and F only means something against the exact G it trained
with. Loading checks the backbone (family, width, depth, vocabulary), builds
the tokenizer and the embeddings aside, and only then attaches them, so a
failed load leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from xlpeft.errors import CorruptFileError, IncompatibleAdapterError, XlpeftTypeError, XlpeftValueError, unknown
from xlpeft.methods.base import short
from xlpeft.ops.artefacts import ArtefactKind
from xlpeft.ops.files import check_compatible, read_config, write_directory
from xlpeft.ops.weights import open_weights
from xlpeft.vocab.embeddings import NewVocabConfig, NewVocabulary, VocabularySwitch, build_vocabulary
from xlpeft.vocab.tokenizers import NewVocabTokenizer

CONFIG_FILE = "vocabulary_config.json"
MODEL_FILE = "sentencepiece.model"
WEIGHTS_FILE = "vocabulary.safetensors"
FORMAT = 2  # 2: sha256 checksums in the weights' header (1 still loads, with a warning)
ID_MAP = "piece_to_id"  # piece index -> extended id; the rest of the file is the NewVocabulary's state
INTEGER_TENSORS = {ID_MAP: "I64", "shared_ids": "I64", "slot_of_old": "I64", "keep_old": "BOOL"}
"""The vocabulary's non-float tensors and their one allowed dtype (everything else is float)."""
VOCABULARY = ArtefactKind("vocabulary", CONFIG_FILE, (CONFIG_FILE, MODEL_FILE, WEIGHTS_FILE),
                          lambda m: isinstance(m, dict) and m.get("kind") == "new-vocabulary")


def _adapted(obj: Any) -> Any:
    """The ``AdaptedModel`` behind a switch, a LightningModule (``.adapted``) or the model itself."""
    if isinstance(obj, VocabularySwitch):
        return obj.adapted
    inner = getattr(obj, "adapted", None)
    if inner is not None:
        return inner
    if hasattr(obj, "backbone_info"):
        return obj
    raise XlpeftTypeError(f"`model` can be a VocabularySwitch, an AdaptedModel or a LightningModule with "
                          f"`.adapted`; got {type(obj).__name__}")


def _switch(obj: Any) -> VocabularySwitch | None:
    if isinstance(obj, VocabularySwitch):
        return obj
    own = getattr(obj, "new_vocab", None)
    return own if isinstance(own, VocabularySwitch) else VocabularySwitch.of(_adapted(obj))


def save_vocabulary(switch_or_model: Any, lang: str, path: str | os.PathLike) -> Path:
    """Write ``lang``'s new vocabulary (tokenizer + embeddings) as a directory at ``path``."""
    switch = _switch(switch_or_model)
    if switch is None or lang not in switch.vocabs:
        raise unknown("new vocabulary", lang, switch.vocabs.keys() if switch else (),
                      "(add it with add_new_vocabulary or the NewScriptEmbeddings callback first)")
    tok = switch.tokenizers.get(lang)
    if tok is None:
        raise XlpeftValueError(f"vocabulary {lang!r} has no tokenizer to save; attach it with "
                               "switch.add(…, tokenizer=…) or add_new_vocabulary")
    vocab: NewVocabulary = switch.vocabs[lang]
    tensors = {k: v.detach().contiguous().cpu() for k, v in vocab.state_dict().items()}
    tensors[ID_MAP] = torch.tensor(tok.to_id, dtype=torch.long)
    meta = {"xlpeft_format": FORMAT, "kind": "new-vocabulary", "language": lang,
            "config": dataclasses.asdict(vocab.config), "num_new": vocab.num_new,
            "old_size": vocab.old_size, "sentencepiece_sha1": hashlib.sha1(tok.model).hexdigest(),
            "backbone": switch.adapted.backbone_info()}
    return write_directory(path, meta, tensors, CONFIG_FILE, WEIGHTS_FILE, extra={MODEL_FILE: tok.model},
                           kind=VOCABULARY)


def load_vocabulary(model_or_switch: Any, path: str | os.PathLike, tokenizer: Any = None,
                    lang: str | None = None, verify: bool = True) -> tuple[VocabularySwitch, NewVocabTokenizer]:
    """Attach the vocabulary saved at ``path``; returns the switch and the language's tokenizer.

    ``tokenizer`` is the backbone's (default: the model's own); the saved id map must match
    what it gives, so a vocabulary never lands on a backbone whose ids mean something else.
    """
    path = Path(path)
    adapted = _adapted(model_or_switch)
    meta = _read_config(path)
    check_compatible({**meta["backbone"], "has_vocab_part": True}, adapted, path, "vocabulary")
    lang = lang or meta.get("language")
    if not isinstance(lang, str) or not lang or len(lang) > 128 or not lang.isprintable():
        raise CorruptFileError(f"{path / CONFIG_FILE}: `language` can be a printable code of 1..128 characters; "
                               f"got {short(lang)}")
    switch = _switch(model_or_switch)
    if switch is not None and lang in switch.vocabs:
        raise XlpeftValueError(f"language {lang!r} already has a new vocabulary; remove({lang!r}) it first "
                               "or load under another name with lang=…")
    model = _read_model_file(path, meta)
    weights = open_weights(path, WEIGHTS_FILE, "vocabulary", int_keys=INTEGER_TENSORS)
    tensors = weights.load(verify, what="vocabulary")  # dtypes checked; data ≤ the file, which exists
    tok = _read_tokenizer(path, meta, model, tensors.pop(ID_MAP, None),
                          tokenizer or getattr(adapted, "tokenizer", None))
    vocab = _build(adapted, tok, meta, tensors, path)
    switch = switch or VocabularySwitch(adapted)  # hooks go on only once everything is read
    switch.put(lang, vocab, tok)
    return switch, tok


def _read_config(path: Path) -> dict[str, Any]:
    meta = read_config(path, CONFIG_FILE, "vocabulary")
    file = path / CONFIG_FILE
    if not (isinstance(meta, dict) and meta.get("kind") == "new-vocabulary"
            and isinstance(meta.get("backbone"), dict)):
        raise CorruptFileError(f"{file} is not a new-vocabulary config (no kind/backbone); save it again")
    if type(meta.get("xlpeft_format")) is not int or not 1 <= meta["xlpeft_format"] <= FORMAT:
        raise IncompatibleAdapterError(f"`xlpeft_format` can be 1..{FORMAT} for this xlpeft; got "
                                       f"{meta.get('xlpeft_format')!r} in {file}; upgrade xlpeft to read it")
    return meta


def _read_model_file(path: Path, meta: dict[str, Any]) -> bytes:
    file = path / MODEL_FILE
    if not file.is_file():
        raise XlpeftValueError(f"{path} has no {MODEL_FILE}; the vocabulary directory is incomplete, save it again")
    model = file.read_bytes()
    if hashlib.sha1(model).hexdigest() != meta.get("sentencepiece_sha1"):
        raise CorruptFileError(f"{file} does not match the sha1 in {CONFIG_FILE}; the file is damaged, save it again")
    return model


def _read_tokenizer(path: Path, meta: dict[str, Any], model: bytes, to_id: torch.Tensor | None,
                    base: Any) -> NewVocabTokenizer:
    if base is None:
        raise XlpeftValueError("load_vocabulary needs the backbone's tokenizer; pass tokenizer=… "
                               "(the model has none attached)")
    tok = NewVocabTokenizer(model, base)
    if to_id is None or to_id.dim() != 1 or to_id.tolist() != tok.to_id:
        raise IncompatibleAdapterError(
            f"vocabulary at {path} maps its pieces to other ids than this backbone's tokenizer gives "
            f"(tokenizer size {len(base)}, file {meta.get('old_size')}); load it with the tokenizer it was built on")
    return tok


def _build(adapted: Any, tok: NewVocabTokenizer, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
           path: Path) -> NewVocabulary:
    try:
        if not isinstance(meta.get("config"), dict):
            raise TypeError(f"`config` can be an object; got {short(meta.get('config'))}")
        config = NewVocabConfig(**meta["config"])
    except (TypeError, ValueError) as err:
        raise CorruptFileError(f"{path / CONFIG_FILE} has an invalid `config` ({err}); save it again") from err
    vocab = build_vocabulary(adapted, tok.shared, tok.num_new, config)
    own = vocab.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or extra or wrong:
        raise IncompatibleAdapterError(f"{path / WEIGHTS_FILE} does not fit its config: missing {missing[:5]}, "
                                       f"unexpected {extra[:5]}, shapes (file vs expected) {wrong[:5]}")
    vocab.load_state_dict(tensors)
    return vocab

