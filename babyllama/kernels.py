"""Matrix products for fp32 and Q8_0 weights: `matmul(x, w)` computes x @ w.T for w in nn.Linear layout.

Two paths, the same numbers:
- plain (`matmul_plain`): the readable reference. fp32 is one BLAS call; Q8_0 is runq.c's scheme in NumPy
  (activations quantized per group like the weights, int8 products summed per group, scaled by
  w_scale * x_scale). Slow for Q8_0, but it is what every fast path is tested against.
- fast (`matmul_many`): several matrices that read the same input (wq/wk/wv, w1/w3) in one call, no
  copy of the weights. fp32 uses BLAS, except a single row (decode) with numba installed: a numba
  matrix-vector kernel, as fast on an idle machine and far faster on a shared one. Q8_0 goes through
  the numba kernel in `kernels_numba` when numba is installed (`pip install babyllama[fast]`), else the
  NumPy reference. For many rows (a prefill) Q8_0 dequantizes weights and activations and uses one BLAS
  product: the same sum as runq.c's (exact int8 products, per-group scales), only rounded differently;
  compute-bound prefill runs far faster in sgemm than in an int8 loop without VNNI.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .formats import QTensor

# Rows at or above which a Q8_0 product is done as dequantize + sgemm instead of the int8 kernel.
Q8_GEMM_MIN_ROWS = 16
# Rows up to which an fp32 product uses the numba matrix-vector kernel (when installed) instead of BLAS,
# and the weight elements (summed over the matrices of one call) from which it pays: below ~1M (4 MB),
# BLAS is as fast and a small model (the built-in one) starts without importing numba (~1.5 s).
F32_NUMBA_MAX_ROWS = 1
F32_NUMBA_MIN_ELEMENTS = 1 << 20

_numba_kernels = None  # the kernels_numba module, or False when numba is unavailable/disabled


def quantize_rows(x: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 quantization of activations (N, n): int8 values and (N, n/gs) scales."""
    n_rows, n = x.shape
    groups = x.reshape(n_rows, n // gs, gs)
    scale = np.abs(groups).max(axis=2) / np.float32(127.0)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    q = np.round(groups / safe[:, :, None]).astype(np.int8)
    return q, scale.astype(np.float32)


def matmul_q8(x: np.ndarray, w: QTensor) -> np.ndarray:
    """runq.c's quantized matmul in plain NumPy (reference path; slow)."""
    gs = w.group_size
    out, n = w.q.shape
    xq, xs = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), gs)
    wq = w.q.reshape(out, n // gs, gs).astype(np.int32)
    # (N, G, gs) x (out, G, gs) -> (N, out, G) integer dot per group, then scaled and summed over groups
    dots = np.einsum("ngk,ogk->nog", xq.astype(np.int32), wq, optimize=True).astype(np.float32)
    return np.einsum("nog,og,ng->no", dots, w.s, xs, optimize=True)


def matmul_plain(x: np.ndarray, w) -> np.ndarray:
    if isinstance(w, QTensor):
        return matmul_q8(x, w)
    return x @ w.T


def use_numba(enabled: bool = True) -> bool:
    """Turn the numba Q8_0 kernel on (if importable) or off; returns whether it is in use."""
    global _numba_kernels
    if not enabled:
        _numba_kernels = False
        return False
    try:
        from . import kernels_numba
    except ImportError:  # numba is an optional extra: fall back to NumPy
        _numba_kernels = False
        return False
    _numba_kernels = kernels_numba
    return True


def numba_kernels():
    if _numba_kernels is None:
        use_numba(True)
    return _numba_kernels or None


def dequantize_rows(xq: np.ndarray, xs: np.ndarray, gs: int) -> np.ndarray:
    n_rows, n = xq.shape
    return (xq.reshape(n_rows, n // gs, gs).astype(np.float32) * xs[:, :, None]).reshape(n_rows, n)


def _q8_gemm(x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
    """Many rows: quantize-dequantize the activations (runq.c's rounding of x) and multiply in fp32."""
    gs = ws[0].group_size
    xq, xs = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), gs)
    xd = dequantize_rows(xq.reshape(x.shape), xs, gs)
    return [xd @ w.dequantize().T for w in ws]


def matmul_many(x: np.ndarray, ws: Sequence) -> list[np.ndarray]:
    """x @ w.T for each w in `ws` (all fp32 or all Q8_0 with one group size), fast path."""
    if not isinstance(ws[0], QTensor):
        big = x.shape[0] <= F32_NUMBA_MAX_ROWS and sum(w.size for w in ws) >= F32_NUMBA_MIN_ELEMENTS
        nk = numba_kernels() if big else None
        return nk.matmul_f32_many(x, ws) if nk is not None else [x @ w.T for w in ws]
    if x.shape[0] >= Q8_GEMM_MIN_ROWS:
        return _q8_gemm(x, ws)
    nk = numba_kernels()
    if nk is None:
        return [matmul_q8(x, w) for w in ws]
    return nk.matmul_q8_many(x, ws)


def matmul(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T on the fast path."""
    return matmul_many(x, [w])[0]
