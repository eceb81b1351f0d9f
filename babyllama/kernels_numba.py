"""The compiled Q8_0 kernel (numba; `pip install babyllama[fast]`). Importing this module without numba
raises ImportError, and kernels.py falls back to NumPy.

runq.c's product, row by row: the activations are quantized per group of `gs` values (scale = max|x|/127,
q = round(x/scale)), then for each output row i
    out[i] = sum_g  w_scale[i,g] * x_scale[g] * sum_{k in g} w_q[i,k] * x_q[k].
The inner sum is done in fp32 on int8 values converted to float: every product is an integer below
127² and a group's sum stays below 2^24, so it is exact, and the loop vectorizes to AVX2 fused
multiply-adds (numba widens int8·int8 to int64 lanes, which is 4x slower). Rows are split across threads
(numba's prange); up to three matrices sharing one input (wq/wk/wv, w1/w3) go in one parallel launch.
Compiled functions are cached on disk (cache=True), so only the very first run pays the compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
from numba import njit, prange

from .formats import QTensor


@njit(cache=True)
def quantize_acts(x, gs):
    """(N, n) float32 -> quantized values as float32 (N, n) and scales (N, n/gs); matches quantize_rows."""
    n_rows, n = x.shape
    n_groups = n // gs
    q = np.empty((n_rows, n), dtype=np.float32)
    s = np.empty((n_rows, n_groups), dtype=np.float32)
    for t in range(n_rows):
        for g in range(n_groups):
            amax = np.float32(0.0)
            for k in range(g * gs, (g + 1) * gs):
                amax = max(amax, abs(x[t, k]))
            scale = amax / np.float32(127.0)
            s[t, g] = scale
            safe = scale if scale != 0 else np.float32(1.0)
            for k in range(g * gs, (g + 1) * gs):
                q[t, k] = np.rint(x[t, k] / safe)
    return q, s


@njit(fastmath=True, cache=True)
def _row(xq, xs, wq, ws, gs, i, t):
    acc = np.float32(0.0)
    for g in range(wq.shape[1] // gs):
        dot = np.float32(0.0)
        base = g * gs
        for k in range(base, base + gs):
            dot += np.float32(wq[i, k]) * xq[t, k]
        acc += dot * ws[i, g] * xs[t, g]
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _matmul3(xq, xs, aq, as_, bq, bs, cq, cs, gs, oa, ob, oc):
    na, nb, nc = aq.shape[0], bq.shape[0], cq.shape[0]
    n_tok = xq.shape[0]
    for r in prange(na + nb + nc):
        if r < na:
            for t in range(n_tok):
                oa[t, r] = _row(xq, xs, aq, as_, gs, r, t)
        elif r < na + nb:
            for t in range(n_tok):
                ob[t, r - na] = _row(xq, xs, bq, bs, gs, r - na, t)
        else:
            for t in range(n_tok):
                oc[t, r - na - nb] = _row(xq, xs, cq, cs, gs, r - na - nb, t)


def matmul_q8_many(x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
    """x @ w.T for up to three Q8_0 matrices of one group size, in one parallel launch."""
    if len(ws) > 3:
        return [o for i in range(0, len(ws), 3) for o in matmul_q8_many(x, ws[i:i + 3])]
    gs = ws[0].group_size
    xq, xs = quantize_acts(np.ascontiguousarray(x, dtype=np.float32), gs)
    outs = [np.empty((x.shape[0], w.q.shape[0]), dtype=np.float32) for w in ws]
    # unused operands are empty slices of the first matrix: same numba type, so one compiled version
    empty_q, empty_s = ws[0].q[:0], ws[0].s[:0]
    empty_o = outs[0][:, :0]
    mats = [(w.q, w.s) for w in ws] + [(empty_q, empty_s)] * (3 - len(ws))
    o = outs + [empty_o] * (3 - len(ws))
    _matmul3(xq, xs, mats[0][0], mats[0][1], mats[1][0], mats[1][1], mats[2][0], mats[2][1], gs, o[0], o[1], o[2])
    return outs


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
