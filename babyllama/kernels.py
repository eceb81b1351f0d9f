"""Matrix products for fp32 and Q8_0 weights: `matmul(x, w)` computes x @ w.T for w in nn.Linear layout.

Two paths, the same numbers:
- plain (`matmul_plain`): the readable reference. fp32 is one BLAS call; Q8_0 is runq.c's scheme in NumPy
  (activations quantized per group like the weights, int8 products summed per group, scaled by
  w_scale * x_scale). Slow for Q8_0, but it is what every fast path is tested against.
- fast (`matmul_many`): several matrices that read the same input (wq/wk/wv, w1/w3) in one call, no
  copy of the weights. A few rows of x (decode, batched decode) go through a compiled kernel backend:
    native  C kernels (csrc/kernels.c) built on first use with the system compiler (kernels_native.py):
            AVX2 byte multiply-adds for Q8_0, blocked FMA for fp32, OpenMP threads;
    numba   the same products in numba (`pip install babyllama[fast]`), for machines without a compiler;
    numpy   BLAS for fp32 and the reference for Q8_0.
  The best available is chosen on first use; `use_backend` or BABYLLAMA_KERNELS=native|numba|numpy
  picks one. Many rows (a prefill) are compute-bound and go to BLAS sgemm; for Q8_0 the weights and
  activations are dequantized first: the same sum as runq.c's (exact int8 products, per-group scales),
  only rounded differently, and far faster in sgemm than in an int8 loop without VNNI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .formats import QTensor

# Rows at or above which a Q8_0 product is done as dequantize + sgemm instead of the int8 kernel. The native
# kernel reads each weight row once for 8 tokens at a time, so it keeps the lead longer: measured on whole
# prompts (fresh processes), it wins up to 32 tokens on every tinyllamas shape (110M at 16 tokens: 64 ms vs
# 206 dequantized; at 32: 108 vs 152), ties at 48 on 42M and loses there on 110M (178 vs 151).
Q8_GEMM_MIN_ROWS = 16
Q8_NATIVE_GEMM_MIN_ROWS = 48
# Rows up to which an fp32 product uses the backend's kernel instead of BLAS. The native kernels take
# every such product: mixing their OpenMP threads with OpenBLAS's in one decode step makes the two pools'
# spinning threads fight over the cores (a 768x768 gemv took 3 ms instead of 0.1). numba takes only
# products of at least F32_NUMBA_MIN_ELEMENTS weights (summed over one call's matrices): below ~1M BLAS is
# as fast, and a small model then never imports numba (~1.5 s).
F32_KERNEL_MAX_ROWS = 8
F32_NUMBA_MIN_ELEMENTS = 1 << 20

BACKENDS = ("native", "numba", "numpy")
_backend: tuple[str, object] | None = None  # (name, kernels object or None for numpy), chosen on first use


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


def _load(name: str):
    """The kernels object of backend `name`, or None when it cannot be used here."""
    if name == "native":
        from . import kernels_native
        return kernels_native.load()
    if name == "numba":
        try:
            from . import kernels_numba
        except ImportError:  # numba is an optional extra
            return None
        return kernels_numba
    return None


def use_backend(name: str | None = None) -> str:
    """Select the kernel backend ("native", "numba" or "numpy"); None: $BABYLLAMA_KERNELS if set, else the
    first that works here. A named backend that is unavailable falls back down the list. Returns the
    name in use."""
    global _backend
    wanted = name or os.environ.get("BABYLLAMA_KERNELS") or BACKENDS[0]
    if wanted not in BACKENDS:
        raise ValueError(f"unknown kernel backend {wanted!r}; choose from {', '.join(BACKENDS)}")
    for candidate in BACKENDS[BACKENDS.index(wanted):]:
        kernels = _load(candidate)
        if kernels is not None or candidate == "numpy":
            _backend = (candidate, kernels)
            return candidate
    raise AssertionError("unreachable: numpy is always available")


def backend() -> tuple[str, object]:
    if _backend is None:
        use_backend()
    return _backend


def dequantize_rows(xq: np.ndarray, xs: np.ndarray, gs: int) -> np.ndarray:
    n_rows, n = xq.shape
    return (xq.reshape(n_rows, n // gs, gs).astype(np.float32) * xs[:, :, None]).reshape(n_rows, n)


def _q8_gemm(x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
    """Many rows: quantize-dequantize the activations (runq.c's rounding of x) and multiply in fp32."""
    gs = ws[0].group_size
    xq, xs = quantize_rows(np.ascontiguousarray(x, dtype=np.float32), gs)
    xd = dequantize_rows(xq.reshape(x.shape), xs, gs)
    name, native = backend()
    dequantize = native.dequantize if name == "native" else QTensor.dequantize
    return [xd @ dequantize(w).T for w in ws]


def matmul_many(x: np.ndarray, ws: Sequence) -> list[np.ndarray]:
    """x @ w.T for each w in `ws` (all fp32 or all Q8_0 with one group size), fast path."""
    rows = x.shape[0]
    if not isinstance(ws[0], QTensor):
        if rows <= F32_KERNEL_MAX_ROWS:
            name, kernels = backend()
            if name == "native" or (name == "numba" and sum(w.size for w in ws) >= F32_NUMBA_MIN_ELEMENTS):
                return kernels.matmul_f32_many(x, ws)
        return [x @ w.T for w in ws]
    name, kernels = backend()
    if rows >= (Q8_NATIVE_GEMM_MIN_ROWS if name == "native" else Q8_GEMM_MIN_ROWS):
        return _q8_gemm(x, ws)
    if kernels is None:
        return [matmul_q8(x, w) for w in ws]
    return kernels.matmul_q8_many(x, ws)


def matmul(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T on the fast path."""
    return matmul_many(x, [w])[0]
