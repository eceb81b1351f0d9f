"""The numba backend (`pip install babyllama[fast]`), for machines without a C compiler: compiled fp32, fp16,
bf16 and runq.c-Q8_0 products; everything else as the NumPy backend does it. Importing this module without numba
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

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import TypeGuard

# Threads sleep between parallel regions instead of spinning: on a machine whose cores are shared
# (oversubscribed), spinning waiters starve the workers and decode gets several times slower. Set
# OMP_WAIT_POLICY=active to trade that robustness for slightly lower latency on an idle machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

from .errors import say  # noqa: E402
from .formats import BF16Tensor, Matrix, QTensor, dense, is_fp32, is_quantized  # noqa: E402
from .kernels_base import QUANT_GEMM_MIN_ROWS, NumpyKernels, matmul_quantized, quantized_gemm  # noqa: E402

# Rows up to which an fp32 product may use the numba kernel instead of BLAS, and the size (weights summed over
# one call's matrices) from which it does: below ~1M BLAS is as fast, and a small model then never compiles
# the kernel (~1.5 s).
F32_KERNEL_MAX_ROWS = 8
F32_MIN_ELEMENTS = 1 << 20


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


@njit(parallel=True, fastmath=True, cache=True)
def _matmul1(xq, xs, wq, ws, gs, out):
    n_tok, n_groups = xq.shape[0], xq.shape[1] // gs
    for i in prange(wq.shape[0]):
        for t in range(n_tok):
            acc = np.float32(0.0)
            for g in range(n_groups):
                dot = np.float32(0.0)
                base = g * gs
                for k in range(gs):
                    dot += np.float32(wq[i, base + k]) * xq[t, base + k]
                acc += dot * ws[i, g] * xs[t, g]
            out[t, i] = acc


@njit(cache=True)
def _matmul3(xq, xs, aq, as_, bq, bs, cq, cs, gs, oa, ob, oc):
    # one call from Python for up to three matrices (an empty one costs nothing)
    _matmul1(xq, xs, aq, as_, gs, oa)
    _matmul1(xq, xs, bq, bs, gs, ob)
    _matmul1(xq, xs, cq, cs, gs, oc)


@njit(parallel=True, fastmath=True, cache=True)
def _matmul1_f32(x, w, out):
    for i in prange(w.shape[0]):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for k in range(w.shape[1]):
                acc += w[i, k] * x[t, k]
            out[t, i] = acc


# every IEEE fp16 bit pattern's fp32 bits (256 KB, NumPy's exact conversion): numba has no float16 on CPUs, and a
# lookup widens a weight exactly without the branches that subnormals and infinities take in bit arithmetic
F16_TO_F32_BITS = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


@njit(parallel=True, fastmath=True, cache=True)
def _matmul1_16bit(x, w, bf16, out, f16_bits):
    """x @ w.T for a matrix of 16-bit values given as their uint16 bits (bfloat16 where bf16, else IEEE fp16):
    each row widened to fp32 into a small buffer (exactly) and then summed as _matmul1_f32 sums, so the
    matrix is read at its own size instead of converted whole at every product. `f16_bits`: F16_TO_F32_BITS,
    passed in (a default array is typed anew in each process, so numba's disk cache never found the function)."""
    rows, n = w.shape
    n_blocks = (rows + 15) // 16
    for blk in prange(n_blocks):
        bits = np.empty(n, dtype=np.uint32)
        row = bits.view(np.float32)
        for i in range(blk * 16, min(rows, blk * 16 + 16)):
            if bf16:
                for k in range(n):
                    bits[k] = np.uint32(w[i, k]) << 16
            else:
                for k in range(n):
                    bits[k] = f16_bits[w[i, k]]
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for k in range(n):
                    acc += row[k] * x[t, k]
                out[t, i] = acc


def _bits16(w: Matrix) -> tuple[np.ndarray, bool]:
    """A 16-bit matrix's uint16 bits (contiguous) and whether they are bfloat16."""
    if isinstance(w, BF16Tensor):
        return np.ascontiguousarray(w.bits), True
    return np.ascontiguousarray(w).view(np.uint16), False


def matmul_dense_many(x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
    """x @ w.T for dense matrices (fp32, or fp16/bf16 read at their own size), a few rows of x: decode is
    memory-bound and this streams each weight once like BLAS's gemv, but its idle threads sleep (see
    OMP_WAIT_POLICY above) where OpenBLAS's spin, which on a shared machine made 2-thread BLAS decode several
    times slower than 1 thread."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = []
    for w in ws:
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        if is_fp32(w):
            with _one_launch():
                _matmul1_f32(x, w, out)
        else:
            bits, bf16 = _bits16(w)
            with _one_launch():
                _matmul1_16bit(x, bits, bf16, out, F16_TO_F32_BITS)
        outs.append(out)
    return outs


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
    with _one_launch():
        _matmul3(xq, xs, mats[0][0], mats[0][1], mats[1][0], mats[1][1], mats[2][0], mats[2][1], gs, o[0], o[1], o[2])
    return outs


_launching = threading.Lock()


def _one_launch() -> contextlib.AbstractContextManager:
    """What a parallel function's launch holds: numba's workqueue threading layer (where neither TBB nor OpenMP
    loads) aborts the process when two Python threads launch at once ("Concurrent access has been detected"),
    so there launches take turns, as they do until the first has chosen the layer."""
    try:
        threadsafe = numba.threading_layer() != "workqueue"
    except ValueError:  # no launch yet
        threadsafe = False
    return contextlib.nullcontext() if threadsafe else _launching


def gnu_openmp_started() -> bool:
    """Whether numba's parallel functions have run in this process on GNU OpenMP's threads, which a forked child
    cannot use: numba stops a child that launches one with SIGTERM ("fork() called from a process already using
    GNU OpenMP, this is unsafe"), and multiprocessing's fork pools then wait forever for the lost task."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # nothing parallel has run: a child starts the threads of its own
        return False
    if layer != "omp":  # TBB and the workqueue survive a fork
        return False
    from numba.np.ufunc import omppool  # type: ignore[attr-defined]  # a compiled module without stubs

    return omppool.openmp_vendor == "GNU"


_forked_from_openmp = False  # this process is a fork of one whose GNU OpenMP threads had started
_said_forked = False


def _after_fork_in_child() -> None:
    global _forked_from_openmp, _launching
    _forked_from_openmp = _forked_from_openmp or gnu_openmp_started()
    _launching = threading.Lock()  # a launch in another thread of the parent does not finish here


os.register_at_fork(after_in_child=_after_fork_in_child)


def _parallel_unsafe() -> bool:
    """Whether numba's parallel functions cannot run here (a forked child of a GNU OpenMP process): the products
    then go to NumPy, said once on stderr, rather than the process being killed."""
    global _said_forked
    if _forked_from_openmp and not _said_forked:
        _said_forked = True
        say("babyllama: numba's OpenMP threads do not survive a fork; this forked process multiplies with NumPy "
            "instead (start processes with multiprocessing's 'spawn' to keep numba)")
    return _forked_from_openmp


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]


def _all_fp32(ws: Sequence[Matrix]) -> TypeGuard[Sequence[np.ndarray]]:
    return all(is_fp32(w) for w in ws)


def _all_q8(ws: Sequence[Matrix]) -> TypeGuard[Sequence[QTensor]]:
    return all(isinstance(w, QTensor) for w in ws)


class NumbaKernels(NumpyKernels):
    """numba's products for decode steps on fp32 (large matrices), fp16 and bf16, and runq.c's Q8_0; NumPy for
    the rest (llama.cpp's block types take the reference arithmetic)."""

    name = "numba"

    def __init__(self, f32_min_elements: int = F32_MIN_ELEMENTS):
        self.f32_min_elements = f32_min_elements

    def threads(self) -> int:
        return numba.get_num_threads()

    def matmul_many(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        if _parallel_unsafe():
            return super().matmul_many(x, ws)
        rows = x.shape[0]
        if not any(is_quantized(w) for w in ws):
            # fp16/bf16 take the kernel at any size: BLAS would need them converted whole at every product
            if rows <= F32_KERNEL_MAX_ROWS and (not _all_fp32(ws) or sum(w.size for w in ws) >= self.f32_min_elements):
                return matmul_dense_many(x, ws)
            return [x @ dense(w).T for w in ws]
        if rows >= QUANT_GEMM_MIN_ROWS:
            return [quantized_gemm(x, [w], self.dequantize)[0] if is_quantized(w) else x @ dense(w).T for w in ws]
        if _all_q8(ws) and len({w.group_size for w in ws}) == 1:
            return matmul_q8_many(x, ws)
        return [matmul_quantized(x, w) if is_quantized(w) else x @ dense(w).T for w in ws]
