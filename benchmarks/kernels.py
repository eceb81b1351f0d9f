"""Candidate kernels for decode on the 110M shape (dim 768, hidden 2048, 12 layers, vocab 32000): the
measurements behind the choices in babyllama/kernels.py. Prints the median ms of one token's worth of
matrix-vector products (all 12 layers + classifier) for each candidate, and the implied tok/s bound.

    python benchmarks/kernels.py [--repeats 9] [--threads N]

fp32: the native C kernel (chosen) vs `x @ w.T` through OpenBLAS vs `np.dot(w, x)` vs wq/wk/wv and w1/w3
fused into single matrices (a copy at load) vs the numba kernel. Q8_0: the native C kernel (VNNI or AVX2
byte multiply-adds, chosen) and Q4_0 (llama.cpp's blocks) vs the numba kernel (per-group fp32 dot of int8
values, the fallback without a compiler) vs PyTorch's weight-only int8 CPU kernel
(`torch._weight_int8pack_mm`, per-row scales only: not runq.c's per-group Q8_0, so it would not reproduce our
numerics; timed as an alternative not taken).
The random weights live in process memory here (huge pages), so the figures are upper bounds for a
memory-mapped model.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    from babyllama.threads import configure  # first: thread counts and spin-waits precede NumPy's import

    configure(args.threads)
    import numpy as np

    from babyllama.formats import quantize_q80

    rng = np.random.default_rng(0)
    d, h, L, V = 768, 2048, 12, 32000
    shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (h, d), "w2": (d, h), "w3": (h, d)}
    W = {n: [rng.standard_normal(s, dtype=np.float32) * 0.02 for _ in range(L)] for n, s in shapes.items()}
    cls = rng.standard_normal((V, d), dtype=np.float32) * 0.02
    x = rng.standard_normal((1, d), dtype=np.float32)
    xh = rng.standard_normal((1, h), dtype=np.float32)

    def timed(name: str, fn) -> None:
        fn()
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        ms = 1000 * float(np.median(ts))
        print(f"{name:48s} {ms:8.2f} ms/token  ({1000 / ms:6.1f} tok/s bound)")

    def fp32_xwt():
        for i in range(L):
            for n in ("wq", "wk", "wv", "wo", "w1", "w3"):
                x @ W[n][i].T
            xh @ W["w2"][i].T
        x @ cls.T

    def fp32_dot():
        for i in range(L):
            for n in ("wq", "wk", "wv", "wo", "w1", "w3"):
                np.dot(W[n][i], x[0])
            np.dot(W["w2"][i], xh[0])
        np.dot(cls, x[0])

    qkv = [np.concatenate([W["wq"][i], W["wk"][i], W["wv"][i]]) for i in range(L)]
    w13 = [np.concatenate([W["w1"][i], W["w3"][i]]) for i in range(L)]

    def fp32_fused():
        for i in range(L):
            x @ qkv[i].T
            x @ W["wo"][i].T
            x @ w13[i].T
            xh @ W["w2"][i].T
        x @ cls.T

    from babyllama import kernels_native
    native = kernels_native.load()

    def grouped(mm, weights, classifier):
        """One token's products as the engine groups them: wq/wk/wv, wo, w1/w3, w2, classifier."""
        def run():
            for i in range(L):
                mm(x, [weights["wq"][i], weights["wk"][i], weights["wv"][i]])
                mm(x, [weights["wo"][i]])
                mm(x, [weights["w1"][i], weights["w3"][i]])
                mm(xh, [weights["w2"][i]])
            mm(x, [classifier])
        return run

    if native is not None:
        timed("fp32 native C kernel, grouped calls (chosen)", grouped(native.matmul, W, cls))
    else:
        print("no C compiler: native candidates skipped")
    timed("fp32 x @ w.T (OpenBLAS)", fp32_xwt)
    timed("fp32 np.dot(w, x)", fp32_dot)
    timed("fp32 qkv + w13 fused (copies at load)", fp32_fused)

    Q = {n: [quantize_q80(m, 64) for m in ms] for n, ms in W.items()}
    qcls = quantize_q80(cls, 64)

    if native is not None:
        timed("Q8_0 native C kernel, grouped calls (chosen)", grouped(native.matmul, Q, qcls))
        from babyllama.quant import quantize_q4_0

        Q4 = {n: [quantize_q4_0(m) for m in ms] for n, ms in W.items()}
        timed("Q4_0 native C kernel, grouped calls (chosen)", grouped(native.matmul, Q4, quantize_q4_0(cls)))
    try:
        from babyllama import kernels_numba
        timed("fp32 numba kernel, grouped launches", grouped(kernels_numba.matmul_dense_many, W, cls))
        timed("Q8_0 numba kernel, grouped launches (fallback)", grouped(kernels_numba.matmul_q8_many, Q, qcls))
    except ImportError:
        print("numba absent: numba candidates skipped")
    try:
        import torch
    except ImportError:
        print("torch absent: int8 weight-only candidate skipped")
        return
    tw = {n: [torch.from_numpy(q.q.copy()) for q in qs] for n, qs in Q.items()}
    ts = {n: [torch.from_numpy(q.s.mean(axis=1).astype(np.float32)) for q in qs] for n, qs in Q.items()}
    tcls, tcls_s = torch.from_numpy(qcls.q.copy()), torch.from_numpy(qcls.s.mean(axis=1).astype(np.float32))
    tx, txh = torch.from_numpy(x), torch.from_numpy(xh)

    @torch.inference_mode()
    def torch_int8():
        for i in range(L):
            for n in ("wq", "wk", "wv", "wo", "w1", "w3"):
                torch._weight_int8pack_mm(tx, tw[n][i], ts[n][i])
            torch._weight_int8pack_mm(txh, tw["w2"][i], ts["w2"][i])
        torch._weight_int8pack_mm(tx, tcls, tcls_s)

    timed(f"torch {torch.__version__} _weight_int8pack_mm (per-row)", torch_int8)


if __name__ == "__main__":
    main()
