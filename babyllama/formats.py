"""llama2.c model files: read and write versions 0 (legacy fp32), 1 (fp32) and 2 (Q8_0), and babyllama's
version 3 (Q4_0 in llama.cpp's block layout, which llama2.c cannot read).

Everything meets in `Weights`: `load` reads a file of up to a quarter of the free memory into process memory
(each tensor an array of its own) and memory-maps larger ones, version 3 files and version 2 ones with groups
of 32 or 64 (whose matrices the native kernels regroup anyway), handing out views of the map
(memory.read_by_default; `--mmap` / `--no-mmap` force either way). Tensors keep their stored type, except
Q8_0 whose groups run across rows, which is dequantized to fp32. Writers take a `Weights` and stream tensors
out. Layouts are documented in docs/formats.md. Every header is checked against the file size before
anything is mapped or read.

babyllama extension (versions 1, 2 and 3; version 0 has no header): the 256-byte header has spare room after
llama2.c's fields. At offset 48 we store float64 rope_theta and at 56 float64 norm_eps; 0 (what llama2.c
writes) means the Llama 2 defaults 10000 and 1e-5, so files stay readable both ways.
"""

from __future__ import annotations

import contextlib
import io
import math
import mmap as _mmap
import os
import struct
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard, cast

import numpy as np

from . import memory, safeio
from .config import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, LIMITS, QUANTIZE_KINDS, ModelArgs, checked_args
from .errors import BabyLlamaError, note
from .quant import BLOCK, BLOCK_BYTES, QUANTIZE_CHUNK_BYTES, BlockTensor, quantize_q4_0, unpacked_q8

MAGIC = 0x616B3432  # "ak42" little-endian
HEADER_V0 = 7 * 4
HEADER_V12 = 256
EXT_OFFSET = 48  # float64 rope_theta, float64 norm_eps
DEFAULT_GROUP_SIZE = 64
PACKED_GROUP_SIZES = (32, 64)  # the Q8 group sizes the native kernels pack (QTensor.packed, kernels.c's W_Q8R)
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class QTensor:
    """A Q8_0 matrix: int8 values (out, in) and one fp32 scale per `group_size` consecutive values.
    `packed`: the same values and scales in the order the native kernels read (kernels.c's W_Q8R), which they
    make on a matrix's first use. Where q and s were process memory they are then let go (keep_packed_only), so
    that memory holds the matrix once, and rebuilt from `packed` (a copy) whenever something reads them."""

    q: np.ndarray  # int8, (out, in)
    s: np.ndarray  # float32, (out, in // group_size)
    group_size: int
    packed: np.ndarray | None = field(default=None, compare=False, repr=False)  # uint8, (out, in + 4 * groups)

    def __getattr__(self, name: str):  # only for what the instance lacks: q and s after keep_packed_only
        packed = self.__dict__.get("packed")
        if name not in ("q", "s") or packed is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        q, s = unpacked_q8(packed, self.shape[1], self.group_size)
        return q if name == "q" else s

    def keep_packed_only(self) -> None:
        """Let q and s go (`packed` must hold them): later reads rebuild them from it."""
        assert self.packed is not None
        del self.q, self.s

    @property
    def plain_kept(self) -> bool:
        """Whether q and s are held as they are (not only in `packed`)."""
        return "q" in self.__dict__

    @property
    def shape(self) -> tuple[int, ...]:
        if self.plain_kept:
            return self.q.shape
        rows, row_bytes = self.packed.shape  # type: ignore[union-attr]  # not kept: packed holds them
        return rows, row_bytes * self.group_size // (self.group_size + 4)

    @property
    def nbytes(self) -> int:
        """Bytes of its values and scales (and of its packed copy, the same bytes in another order)."""
        rows, cols = self.shape
        return rows * (cols + 4 * (cols // self.group_size))

    def dequantize(self) -> np.ndarray:
        out, n = self.q.shape
        g = self.group_size
        return (self.q.reshape(out, n // g, g).astype(np.float32) * self.s[:, :, None]).reshape(out, n)


@dataclass
class BF16Tensor:
    """A (rows, cols) matrix of bfloat16 values (what Hugging Face and Meta checkpoints and BF16 GGUF tensors
    usually hold): `bits` is uint16 (rows, cols), each the top half of the fp32 it stands for. NumPy has no
    bfloat16, so the bits stay integers, never used as numbers: everything that computes reads the values
    through `dequantize` (exact: a 16-bit shift), and the native kernels read the bits as they are (kernels.c's
    W_BF16). A dense matrix like an fp32 or fp16 array, not a quantized one (is_quantized)."""

    bits: np.ndarray

    def __post_init__(self):
        if self.bits.dtype != np.uint16 or self.bits.ndim != 2:
            raise ValueError(f"bfloat16 bits must be a uint16 matrix, not {self.bits.dtype} of shape {self.bits.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.bits.shape

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def dequantize(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The matrix (or the rows selected) as fp32, exactly."""
        return bf16_to_f32(self.bits[rows])


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values given as their uint16 bits, as fp32 (exactly)."""
    return np.left_shift(bits, 16, dtype=np.uint32).view(np.float32)


def to_bf16(w: np.ndarray) -> BF16Tensor:
    """An fp32 matrix rounded to bfloat16 as PyTorch rounds (to nearest, ties to even; a NaN stays a quiet NaN),
    a few MiB of rows at a time."""
    out = np.empty(w.shape, dtype=np.uint16)
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * max(1, w.shape[1])))
    for r in range(0, w.shape[0], step):
        u = np.ascontiguousarray(w[r:r + step], dtype=np.float32).view(np.uint32)
        rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16  # carries into the exponent
        out[r:r + step] = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x0040, rounded)
    return BF16Tensor(out)


def to_f16(w: np.ndarray) -> np.ndarray:
    """An fp32 matrix rounded to fp16 (to nearest, ties to even); refused in one line where a weight lies beyond
    fp16's range (it would become infinite), which bf16's range holds."""
    with np.errstate(over="ignore"):  # checked below
        half = np.asarray(w).astype(np.float16)
    if not all_finite(half) and all_finite(np.asarray(w, dtype=np.float32)):
        raise BabyLlamaError("weights beyond fp16's range (|w| > 65504): use bf16")
    return half


def quantize_q80(w: np.ndarray, group_size: int) -> QTensor:
    """Symmetric int8 per group: scale = max|w| / 127, q = round(w / scale); an all-zero group gets scale 0.
    Rows go a few MiB at a time, so that the temporaries are not each the size of the matrix (a 32000-token
    classifier is 98 MB per dim of 768)."""
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"row length {n} is not a multiple of group size {group_size}")
    q = np.empty((out, n), np.int8)
    scale = np.empty((out, n // group_size), np.float32)
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * n))
    for r in range(0, out, step):
        groups = np.asarray(w[r:r + step], dtype=np.float32).reshape(-1, n // group_size, group_size)
        s = np.abs(groups).max(axis=2) / 127.0
        safe = np.where(s == 0, 1.0, s)
        q[r:r + step] = np.round(groups / safe[:, :, None]).astype(np.int8).reshape(-1, n)
        scale[r:r + step] = s
    return QTensor(q, scale, group_size)


Matrix = np.ndarray | QTensor | BlockTensor | BF16Tensor


def table_rows(m: Matrix, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of m as fp32 (N, cols): the same values as dense(m)[rows], dequantizing only those rows."""
    rows = np.asarray(rows)
    if isinstance(m, (BlockTensor, BF16Tensor)):
        return m.dequantize(rows)
    if isinstance(m, QTensor):
        return QTensor(m.q[rows], m.s[rows], m.group_size).dequantize()
    return m[rows].astype(np.float32)


def dense(m: Matrix) -> np.ndarray:
    """m as an fp32 array (dequantized when quantized, converted when fp16 or bf16)."""
    return m.astype(np.float32, copy=False) if isinstance(m, np.ndarray) else m.dequantize()


def is_fp32(m: Matrix | Sequence[Matrix]) -> TypeGuard[np.ndarray]:
    """Whether m (a matrix, or a layer stack) is a dense fp32 array, as opposed to a quantized matrix or fp16 values."""
    return isinstance(m, np.ndarray) and m.dtype == np.float32


def is_quantized(m: Matrix) -> TypeGuard[QTensor | BlockTensor]:
    """Whether m is quantized (its products quantize the activations too), as opposed to dense: weights held as
    numbers (fp32, fp16 or bf16), multiplied as they are in fp32 arithmetic."""
    return isinstance(m, (QTensor, BlockTensor))


def quant_kind(m: Matrix) -> str:
    """"fp32", "f16", "bf16", "q8_0 gs N" (runq.c's Q8_0 with group size N) or a llama.cpp block type ("q4_0",
    "q8_0 blocks")."""
    if isinstance(m, np.ndarray):
        return "fp32" if m.dtype == np.float32 else "f16"
    if isinstance(m, BF16Tensor):
        return "bf16"
    if isinstance(m, QTensor):
        return f"q8_0 gs {m.group_size}"
    return "q8_0 blocks" if m.kind == "q8_0" else m.kind


@dataclass
class Weights:
    """All of a model's tensors, nn.Linear layout (out_features, in_features). Layer stacks are indexed
    by layer: an (L, out, in) array for fp32, a list of matrices otherwise: quantized (QTensor, BlockTensor) or
    16-bit (fp16 arrays, BF16Tensor: a GGUF's or checkpoint's F16/BF16 matrices, which the native kernels read
    as they are and everything else converts, see `dense`); a model read from GGUF may mix types."""

    args: ModelArgs
    tok_embeddings: Matrix  # (vocab, dim): fp32, or quantized (its rows dequantized as tokens are embedded)
    rms_att: np.ndarray  # (L, dim)
    rms_ffn: np.ndarray  # (L, dim)
    rms_final: np.ndarray  # (dim,)
    wq: Sequence[Matrix]
    wk: Sequence[Matrix]
    wv: Sequence[Matrix]
    wo: Sequence[Matrix]
    w1: Sequence[Matrix]
    w2: Sequence[Matrix]
    w3: Sequence[Matrix]
    wcls: Matrix  # (vocab, dim); the embedding itself (or its Q8_0 form) when shared
    version: int = 0
    group_size: int = 0  # Q8_0 group size, 0 for fp32
    path: str | None = field(default=None, repr=False)

    @property
    def quantized(self) -> bool:
        return any(is_quantized(m) for m in (self.tok_embeddings, self.wcls, *self.wq, *self.w2))

    def layer_matrices(self) -> dict[str, Sequence[Matrix]]:
        return {name: getattr(self, name) for name in LAYER_MATRICES}

    def kinds(self) -> str:
        """The types of the matrices the products read (layers and classifier), e.g. "q4_0, q8_0 blocks"."""
        mats = [self.wcls, *(m for stack in self.layer_matrices().values() for m in stack)]
        return ", ".join(sorted({quant_kind(m) for m in mats}))

    def to_fp32(self) -> Weights:
        """The same model with every matrix as a dense fp32 (L, out, in) array (dequantizing, converting fp16/bf16)."""
        if all(is_fp32(m) for m in (self.tok_embeddings, self.wcls, *self.layer_matrices().values())):
            return self
        mats: dict[str, Any] = {name: np.stack([dense(m) for m in stack])
                                for name, stack in self.layer_matrices().items()}
        emb = dense(self.tok_embeddings)
        wcls = emb if self.args.shared_classifier else dense(self.wcls)
        return Weights(self.args, emb, self.rms_att, self.rms_ffn, self.rms_final,
                       wcls=wcls, version=self.version, path=self.path, **mats)

    def quantize_q4(self, quantize: Callable[[np.ndarray], BlockTensor] = quantize_q4_0) -> Weights:
        """The same model in Q4_0 (llama.cpp's blocks of 32, what version 3 files hold), embedding table and
        classifier included; a matrix whose rows do not split into blocks of 32 gets runq.c's Q8_0 instead (as
        llama.cpp's quantizer falls back to another type), and Q4_0 matrices are kept as they are. `quantize`:
        quant.py's quantizer, or one that writes the same bytes faster (kernels.quantize_blocks)."""
        # a model quantized on load comes here with its matrices done: their note was given then
        done = all(isinstance(m, (BlockTensor, QTensor)) for stack in self.layer_matrices().values() for m in stack)
        gs = default_group_size(self.args) if done else chosen_group_size(self.args, "q4_0")
        release = self._release_after()

        def q4(m: Matrix) -> Matrix:
            return release(m, as_q4_0(m, gs, quantize))

        mats: dict[str, Any] = {name: [q4(m) for m in stack] for name, stack in self.layer_matrices().items()}
        emb = q4(self.tok_embeddings)
        wcls = emb if self.args.shared_classifier else q4(self.wcls)
        return Weights(self.args, emb, *self._own_norms(), wcls=wcls, version=3,
                       path=self.path, **mats)

    @staticmethod
    def _release_after() -> Callable[[Matrix, Matrix], Matrix]:
        """release(m, copy): hands back the pages of m where they are a mapped file's (memory.release_mapped)
        and returns its quantized copy, so that quantizing a mapped model holds one fp32 matrix at a time
        besides the copies, not the whole file. A later read of m maps the same bytes again."""
        maps = memory.read_only_file_maps()

        def release(m: Matrix, copy: Matrix) -> Matrix:
            if not is_quantized(m):
                memory.release_mapped(*matrix_arrays(m), maps=maps)
            return copy

        return release

    def _own_norms(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Copies of the norm gains, so that a model quantized from this one holds nothing of it (a mapped file's
        map, or the arrays read from a file)."""
        return np.array(self.rms_att), np.array(self.rms_ffn), np.array(self.rms_final)

    def quantize_as(self, kind: str, quantize_q4: Callable[[np.ndarray], BlockTensor] = quantize_q4_0) -> Weights:
        """`--quantize KIND` on load: "q8_0" (runq.c's Q8_0, version 2), "q4_0" (llama.cpp's, version 3, its
        blocks made by `quantize_q4`), "f16" or "bf16" (to_16_bit)."""
        check_quantize_kind(kind)
        if kind in ("f16", "bf16"):
            return self.to_16_bit(kind)
        return self.quantize() if kind == "q8_0" else self.quantize_q4(quantize_q4)

    def to_16_bit(self, kind: str) -> Weights:
        """The same model with its matrices, classifier and embedding table rounded to "f16" or "bf16" (to
        nearest even), which the native kernels read as the fp32 values they stand for: half the bytes of fp32 a
        token, at a rounding error fp32 arithmetic adds to every product anyway; matrices of that type kept."""
        release = self._release_after()

        def rounded(m: Matrix) -> Matrix:
            return m if quant_kind(m) == kind else release(m, quantize_matrix(dense(m), kind, 0))

        mats: dict[str, Any] = {name: [rounded(m) for m in stack] for name, stack in self.layer_matrices().items()}
        emb = rounded(self.tok_embeddings)
        wcls = emb if self.args.shared_classifier else rounded(self.wcls)
        return Weights(self.args, emb, *self._own_norms(), wcls=wcls, version=1, path=self.path, **mats)

    def quantize(self, group_size: int | None = None) -> Weights:
        """The same model with its matrices, classifier and embedding table in Q8_0 (runq.c's, group size
        `group_size`)."""
        gs = self.q8_0_group_size(group_size)
        if self.holds_q8_0() and gs == self.group_size:
            return self
        release = self._release_after()

        def q8(m: Matrix) -> Matrix:
            return release(m, as_q8_0(m, gs))

        mats: dict[str, Any] = {name: [q8(m) for m in stack] for name, stack in self.layer_matrices().items()}
        qcls = q8(self.wcls)
        # the embedding is quantized too, as a v2 file stores it; its rows are dequantized as tokens are embedded
        qemb = qcls if self.args.shared_classifier else q8(self.tok_embeddings)
        return Weights(self.args, qemb, *self._own_norms(), wcls=qcls,
                       version=2, group_size=gs, path=self.path, **mats)

    def holds_q8_0(self) -> bool:
        """Whether the model is in runq.c's Q8_0 throughout, in groups of its `group_size` (a version 2 file)."""
        current = {m.group_size if isinstance(m, QTensor) else 0
                   for m in (*self.wq, *self.w2, self.wcls, self.tok_embeddings)}
        return bool(self.group_size) and current == {self.group_size}

    def q8_0_group_size(self, group_size: int | None = None) -> int:
        """The group size of the model in runq.c's Q8_0 (quantize, a version 2 file): `group_size`, else the one
        its Q8_0 matrices share, else chosen_group_size's; one that does not divide dim and hidden_dim is refused."""
        gs = group_size or (self.group_size if self.holds_q8_0() else chosen_group_size(self.args))
        check_group_size(self.args, gs)
        return gs


def check_quantize_kind(kind: str) -> None:
    """Refuse a `--quantize` kind other than QUANTIZE_KINDS in one line."""
    if kind not in QUANTIZE_KINDS:
        raise BabyLlamaError(f"unknown quantization {kind!r} (choose {', '.join(QUANTIZE_KINDS)})")


def quantize_matrix(w: np.ndarray, kind: str, group_size: int,
                    quantize_q4: Callable[[np.ndarray], BlockTensor] = quantize_q4_0) -> Matrix:
    """An fp32 matrix as `--quantize KIND` makes it: "q8_0" runq.c's Q8_0 in groups of `group_size`; "q4_0"
    llama.cpp's Q4_0 (made by `quantize_q4`), or runq.c's Q8_0 where its rows do not split into blocks of 32;
    "f16", "bf16" rounded to those."""
    if kind == "f16":
        return to_f16(w)
    if kind == "bf16":
        return to_bf16(w)
    if kind == "q4_0" and w.shape[1] % BLOCK == 0:
        return quantize_q4(w)
    return quantize_q80(w, group_size)


def as_q8_0(m: Matrix, group_size: int) -> QTensor:
    """m in runq.c's Q8_0 in groups of `group_size`: as it is where it is that already, else quantized from its
    values."""
    if isinstance(m, QTensor) and m.group_size == group_size:
        return m
    return quantize_q80(dense(m), group_size)


def as_q4_0(m: Matrix, group_size: int, quantize_q4: Callable[[np.ndarray], BlockTensor] = quantize_q4_0) -> Matrix:
    """m as quantize_matrix(..., "q4_0", group_size) makes it, kept as it is where it is that already (Q4_0 blocks,
    or Q8_0 in groups of `group_size` where its rows do not split into blocks of 32)."""
    if (isinstance(m, BlockTensor) and m.kind == "q4_0"
            or isinstance(m, QTensor) and m.shape[1] % BLOCK and m.group_size == group_size):
        return m
    return quantize_matrix(dense(m), "q4_0", group_size, quantize_q4)


def default_group_size(args: ModelArgs, start: int = DEFAULT_GROUP_SIZE) -> int:
    """runq.c's rule (halve until it divides dim), also required to divide hidden_dim so that no group
    straddles two rows of w2. Where that leaves fewer than 4 (more bytes a weight than f16), the largest size
    up to `start` dividing both instead: halving alone gives a hidden_dim with odd factors only (171) groups of
    1, 5 bytes a weight, where 9 divides it. Shapes halving serves keep llama2.c's export's size."""
    gs = start
    while gs > 1 and (args.dim % gs or args.hidden_dim % gs):
        gs //= 2
    if gs >= 4:
        return gs
    common = math.gcd(args.dim, args.hidden_dim)
    return max(d for d in range(1, min(start, common) + 1) if common % d == 0)


def chosen_group_size(args: ModelArgs, kind: str = "q8_0") -> int:
    """default_group_size for quantizing to `kind` (a version 2 or 3 export, `--quantize`), with a one-line note
    on stderr where the shape leaves Q8_0 groups so small that they take more bytes a weight than f16
    (1 + 4 / group size): under Q8_0 always, under Q4_0 where rows not made of blocks of 32 fall back to Q8_0
    (which a note says too)."""
    gs = default_group_size(args)
    odd = [f"{name} {n}" for name, n in (("dim", args.dim), ("hidden_dim", args.hidden_dim)) if n % BLOCK]
    if kind == "q4_0" and odd:  # asked for Q4_0, given Q8_0 in part or whole: said, not left to be found
        note(f"Q4_0 needs rows made of blocks of {BLOCK}: the matrices whose rows are of {' and '.join(odd)} are "
             f"Q8_0 instead, in groups of {gs}")
    q8_used = kind == "q8_0" or (kind == "q4_0" and odd)
    if gs < 4 and q8_used:
        beyond = "f16's 2 and fp32's 4" if 1 + 4 / gs > 4 else "f16's 2"
        note(f"Q8_0 in groups of {gs} (the largest size dividing both dim {args.dim} and hidden_dim "
             f"{args.hidden_dim}) takes {1 + 4 / gs:g} bytes a weight, more than {beyond}")
    return gs


def check_group_size(args: ModelArgs, gs: int) -> None:
    if gs <= 0 or args.dim % gs or args.hidden_dim % gs:
        raise BabyLlamaError(f"Q8_0 group size {gs} must divide dim {args.dim} and hidden_dim {args.hidden_dim}")


# ----------------------------------------------------------------------------------------------- reading


def read_header(path: str | os.PathLike) -> tuple[ModelArgs, int, int, int]:
    """Parse and validate a model header. Returns (args, version, group_size, header_bytes)."""
    path = Path(path)
    with safeio.open_regular(path, "model file") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            head = f.read(HEADER_V12)
        except OSError as e:
            raise BabyLlamaError(f"cannot read model file {path}: {e.strerror or e}") from None
    if len(head) < HEADER_V0:
        raise BabyLlamaError(f"{path}: file is too small ({size} bytes) to be a llama2.c model")

    magic, version = struct.unpack_from("<Ii", head, 0)
    if magic == MAGIC:
        if len(head) < HEADER_V12:
            raise BabyLlamaError(f"{path}: truncated header ({size} bytes, version 1/2 headers are 256)")
        if version == 0:  # the legacy version has no header: a file with the magic is not one of them
            raise BabyLlamaError(f"{path}: its header (magic \"ak42\") says version 0, but version 0 (legacy) files "
                                 "have no header; the header is corrupt")
        if version not in (1, 2, 3):
            raise BabyLlamaError(f"{path}: unsupported model version {version} (babyllama reads 0, 1, 2 and 3)")
        dims = struct.unpack_from("<7i", head, 8)
        shared = head[36] != 0
        group_size = struct.unpack_from("<i", head, 37)[0] if version >= 2 else 0
        theta, eps = struct.unpack_from("<dd", head, EXT_OFFSET)
        header_bytes = HEADER_V12
    else:
        version, group_size, header_bytes = 0, 0, HEADER_V0
        dims = struct.unpack_from("<7i", head, 0)
        shared = dims[5] > 0
        dims = dims[:5] + (abs(dims[5]),) + dims[6:]
        theta = eps = 0.0

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = dims
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
    for name, value in zip(names, dims, strict=True):
        if not 0 < value <= LIMITS[name]:
            raise BabyLlamaError(f"{path}: header field {name}={value} is out of range; not a llama2.c model?")
    if not (np.isfinite(theta) and np.isfinite(eps) and theta >= 0 and eps >= 0):
        raise BabyLlamaError(f"{path}: header rope_theta/norm_eps are corrupt")
    args = checked_args(f"{path}: header", dim=dim, hidden_dim=hidden_dim, n_layers=n_layers,
                        n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size, max_seq_len=seq_len,
                        shared_classifier=shared, rope_theta=theta or DEFAULT_ROPE_THETA,
                        norm_eps=eps or DEFAULT_NORM_EPS)
    try:
        # hidden_dim need not be a multiple: llama2.c's groups run over each flattened tensor (load reads them)
        if version == 2 and (group_size <= 0 or dim % group_size):
            check_group_size(args, group_size)
        if version == 3:
            check_q4_shape(args, group_size)
    except BabyLlamaError as e:  # a corrupt header (or a version field changed), not a bad flag
        raise BabyLlamaError(f"{path}: invalid version {version} header: {e}") from None

    expected = header_bytes + body_size(args, version, group_size)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise BabyLlamaError(f"{path}: file {what}: {size} bytes, header (version {version}) implies {expected}")
    return args, version, group_size, header_bytes


def check_q4_shape(args: ModelArgs, block: int = BLOCK) -> None:
    """Version 3 stores every matrix in Q4_0 blocks of 32 along its rows (`block`: a header's group size)."""
    if block != BLOCK:
        raise BabyLlamaError(f"version 3 (Q4_0) has blocks of {BLOCK}, not {block}")
    if args.dim % BLOCK or args.hidden_dim % BLOCK:
        raise BabyLlamaError(f"version 3 (Q4_0) needs blocks of {BLOCK} dividing dim {args.dim} and hidden_dim "
                             f"{args.hidden_dim}")


def _q8_bytes(numel: int, gs: int) -> int:
    return numel + 4 * (numel // gs)


def _q4_bytes(numel: int) -> int:
    return numel // BLOCK * BLOCK_BYTES["q4_0"]


def body_size(args: ModelArgs, version: int, group_size: int = 0) -> int:
    """Bytes after the header, from the dims alone (so a lying header is caught before mapping)."""
    L, d, h, kv, V = args.n_layers, args.dim, args.hidden_dim, args.kv_dim, args.vocab_size
    norms = 4 * (2 * L * d + d)
    mats = [d * d, kv * d, kv * d, d * d, h * d, d * h, h * d]
    if version in (2, 3):
        per = (lambda n: _q8_bytes(n, group_size)) if version == 2 else _q4_bytes  # noqa: E731
        cls = 0 if args.shared_classifier else per(V * d)
        return norms + per(V * d) + L * sum(per(n) for n in mats) + cls
    cls = 0 if args.shared_classifier else 4 * V * d
    rope_tables = 4 * args.max_seq_len * args.head_size if version == 0 else 0
    return norms + 4 * V * d + 4 * L * sum(mats) + rope_tables + cls


def _map_file(path: str | os.PathLike) -> np.ndarray:
    """The file as a read-only byte array backed by a shared map. The map asks for huge pages before
    anything is touched: the kernel's read-ahead then fills it with 2 MB page-cache folios mapped by
    single TLB entries where it can, so decode, which streams every weight per token, misses the TLB less
    (measurements: docs/speed-log.md)."""
    with safeio.open_regular(path, "model file") as f, safeio.mapping(path):
        mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ)
    try:
        mm.madvise(_mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # not Linux, or a kernel without transparent huge pages
        pass
    return np.frombuffer(mm, dtype=np.uint8)


def _changed(path: str | os.PathLike, size: int, expected: int) -> BabyLlamaError:
    return BabyLlamaError(f"{path}: the file changed while it was read ({size} bytes, expected {expected})")


class _Cursor:
    """Hands out a model file's consecutive tensors as typed arrays: views of its map (`buf`), or, reading the
    file (`f`, at `offset`), arrays of their own, one per tensor, so that a matrix the native kernels copy
    (regroup, pack) lets its bytes go by itself and memory never holds the whole read beside the copies. Either
    way the arrays are read-only: weights are never modified in place."""

    def __init__(self, path: str | os.PathLike, expected: int, offset: int, buf: np.ndarray | None = None,
                 f: io.BufferedReader | None = None):
        self.path, self.expected, self.offset, self.buf, self.f = path, expected, offset, buf, f

    def take(self, dtype: type, *shape: int) -> np.ndarray:
        n = int(np.prod(shape))
        nbytes = n * np.dtype(dtype).itemsize
        if self.buf is not None:
            arr: np.ndarray = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.offset).reshape(shape)
        else:
            assert self.f is not None
            arr = np.empty(shape, dtype=dtype)
            # NumPy's stubs give ndarray __buffer__ only from Python 3.12
            got = self.f.readinto(memoryview(arr).cast("B"))  # type: ignore[arg-type]
            if got != nbytes:  # cut short while it is read (rewritten in place): never uninitialized weights
                raise _changed(self.path, self.offset + got, self.expected)
            arr.flags.writeable = False
        self.offset += nbytes
        return arr

    def take_q8(self, out: int, n: int, gs: int) -> QTensor:
        q = self.take(np.int8, out, n)
        s = self.take(np.float32, out, n // gs)
        return QTensor(q, s, gs)

    def take_q8_flat(self, out: int, n: int, gs: int) -> np.ndarray:
        """A matrix quantized as llama2.c's export.py does, in groups of gs over the whole flattened tensor,
        dequantized: the weights it stands for, in fp32."""
        q = self.take(np.int8, out * n // gs, gs)
        s = self.take(np.float32, out * n // gs)
        return (q * s[:, None]).reshape(out, n)

    def take_q4(self, out: int, n: int) -> BlockTensor:
        return BlockTensor("q4_0", self.take(np.uint8, out, _q4_bytes(n)), n)


def load(path: str | os.PathLike, mmap: bool | None = None, read_once: bool = False) -> Weights:
    """A llama2.c model file (any version) as `Weights`.
    `mmap=True` maps the file, its tensors views of the map: loading is instant and memory grows only with what is
    touched (the map gets huge pages when the file is read cold, see _map_file). `mmap=False` reads it into
    process memory (llama.cpp's --no-mmap), each tensor into an array of its own, which NumPy backs with
    transparent huge pages where the kernel allows: faster decode. None (the default) reads files that take at
    most a quarter of the free memory and maps larger ones (memory.read_by_default), and maps version 3 (Q4_0)
    files and version 2 ones with groups of 32 or 64:
    the native kernels regroup (pack) their matrices into process memory on the first call and hand the file's
    pages back (kernels_native's _regroup), so reading the file too would only add a copy to throw away.
    `read_once`: the caller reads each weight once more and keeps none of them (it quantizes them, see
    Weights.quantize_as): the file is mapped unless `mmap` is False, and the pages of each tensor are handed
    back once it is checked, so that memory never holds the whole file."""
    args, version, gs, header = read_header(path)
    if mmap is None:
        regrouped = version == 3 or (version == 2 and gs in PACKED_GROUP_SIZES)
        mmap = regrouped or read_once or not memory.read_by_default(os.path.getsize(path))
    with _open_cursor(path, mmap, header, header + body_size(args, version, gs)) as c:
        emb, norms, mats, wcls, version, gs = _tensors(c, args, version, gs, path)
    weights = Weights(args, emb, *norms, wcls=wcls, version=version, group_size=gs, path=str(path), **mats)
    check_finite(weights, str(path), release=mmap and read_once)
    if mmap and not args.shared_classifier:  # the check read it all; decode reads a row of it per token
        memory.release_mapped(*matrix_arrays(emb))
    return weights


@contextlib.contextmanager
def _open_cursor(path: str | os.PathLike, mmap: bool, header: int, expected: int) -> Iterator[_Cursor]:
    """A _Cursor at the first tensor of a model file of `expected` bytes: over its map, or reading it."""
    if mmap:
        buf = _map_file(path)
        if buf.size != expected:  # the file changed between the header check and the map
            raise _changed(path, buf.size, expected)
        yield _Cursor(path, expected, header, buf=buf)
        return
    with safeio.open_regular(path, "model file") as f:
        size = os.fstat(f.fileno()).st_size
        if size != expected:  # the file changed between the header check and the read
            raise _changed(path, size, expected)
        f.seek(header)
        yield _Cursor(path, expected, header, f=cast(io.BufferedReader, f))  # a binary open_regular file is one


def _tensors(c: _Cursor, args: ModelArgs, version: int, gs: int, path: str | os.PathLike) -> tuple[
        Matrix, tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, Any], Matrix, int, int]:
    """A model file's tensors in its version's order: the embedding table, the norms (attention, ffn, final),
    the layers' matrices by name, the classifier; and the version and group size they run as."""
    L, d, h, V = args.n_layers, args.dim, args.hidden_dim, args.vocab_size
    shapes = args.matrix_shapes()
    mats: dict[str, Any]
    emb: Matrix
    wcls: Matrix

    if version == 0:
        emb = c.take(np.float32, V, d)
        rms_att = c.take(np.float32, L, d)
        mats = {name: c.take(np.float32, L, *shapes[name]) for name in ("wq", "wk", "wv", "wo")}
        rms_ffn = c.take(np.float32, L, d)
        mats.update({name: c.take(np.float32, L, *shapes[name]) for name in ("w1", "w2", "w3")})
        rms_final = c.take(np.float32, d)
        c.take(np.float32, args.max_seq_len * args.head_size)  # legacy RoPE tables, unused
        wcls = emb if args.shared_classifier else c.take(np.float32, V, d)
    elif version == 1:
        rms_att, rms_ffn, rms_final = c.take(np.float32, L, d), c.take(np.float32, L, d), c.take(np.float32, d)
        emb = c.take(np.float32, V, d)
        mats = {name: c.take(np.float32, L, *shapes[name]) for name in LAYER_MATRICES}
        wcls = emb if args.shared_classifier else c.take(np.float32, V, d)
    elif version == 2 and h % gs:
        rms_att, rms_ffn, rms_final = c.take(np.float32, L, d), c.take(np.float32, L, d), c.take(np.float32, d)
        emb = c.take_q8_flat(V, d, gs)
        mats = {name: np.stack([c.take_q8_flat(*shapes[name], gs) for _ in range(L)]) for name in LAYER_MATRICES}
        wcls = emb if args.shared_classifier else c.take_q8_flat(V, d, gs)
        note(f"{path}: its Q8_0 groups of {gs} run across the rows of w2 (hidden_dim {h} is not a multiple "
             f"of {gs}: llama2.c's export.py writes such files, and runq.c misreads them); the weights they stand "
             "for are read as fp32 (run, chat, eval and serve's --quantize q8_0 quantizes them again, in groups "
             "within rows, as export --version 2 writes them)")
        version, gs = 1, 0
    elif version == 2:
        rms_att, rms_ffn, rms_final = c.take(np.float32, L, d), c.take(np.float32, L, d), c.take(np.float32, d)
        qemb = c.take_q8(V, d, gs)
        mats = {name: [c.take_q8(*shapes[name], gs) for _ in range(L)] for name in LAYER_MATRICES}
        emb = qemb  # kept quantized (runq.c dequantizes the table at load): rows are dequantized when embedded
        wcls = qemb if args.shared_classifier else c.take_q8(V, d, gs)
    else:  # the embedding table stays Q4_0 too: rows are dequantized as tokens are embedded
        rms_att, rms_ffn, rms_final = c.take(np.float32, L, d), c.take(np.float32, L, d), c.take(np.float32, d)
        emb = c.take_q4(V, d)
        mats = {name: [c.take_q4(*shapes[name]) for _ in range(L)] for name in LAYER_MATRICES}
        wcls = emb if args.shared_classifier else c.take_q4(V, d)
        gs = 0
    return emb, (rms_att, rms_ffn, rms_final), mats, wcls, version, gs


def matrix_arrays(m: Matrix) -> list[np.ndarray]:
    """The arrays that hold m's bytes."""
    if isinstance(m, QTensor):
        return [m.q, m.s] if m.plain_kept else [m.packed]  # type: ignore[list-item]  # packed when not kept
    return [m.data] if isinstance(m, BlockTensor) else [m.bits] if isinstance(m, BF16Tensor) else [m]


# llama2.c's names of a layer's tensors (Meta's checkpoints', model.py's), the hub every converter maps onto
LAYER_NAMES = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
    "rms_att": "attention_norm", "rms_ffn": "ffn_norm",
}


def layer_key(layer: int, field: str) -> str:
    """The state-dict name of a per-layer `Weights` field, e.g. (0, "wq") -> layers.0.attention.wq.weight."""
    return f"layers.{layer}.{LAYER_NAMES[field]}.weight"


def held_tensors(weights: Weights) -> dict[str, Matrix]:
    """The model's tensors under llama2.c names as the model holds them (fp32 arrays, quantized or 16-bit
    matrices; fp32 layer stacks as views of one layer), for writers that convert one tensor at a time and so
    never hold a second copy of the whole model."""
    held: dict[str, Matrix] = {"tok_embeddings.weight": weights.tok_embeddings}
    for layer in range(weights.args.n_layers):
        held[layer_key(layer, "rms_att")] = weights.rms_att[layer]
        held[layer_key(layer, "rms_ffn")] = weights.rms_ffn[layer]
        for name in LAYER_MATRICES:
            held[layer_key(layer, name)] = getattr(weights, name)[layer]
    held["norm.weight"] = weights.rms_final
    if not weights.args.shared_classifier:
        held["output.weight"] = weights.wcls
    return held


def in_turn(tensors: dict[str, Matrix],
            path: str | os.PathLike | None = None) -> Generator[tuple[str, Matrix], None, None]:
    """(name, matrix) of `tensors` in turn, for a writer that converts and writes one before asking for the
    next: once the caller is done with one, the pages under it are handed back where they are a mapped
    file's (memory.release_mapped), so that resident memory holds about one tensor's worth, not the file.
    `path`: what is written, named by a progress bar (on a terminal) over the tensors."""
    from .progress import progress_bar

    maps = memory.read_only_file_maps()
    with progress_bar(total=len(tensors), desc=None if path is None else f"writing {Path(path).name}",
                      unit="tensor", disable=path is None, delay=1.0) as bar:
        for name, m in tensors.items():
            yield name, m
            memory.release_mapped(*matrix_arrays(m), maps=maps)
            bar.update()


def named_tensors(weights: Weights) -> Iterator[tuple[str, np.ndarray | BF16Tensor]]:
    """(name, float array) for every float tensor of `weights` (a quantized matrix contributes its scales),
    layer stacks one layer at a time."""
    yield "tok_embeddings", checked_floats(weights.tok_embeddings)
    for name in ("rms_att", "rms_ffn", *LAYER_MATRICES):
        for layer, m in enumerate(getattr(weights, name)):
            yield f"{name} of layer {layer}", checked_floats(m)
    yield "rms_final", weights.rms_final
    if not weights.args.shared_classifier:
        yield "wcls", checked_floats(weights.wcls)


def checked_floats(m: Matrix) -> np.ndarray | BF16Tensor:
    """What the NaN/Inf check of m reads (all_finite): a quantized matrix's scales, else its values."""
    if isinstance(m, QTensor):
        return m.s
    if isinstance(m, BlockTensor):
        return m.scales()
    return m


def all_finite(a: np.ndarray | BF16Tensor) -> bool:
    """No NaN or Inf in `a`. A float32 sum is finite whenever every term is, unless it overflows (only for
    absurd weights), so the exact check runs only then; the sum streams the tensor once, without
    temporaries (110M parameters: ~40 ms). fp16 and bf16 values are checked on their bits (see _finite_bits):
    NumPy converts fp16 to fp32 an element at a time, ~10x slower."""
    if isinstance(a, BF16Tensor):
        return _finite_bits(a.bits, 0x7F80)
    if a.dtype == np.float16:
        return _finite_bits(a.view(np.uint16), 0x7C00)
    with np.errstate(all="ignore"):  # the NaN or overflow is what is being looked for
        if np.isfinite(np.add.reduce(a, axis=None, dtype=np.float32)):
            return True
    return bool(np.isfinite(a).all())


def _finite_bits(bits: np.ndarray, inf: int) -> bool:
    """No 16-bit float (given as its uint16 bits) with every exponent bit set (Inf or NaN): no magnitude (the
    bits but the sign) of `inf`, the bits of +Inf, or more; checked a chunk at a time."""
    flat, step = bits.reshape(-1), QUANTIZE_CHUNK_BYTES // 2
    chunk = np.empty(min(step, flat.size), dtype=np.uint16)
    for i in range(0, flat.size, step):
        part = np.bitwise_and(flat[i:i + step], 0x7FFF, out=chunk[:min(step, flat.size - i)])
        if part.max() >= inf:
            return False
    return True


def check_finite(weights: Weights, source: str, release: bool = False) -> None:
    """NaN or Inf in any weight makes every logit NaN (the model then prints <unk>s, eval a loss of nan):
    refuse it at load, naming the tensor. `release`: hand each tensor's pages back after its check where they
    are a mapped file's (memory.release_mapped)."""
    maps = memory.read_only_file_maps() if release else []
    for name, a in named_tensors(weights):
        if not all_finite(a):
            raise BabyLlamaError(f"{source}: tensor {name} holds NaN or infinite values; the file is corrupt")
        if release:
            memory.release_mapped(*matrix_arrays(a), maps=maps)


# ----------------------------------------------------------------------------------------------- writing


def _header_v12(args: ModelArgs, version: int, group_size: int) -> bytes:
    head = bytearray(HEADER_V12)
    struct.pack_into("<Ii7iB", head, 0, MAGIC, version, args.dim, args.hidden_dim, args.n_layers, args.n_heads,
                     args.n_kv_heads, args.vocab_size, args.max_seq_len, int(args.shared_classifier))
    if version >= 2:
        struct.pack_into("<i", head, 37, group_size)
    struct.pack_into("<dd", head, EXT_OFFSET, args.rope_theta, args.norm_eps)
    return bytes(head)


def _f32(f, a: np.ndarray) -> None:
    """Write a as fp32, without a copy where it is one already."""
    f.write(np.ascontiguousarray(a, dtype=np.float32).reshape(-1).view(np.uint8))


def _write_tensor(f, m: Matrix) -> None:
    """Write m's bytes as a model file holds them: Q8_0 values then scales, Q4_0 blocks, or else fp32 values."""
    if isinstance(m, QTensor):
        f.write(np.ascontiguousarray(m.q, dtype=np.int8).tobytes())
        _f32(f, m.s)
    elif isinstance(m, BlockTensor):
        f.write(np.ascontiguousarray(m.block_bytes()).tobytes())
    else:
        _f32(f, dense(m))


def check_writable(args: ModelArgs, path: str | os.PathLike) -> None:
    """Refuse to write a model that no reader would take back (a context of 2**31, an infinite eps, ...)."""
    try:
        args.validate()
    except ValueError as e:
        raise BabyLlamaError(f"cannot write {path}: invalid model shape: {e}") from None


def save(weights: Weights, path: str | os.PathLike, version: int = 1, group_size: int | None = None,
         quantize_q4: Callable[[np.ndarray], BlockTensor] = quantize_q4_0) -> None:
    """Write `weights` as a llama2.c model file (atomically: see safeio.atomic_write); version 3's Q4_0 blocks
    made by `quantize_q4` (Weights.quantize_q4). Each tensor is converted to the file's type on its turn, written,
    and its mapped pages handed back (in_turn): memory holds the source model and one converted
    tensor, never the whole model converted (a Q8_0 or bf16 model written as fp32 would take 2-4x its size)."""
    args = weights.args
    if version not in (0, 1, 2, 3):
        raise BabyLlamaError(f"unknown model file version {version} (choose 0, 1, 2 or 3)")
    if version == 0 and (args.rope_theta != DEFAULT_ROPE_THETA or args.norm_eps != DEFAULT_NORM_EPS):
        raise BabyLlamaError(
            f"version 0 files cannot carry rope_theta={args.rope_theta} / norm_eps={args.norm_eps}; "
            "export version 1, 2 or 3 instead")
    check_writable(args, path)
    if version == 3:
        try:
            check_q4_shape(args)
        except BabyLlamaError as e:
            raise BabyLlamaError(f"cannot write {path}: {e} (version 2, Q8_0, takes any shape)") from None
    header, converted = _file_type(weights, version, group_size, quantize_q4)
    with safeio.atomic_write(path) as f:
        f.write(header)
        for _, m in in_turn(_in_file_order(weights, version), path):
            _write_tensor(f, m if len(m.shape) == 1 else converted(m))


def _file_type(weights: Weights, version: int, group_size: int | None,
               quantize_q4: Callable[[np.ndarray], BlockTensor]) -> tuple[bytes, Callable[[Matrix], Matrix]]:
    """A `version` file's header for `weights`, and what a matrix becomes in it: fp32 (versions 0 and 1), runq.c's
    Q8_0 (2: Weights.quantize's), llama.cpp's Q4_0 (3: Weights.quantize_q4's)."""
    args = weights.args
    if version == 0:
        vocab = args.vocab_size if args.shared_classifier else -args.vocab_size
        return struct.pack("<7i", args.dim, args.hidden_dim, args.n_layers, args.n_heads, args.n_kv_heads, vocab,
                           args.max_seq_len), dense
    if version == 1:
        return _header_v12(args, version, 0), dense
    if version == 2:
        gs = weights.q8_0_group_size(group_size)
        return _header_v12(args, version, gs), lambda m: as_q8_0(m, gs)
    gs = chosen_group_size(args, "q4_0")
    return _header_v12(args, version, BLOCK), lambda m: as_q4_0(m, gs, quantize_q4)


def _in_file_order(weights: Weights, version: int) -> dict[str, Matrix]:
    """Every tensor a `version` file holds, as the model holds it, in the file's order (docs/formats.md): layer
    stacks one layer after another (the bytes of the stack), version 0's RoPE tables among them."""
    held = held_tensors(weights)
    layers = range(weights.args.n_layers)

    def each_layer(*fields: str) -> list[str]:
        return [layer_key(layer, name) for name in fields for layer in layers]

    if version == 0:
        names = ["tok_embeddings.weight", *each_layer("rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3"),
                 "norm.weight"]
    else:
        names = [*each_layer("rms_att", "rms_ffn"), "norm.weight", "tok_embeddings.weight",
                 *each_layer(*LAYER_MATRICES)]
    ordered = {name: held[name] for name in names}
    if version == 0:
        ordered["legacy RoPE tables"] = _legacy_rope_tables(weights.args)
    if "output.weight" in held:
        ordered["output.weight"] = held["output.weight"]
    return ordered


def _legacy_rope_tables(args: ModelArgs) -> np.ndarray:
    """The cos/sin tables that version 0 files carry (unused by any reader, written for byte compatibility)."""
    hs = args.head_size
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hs, 2)[: hs // 2] / hs))
    angles = np.outer(np.arange(args.max_seq_len), freqs)
    return np.concatenate([np.cos(angles).ravel(), np.sin(angles).ravel()]).astype(np.float32)
