"""The kernel backend protocol that engine.py calls, the plain reference arithmetic, and the NumPy backend.

A backend (`Kernels`) does a forward pass's heavy operations: the matrix products of fp32 and quantized
weights (several matrices that read one input in one call), RMSNorm, SwiGLU, the attention step (RoPE, cache
writes, causal attention), and, where it can, a whole decode-sized step in one call (`step_plan` returns None
where it cannot). Three implement it: NumPy (here; also the plain reference path), numba (kernels_numba.py)
and the C kernels (kernels_native.py); kernels.py chooses.

Reference arithmetic (the plain path, what every fast path is tested against):
- fp32: x @ w.T in BLAS.
- quantized (runq.c's Q8_0, llama.cpp's Q8_0/Q4_0 blocks): the activations are quantized per group like the
  weights (scale = max|x| / 127, q = round(x / scale); groups of the weights' group size, 32 for blocks),
  int8 products summed exactly per group, scaled by w_scale * x_scale and summed over the groups.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import BabyLlamaError
from .formats import Matrix, QTensor, Weights, dense, is_quantized, table_rows
from .quant import BLOCK, BlockTensor

# Rows at or above which a quantized product is done as dequantize + sgemm instead of the int8 reference:
# the same sum as runq.c's (exact int8 products, per-group scales), only rounded differently, and far faster.
QUANT_GEMM_MIN_ROWS = 16


@runtime_checkable
class Kernels(Protocol):
    """What engine.py needs from a kernel backend. Arrays are float32 (the KV cache float32 or float16); `ws`
    hold fp32 arrays, QTensor or BlockTensor matrices in nn.Linear layout (out, in), all reading the same
    input."""

    name: str

    def threads(self) -> int:
        """Threads the backend's products use."""
        ...

    def matmul_many(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        """x @ w.T for each w in ws."""
        ...

    def dequantize(self, w: Matrix) -> np.ndarray:
        """w as fp32."""
        ...

    def embed(self, table: Matrix, tokens: np.ndarray) -> np.ndarray:
        """Rows `tokens` of the embedding table as fp32 (N, dim): formats.table_rows' values."""
        ...

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ...

    def swiglu(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """silu(a) * b."""
        ...

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                  keys: np.ndarray, values: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """RoPE on q (N, n_heads, hs) and k (N, kv_heads, hs) with each token's cos/sin (N, hs/2); k and v
        written into one layer's cache keys/values (slots, kv_heads, seq_len rows of hs values: float32,
        float16 rounded to nearest even as written, or Q8_0 rows, see kv_write) at (slots[i], positions[i]);
        then each token's causal attention over its slot up to its position, in float32: (N, n_heads * hs)."""
        ...

    def step_plan(self, weights: Weights, cos: np.ndarray, sin: np.ndarray) -> object | None:
        """A description of the model for `forward_step`, or None when the backend has no one-call step."""
        ...

    def forward_step(self, plan: Any, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                     keys: np.ndarray, values: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """A decode-sized step in one call: embedding, every block, final norm and classifier for the step's
        rows `rows`: logits (len(rows), vocab). keys/values: the whole cache (L, slots, kv_heads, seq_len rows
        of hs values), float32, float16 or Q8_0 rows.
        `plan` is what this backend's step_plan returned (its own type: Any here)."""
        ...


# ------------------------------------------------------------------------------- reference arithmetic


def quantize_rows(x: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Activations (N, n) quantized per group of gs: int8 values and (N, n/gs) scales."""
    n_rows, n = x.shape
    groups = x.reshape(n_rows, n // gs, gs)
    scale = np.abs(groups).max(axis=2) / np.float32(127.0)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.round(groups / safe[:, :, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def dequantize_rows(xq: np.ndarray, xs: np.ndarray, gs: int) -> np.ndarray:
    n_rows, n = xq.shape
    return (xq.reshape(n_rows, n // gs, gs).astype(np.float32) * xs[:, :, None]).reshape(n_rows, n)


# ------------------------------------------------------------------------------------ KV cache rows


def kv_group(head_size: int) -> int:
    """A Q8_0 cache row's group size: llama.cpp's blocks of 32, or the whole row where the head size is not a
    multiple of 32 (kernels.c's kv_groups counts them)."""
    return BLOCK if head_size % BLOCK == 0 else head_size


@functools.cache  # asked for on every decode step
def kv_q8_dtype(head_size: int) -> np.dtype:
    """A Q8_0 cache row, as kernels.c reads it: head_size int8 values ("q"), then one fp32 scale ("d") per group
    of kv_group(head_size) values; value = q * d. 72 bytes for a head of 64 (fp16: 128)."""
    return np.dtype([("q", np.int8, (head_size,)), ("d", np.float32, (head_size // kv_group(head_size),))])


def kv_overflow() -> BabyLlamaError:
    """The error for a key or value beyond fp16's range written into an fp16 cache: attention would read an
    infinity the model never computed (the native kernels return it as step error 5)."""
    return BabyLlamaError("a key or value exceeds the range of the fp16 KV cache (65,504; the cache is fp16 with "
                          "--kv-cache f16, and by default for quantized weights): run with --kv-cache f32 (or q8_0)")


def kv_write(cache: np.ndarray, index: Any, x: np.ndarray) -> None:
    """Rows x (..., head_size) of float32 written into cache[index]: as they are (a float32 cache), rounded to
    float16 (an overflow raises `kv_overflow`), or quantized per group (Q8_0 rows; quantize_rows, the
    activations' rule)."""
    if cache.dtype == np.float16:
        with np.errstate(over="ignore"):
            rows = x.astype(np.float16)
        cache[index] = rows  # written first, as the native kernels do
        if np.isinf(rows).any():
            raise kv_overflow()
        return
    if cache.dtype.names is None:
        cache[index] = x
        return
    hs = x.shape[-1]
    q, d = quantize_rows(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, hs), kv_group(hs))
    cache["q"][index] = q.reshape(x.shape)
    cache["d"][index] = d.reshape(*x.shape[:-1], d.shape[-1])


def kv_read(rows: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (..., head_size): Q8_0 rows dequantized (q * d, one rounding per value)."""
    if rows.dtype.names is None:
        return rows.astype(np.float32, copy=False)
    q, d = rows["q"], rows["d"]
    hs, n_groups = q.shape[-1], d.shape[-1]
    return dequantize_rows(q.reshape(-1, hs), d.reshape(-1, n_groups), hs // n_groups).reshape(q.shape)


def int_weights(w: QTensor | BlockTensor) -> tuple[np.ndarray, np.ndarray, int]:
    """A quantized matrix as (int8 values (out, in), fp32 scales (out, in/gs), gs)."""
    if isinstance(w, QTensor):
        return w.q, w.s, w.group_size
    return w.values(), w.scales(), w.group_size


def matmul_quantized(x: np.ndarray, w: QTensor | BlockTensor) -> np.ndarray:
    """The quantized product in plain NumPy (reference path; slow): runq.c's scheme for every quantized type."""
    wq, ws, gs = int_weights(w)
    out, n = wq.shape
    xq, xs = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), gs)
    wq = wq.reshape(out, n // gs, gs).astype(np.int32)
    # (N, G, gs) x (out, G, gs) -> (N, out, G) integer dot per group, then scaled and summed over groups
    dots = np.einsum("ngk,ogk->nog", xq.astype(np.int32), wq, optimize=True).astype(np.float32)
    return np.einsum("nog,og,ng->no", dots, ws, xs, optimize=True)


matmul_q8 = matmul_quantized  # runq.c's name for it


def matmul_plain(x: np.ndarray, w: Matrix) -> np.ndarray:
    return matmul_quantized(x, w) if is_quantized(w) else x @ dense(w).T


def quantized_gemm(x: np.ndarray, ws: Sequence[QTensor | BlockTensor],
                   dequantize: Callable[[Matrix], np.ndarray]) -> list[np.ndarray]:
    """Many rows: quantize-dequantize the activations (runq.c's rounding of x) and multiply in fp32 BLAS."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rounded: dict[int, np.ndarray] = {}
    for gs in {w.group_size for w in ws}:
        xq, xs = quantize_rows(x, gs)
        rounded[gs] = dequantize_rows(xq.reshape(x.shape), xs, gs)
    return [rounded[w.group_size] @ dequantize(w).T for w in ws]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])  # einsum: no x*x temporary
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate interleaved pairs of x (tokens, heads, head_size) by per-token angles (tokens, hs/2)."""
    t, h, hs = x.shape
    pairs = x.reshape(t, h, hs // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = np.empty_like(pairs)
    out[..., 0] = a * c - b * s
    out[..., 1] = a * s + b * c
    return out.reshape(t, h, hs)


def check_step_lengths(tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray, logits: str = "all") -> None:
    """A step's token ids, positions and slots: one of each per token, at least one token (one line, whichever
    path runs the step; NumPy would otherwise broadcast or fail deep inside a layer); `logits` one of the two
    the engines know (any other word would be taken for "all")."""
    if logits not in ("all", "last"):
        raise ValueError(f'logits must be "all" or "last", got {logits!r}')
    if not len(tokens):
        raise ValueError("a step needs at least one token")
    if not len(positions) == len(slots) == len(tokens):
        raise ValueError("tokens, positions and slots must have one entry per token")


def segments(slots: np.ndarray, positions: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split a token batch into runs of one slot at consecutive positions: (start, end, slot, first_pos)."""
    n = len(slots)
    if n == 1:  # a decode step: the common case, without NumPy's per-call costs
        return [(0, 1, int(slots[0]), int(positions[0]))]
    breaks = np.flatnonzero((slots[1:] != slots[:-1]) | (positions[1:] != positions[:-1] + 1)) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(a, b, int(slots[a]), int(positions[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos0: int) -> np.ndarray:
    """Causal attention of T queries (T, n_heads, head_size) at positions pos0..pos0+T-1 over keys/values
    (kv_heads, P, head_size), grouped so that n_heads/kv_heads query heads share each key/value head. Keys and
    values of an fp16 cache are read as float32: the arithmetic is float32 either way."""
    keys, values = keys.astype(np.float32, copy=False), values.astype(np.float32, copy=False)
    t, n_heads, hs = q.shape
    kvh = keys.shape[0]
    g = n_heads // kvh
    p = keys.shape[1]
    qg = q.reshape(t, kvh, g, hs).transpose(1, 2, 0, 3).reshape(kvh, g * t, hs)
    scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hs))  # (kvh, g*T, P)
    if t > 1:
        qpos = np.tile(np.arange(pos0, pos0 + t), g)  # row r of each head group is query r % t
        scores = np.where(np.arange(p)[None, :] <= qpos[:, None], scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ values  # (kvh, g*T, hs)
    return out.reshape(kvh, g, t, hs).transpose(2, 0, 1, 3).reshape(t, n_heads * hs)


# ------------------------------------------------------------------------------------ NumPy backend


class NumpyKernels:
    """The NumPy backend: BLAS for fp32, the reference for quantized decode, dequantize + sgemm for prompts."""

    name = "numpy"

    def threads(self) -> int:
        return 1

    def matmul_many(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        """Each matrix by its own type: a GGUF model may give one call quantized and dense matrices (attn_v
        kept in F16 beside Q4_0 attn_q, say)."""
        quantized = [w for w in ws if is_quantized(w)]
        if not quantized:
            return [x @ dense(w).T for w in ws]
        if x.shape[0] < QUANT_GEMM_MIN_ROWS:
            return [matmul_plain(x, w) for w in ws]
        products = iter(quantized_gemm(x, quantized, self.dequantize))
        return [next(products) if is_quantized(w) else x @ dense(w).T for w in ws]

    def dequantize(self, w: Matrix) -> np.ndarray:
        return dense(w)

    def embed(self, table: Matrix, tokens: np.ndarray) -> np.ndarray:
        return table_rows(table, tokens)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        return rmsnorm(x, weight, eps)

    def swiglu(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return silu(a) * b

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                  keys: np.ndarray, values: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n_heads = q.shape[1]
        qk = apply_rope(np.concatenate([q, k], axis=1), cos, sin)  # query and key heads in one NumPy call
        q, k = qk[:, :n_heads], qk[:, n_heads:]
        kv_write(keys, (slots, slice(None), positions), k)
        kv_write(values, (slots, slice(None), positions), v)
        att = np.empty((q.shape[0], n_heads * q.shape[2]), dtype=np.float32)
        for start, end, slot, pos0 in segments(slots, positions):
            end_pos = pos0 + (end - start)
            att[start:end] = attend(q[start:end], kv_read(keys[slot, :, :end_pos]),
                                    kv_read(values[slot, :, :end_pos]), pos0)
        return att

    def step_plan(self, weights: Weights, cos: np.ndarray, sin: np.ndarray) -> None:
        return None

    def forward_step(self, plan: Any, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                     keys: np.ndarray, values: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        raise NotImplementedError("the NumPy backend has no one-call step (step_plan returns None)")


class PlainKernels(NumpyKernels):
    """The unoptimized reference path: one product per matrix, quantized products in the reference arithmetic
    whatever the row count (`Engine(plain=True)`)."""

    name = "plain"

    def matmul_many(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        return [matmul_plain(x, w) for w in ws]
