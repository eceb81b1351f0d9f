"""Matrix products for fp32 and Q8_0 weights: `matmul(x, w)` computes x @ w.T for w in nn.Linear layout.

The Q8_0 path follows runq.c: activations are quantized per group with the same scheme as the weights,
int8 products are summed per group and scaled by w_scale * x_scale.
"""

from __future__ import annotations

import numpy as np

from .formats import QTensor


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


def matmul(x: np.ndarray, w) -> np.ndarray:
    if isinstance(w, QTensor):
        return matmul_q8(x, w)
    return x @ w.T
