"""llama.cpp's block-quantized matrices (GGUF's Q4_0 and Q8_0), as babyllama holds and runs them.

A row of n weights is n/32 blocks, stored one after another, rows one after another:
    Q8_0  34 bytes: fp16 scale d, 32 int8 values q;            weight = d * q
    Q4_0  18 bytes: fp16 scale d, 16 bytes of 4-bit values q;   weight = d * (q - 8), byte j holding
          weight j in its low nibble and weight j + 16 in its high one.
These are the bytes of a GGUF tensor of that type, so a llama.cpp file's tensors are used as they are
(memory-mapped), and babyllama's .bin version 3 stores Q4_0 the same way. The quantizers below reproduce
llama.cpp's reference ones (quantize_row_q4_0_ref / quantize_row_q8_0_ref) bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import BabyLlamaError

BLOCK = 32
BLOCK_BYTES = {"q4_0": 2 + BLOCK // 2, "q8_0": 2 + BLOCK}
KINDS = tuple(BLOCK_BYTES)


@dataclass
class BlockTensor:
    """A (rows, cols) matrix in one of llama.cpp's block layouts: `data` is uint8 (rows, cols/32 * block bytes).
    `regrouped`: each row's bytes are in the order the native kernels read (kernels.c's W_Q4_0R and W_Q8_0R,
    see regrouped_blocks), which they put a matrix in on its first use; everything here reads it as blocks."""

    kind: str  # "q4_0" or "q8_0"
    data: np.ndarray
    cols: int
    regrouped: bool = field(default=False, compare=False)

    def __post_init__(self):
        if self.kind not in BLOCK_BYTES:
            raise ValueError(f"unknown block type {self.kind!r}")
        row_bytes = self.cols // BLOCK * BLOCK_BYTES[self.kind]
        if self.cols % BLOCK or self.data.ndim != 2 or self.data.shape[1] != row_bytes:
            raise ValueError(f"{self.kind} data of shape {self.data.shape} does not hold rows of {self.cols} weights")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)

    @property
    def group_size(self) -> int:
        return BLOCK

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def _blocks(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        data = self.data[rows]
        if self.regrouped:
            return regrouped_blocks(data, self.kind)
        return data.reshape(data.shape[0], self.cols // BLOCK, BLOCK_BYTES[self.kind])

    def block_bytes(self) -> np.ndarray:
        """The matrix as llama.cpp's blocks, one row of bytes per row (what a file stores): `data` itself, or
        a copy back in block order where it is regrouped."""
        return self._blocks().reshape(self.data.shape) if self.regrouped else self.data

    def scales(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The blocks' scales as fp32: (rows, cols/32)."""
        b = self._blocks(rows)
        return np.ascontiguousarray(b[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)

    def values(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The integer weights as int8 (rows, cols), before scaling (Q4_0: q - 8, in [-8, 7])."""
        b = self._blocks(rows)[:, :, 2:]
        if self.kind == "q8_0":
            q = b.view(np.int8)
        else:
            q = np.concatenate([b & 0x0F, b >> 4], axis=2).astype(np.int8) - np.int8(8)
        return q.reshape(b.shape[0], self.cols)

    def dequantize(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """The matrix (or the rows selected) as fp32."""
        q = self.values(rows)
        n = q.shape[0]
        out = q.reshape(n, -1, BLOCK).astype(np.float32) * self.scales(rows)[:, :, None]
        return out.reshape(n, self.cols)


def check_scales_fit(t: BlockTensor) -> BlockTensor:
    """`t` (fresh from a quantizer, not regrouped) if every block's fp16 scale is finite. A scale is the block's
    largest |weight| / 8 (Q4_0) or / 127 (Q8_0): beyond fp16's 65,504 it is infinite and the block's weights
    NaN, so a model with weights past 524,032 (Q4_0) or 8,319,008 (Q8_0) cannot be held in these blocks."""
    blocks = t.data.reshape(t.data.shape[0], -1, BLOCK_BYTES[t.kind])
    scales = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)
    if not np.isfinite(scales).all():
        limit = 65504 * (8 if t.kind == "q4_0" else 127)
        raise BabyLlamaError(f"a weight beyond {limit:,} in magnitude does not fit {t.kind.upper()}'s fp16 block "
                             "scales: keep this model in fp32, or in runq.c's Q8_0, whose scales are fp32 (a "
                             ".bin of version 2: export --version 2; run, chat, eval, serve --quantize q8_0)")
    return t


def regrouped_group(left: int) -> int:
    """How many blocks kernels.c's regrouped rows (W_Q4_0R, W_Q8_0R) take in the next group of a row with `left`
    blocks to go."""
    return 16 if left >= 16 else 8 if left >= 8 else 4 if left >= 4 else 1


def _lanes_as_blocks(vectors: np.ndarray, words: int, g: int) -> np.ndarray:
    """A regrouped group's `words` vectors of g 4-byte lanes (rows, 4 * words * g; lane l of vector v: bytes
    4v..4v+3 of block l) back as its blocks' bytes (rows, g, 4 * words): kernels.c's rg_interleave undone."""
    rows = vectors.shape[0]
    return vectors.reshape(rows, words, g, 4).transpose(0, 2, 1, 3).reshape(rows, g, 4 * words)


def unpacked_q8(packed: np.ndarray, cols: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of kernels.c's packed Q8 (W_Q8R: rows, cols + 4 * cols / group_size bytes) back as runq.c's int8
    values (rows, cols) and fp32 scales (rows, cols / group_size). The blocks of 32 values go in groups as
    regrouped_blocks' Q8_0 ones (a group of G: 8 vectors of G 4-byte lanes), each group followed by the fp32
    scales of its G / per runq.c groups (per = group_size / 32); the last blocks stay as they are, each group of
    group_size values followed by its scale."""
    rows, per, nb = packed.shape[0], group_size // BLOCK, cols // BLOCK
    q = np.empty((rows, cols), dtype=np.int8)
    s = np.empty((rows, cols // group_size), dtype=np.float32)
    b0 = 0
    while b0 < nb:
        g = regrouped_group(nb - b0)
        g = per if g == 1 else g
        at = b0 * (BLOCK + 4 // per)
        values = packed[:, at:at + BLOCK * g]
        if g >= 4:
            values = _lanes_as_blocks(values, BLOCK // 4, g).reshape(rows, BLOCK * g)
        q[:, BLOCK * b0:BLOCK * (b0 + g)] = values.view(np.int8)
        scales = packed[:, at + BLOCK * g:at + BLOCK * g + 4 * (g // per)]
        s[:, b0 // per:(b0 + g) // per] = np.ascontiguousarray(scales).view(np.float32)
        b0 += g
    return q, s


def regrouped_blocks(data: np.ndarray, kind: str) -> np.ndarray:
    """Rows of Q4_0 or Q8_0 bytes in kernels.c's regrouped order (rows, nb * block bytes) back as blocks (rows,
    nb, block bytes). A row's blocks go in groups of 16, then at most one of 8 and one of 4 (regrouped_group),
    its last 0-3 blocks as they are; a group of G is 4 (Q4_0) or 8 (Q8_0) vectors of G 4-byte lanes (lane l of
    vector v: bytes 4v..4v+3 of block l's nibbles or values), then the G blocks' fp16 scales."""
    bb = BLOCK_BYTES[kind]
    rows, nb, words = data.shape[0], data.shape[1] // bb, (bb - 2) // 4
    out = np.empty((rows, nb, bb), dtype=np.uint8)
    b0 = 0
    while b0 < nb:
        g = regrouped_group(nb - b0)
        group = data[:, bb * b0:bb * (b0 + g)]
        if g == 1:
            out[:, b0] = group
        else:
            out[:, b0:b0 + g, 2:] = _lanes_as_blocks(group[:, :4 * words * g], words, g)
            out[:, b0:b0 + g, :2] = group[:, 4 * words * g:].reshape(rows, g, 2)
        b0 += g
    return out


def _blocks_of(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"rows of {w.shape[-1]} weights do not split into blocks of {BLOCK}")
    return w.reshape(w.shape[0], -1, BLOCK)


def _pack(out: np.ndarray, d: np.ndarray, qs: np.ndarray) -> None:
    """blocks (rows, nb, block bytes) = each block's fp16 scale, then its packed values"""
    out[:, :, :2] = d.astype(np.float16)[:, :, None].view(np.uint8)
    out[:, :, 2:] = qs


def _q8_0_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    d = np.abs(blocks).max(axis=2) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    scaled = (blocks * inv[:, :, None]).astype(np.float64)  # exact: the rounding below sees the fp32 product
    q = np.trunc(scaled + np.copysign(0.5, scaled)).astype(np.int8)
    _pack(out, d, q.view(np.uint8))


def _q4_0_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    first_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    d = first_max / np.float32(-8)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.minimum(15, (blocks * inv[:, :, None] + np.float32(8.5)).astype(np.int8)).astype(np.uint8)
    _pack(out, d, q[:, :, :BLOCK // 2] | (q[:, :, BLOCK // 2:] << 4))


# fp32 rows quantized at a time (here and by formats' quantizers): NumPy's temporaries, several times the rows'
# bytes, stay this size rather than the matrix's
QUANTIZE_CHUNK_BYTES = 4 << 20
_ROW_QUANTIZERS = {"q4_0": _q4_0_rows, "q8_0": _q8_0_rows}


def _quantize(kind: str, w: np.ndarray) -> BlockTensor:
    blocks = _blocks_of(w)
    rows, nb = blocks.shape[:2]
    out = np.empty((rows, nb, BLOCK_BYTES[kind]), dtype=np.uint8)
    step = max(1, QUANTIZE_CHUNK_BYTES // (4 * max(1, nb * BLOCK)))
    for r in range(0, rows, step):
        _ROW_QUANTIZERS[kind](blocks[r:r + step], out[r:r + step])
    return BlockTensor(kind, out.reshape(rows, -1), nb * BLOCK)


def quantize_q8_0(w: np.ndarray) -> BlockTensor:
    """llama.cpp's Q8_0: d = max|w| / 127, q = round(w / d) (halves away from zero), d stored as fp16."""
    return _quantize("q8_0", w)


def quantize_q4_0(w: np.ndarray) -> BlockTensor:
    """llama.cpp's Q4_0: d = (the block's value of largest magnitude) / -8, q = min(15, trunc(w / d + 8.5))."""
    return _quantize("q4_0", w)


# The divisors of the largest-magnitude weight that quantize_q4_0_searched tries. Weights already on a finer grid
# (a Q5_0 tensor's: steps of d5) sit, with llama.cpp's divisor 8, on Q4_0's rounding ties for half their values:
# an error larger than Q4_0's from fp32. Two other divisors move the grid off them. stories260K's Q5_0 file (RMS
# error of the conversion, bits per byte; benchmarks/quality.py): divisor 8 10.15%, 0.9052; these two 8.68%,
# 0.8828 (Q4_0 from fp32: 0.8854); five (8, 7.75, 7.5, 7.25, 8.25) 8.56%, 0.8824 at more than twice the work.
Q4_0_DIVISORS = (7.5, 8.25)


def _q4_0_candidate(blocks: np.ndarray, first_max: np.ndarray, exact: np.ndarray,
                    divisor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(squared error, scale, values) of the blocks at the scale first_max / -divisor, rounded to nearest."""
    d = (first_max / np.float32(-divisor)).astype(np.float16).astype(np.float32)  # the scale as stored
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.rint(blocks * inv[:, :, None] + np.float32(8)), 0, 15)  # nearest, ties to even
    e = (q.astype(np.float64) - 8) * d.astype(np.float64)[:, :, None] - exact
    e2 = e * e
    lanes = e2[:, :, 0:8] + e2[:, :, 8:16] + e2[:, :, 16:24] + e2[:, :, 24:32]  # kernels.c's eight sums, and
    err = lanes[:, :, 0]                                                         # its order
    for k in range(1, 8):
        err = err + lanes[:, :, k]
    return err, d, q


def _q4_0_searched_rows(blocks: np.ndarray, out: np.ndarray) -> None:
    first_max = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    exact = blocks.astype(np.float64)
    best_err, best_d, best_q = _q4_0_candidate(blocks, first_max, exact, Q4_0_DIVISORS[0])
    for divisor in Q4_0_DIVISORS[1:]:
        err, d, q = _q4_0_candidate(blocks, first_max, exact, divisor)
        better = err < best_err  # the earlier divisor on a tie (and on NaN: a non-finite block)
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_q = np.where(better[:, :, None], q, best_q)
    q8 = best_q.astype(np.uint8)
    _pack(out, best_d, q8[:, :, :BLOCK // 2] | (q8[:, :, BLOCK // 2:] << 4))


def quantize_q4_0_searched(w: np.ndarray) -> BlockTensor:
    """Q4_0 blocks for weights already quantized to another type (a GGUF tensor converted on load): of the
    scales first_max / -divisor for Q4_0_DIVISORS (stored as fp16), the one whose block rounded to nearest has
    the least squared error. Not llama.cpp's bytes (quantize_q4_0 makes those, from fp32 weights)."""
    blocks = _blocks_of(w)
    out = np.empty((*blocks.shape[:2], BLOCK_BYTES["q4_0"]), dtype=np.uint8)
    with np.errstate(invalid="ignore"):  # a non-finite block: its NaN scale is refused on load
        _q4_0_searched_rows(blocks, out)
    return BlockTensor("q4_0", out.reshape(blocks.shape[0], -1), blocks.shape[1] * BLOCK)


QUANTIZERS = {"q4_0": quantize_q4_0, "q8_0": quantize_q8_0}
