"""The NumPy inference engine: Llama 2's forward pass over a batch of tokens with a KV cache.

One call, `Engine.forward(tokens, positions, cache, slots)`, serves every caller: a prompt (many tokens of one
sequence: causal attention inside the chunk), a decode step (one token each of several sequences) or a
mix of both, as a batching server schedules them. Each token names its cache slot (which sequence it
belongs to) and its position in that sequence. The engine knows nothing of files, tokenizers or sampling.

Math, per layer (x is the residual stream, one row per token):
    h   = x + Wo · attention(RoPE(Wq·rms(x)), RoPE(Wk·rms(x)), Wv·rms(x))
    x'  = h + W2 · (silu(W1·rms(h)) * W3·rms(h))          (SwiGLU feed-forward)
rms(x) = x / sqrt(mean(x²) + eps) * g;  RoPE rotates pairs (2i, 2i+1) of each head by pos · theta^(-2i/hs).
"""

from __future__ import annotations

import os
import threading
import weakref

import numpy as np
from numpy.typing import ArrayLike

from . import kernels
from .config import KV_CACHE_TYPES, ModelArgs
from .formats import Weights
from .kernels_base import (
    Kernels,
    apply_rope,
    check_step_lengths,
    kv_q8_dtype,
    kv_read,
    kv_write,
    segments,
)
from .memory import allocation_failed, check_fits, small_pages, zeros_mapped

# `kv_cache` settings: "f32", "f16" and "q8_0" name the cache's rows; "auto" is f16 for quantized weights (Q8_0,
# Q4_0: their products round weights and activations to 8- or 4-bit steps, far coarser than fp16's 11-bit
# significands) and f32 otherwise (fp32 models compute exactly what llama2.c's run.c computes). q8_0 (llama.cpp's
# -ctk/-ctv q8_0) holds a head's row of keys or values as int8 values with one fp32 scale per 32: about half of
# fp16's bytes, for long contexts and for decode that reads the cache at memory speed.


def kv_cache_dtype(weights: Weights, kv_cache: str = "auto") -> np.dtype:
    """The cache row type that setting `kv_cache` gives for `weights`."""
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"unknown KV cache type {kv_cache!r} (choose {', '.join(KV_CACHE_TYPES)})")
    if kv_cache == "auto":
        kv_cache = "f16" if weights.quantized else "f32"
    if kv_cache == "q8_0":
        return kv_q8_dtype(weights.args.head_size)
    return np.dtype(np.float16 if kv_cache == "f16" else np.float32)


def kv_cache_name(dtype: np.dtype) -> str:
    """The `kv_cache` setting that names a cache row type: f32, f16 or q8_0."""
    return "q8_0" if dtype.names else {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}[np.dtype(dtype)]


def kv_cache_layout(args: ModelArgs, n_slots: int, seq_len: int, dtype: np.dtype) -> tuple[tuple[int, ...], int]:
    """A KVCache's shape (of its keys, and of its values) and the bytes of both, for rows of `dtype`."""
    flat = dtype == kv_q8_dtype(args.head_size)  # a Q8_0 row is one element of its structured dtype
    shape = (args.n_layers, n_slots, args.n_kv_heads, seq_len) + (() if flat else (args.head_size,))
    return shape, 2 * dtype.itemsize * int(np.prod(shape, dtype=np.float64))


class KVCache:
    """Keys and values of every layer for `n_slots` sequences: arrays (L, slots, kv_heads, seq_len) of rows of
    head_size values, so that one head's keys are a contiguous (positions, head_size) matrix for attention's
    products. `dtype` float32 (arrays (..., seq_len, head_size)), float16 (half the memory and half the bytes
    attention reads per token), or Q8_0 rows (kernels_base.kv_q8_dtype, arrays (..., seq_len) of them: about a
    quarter of float32's bytes): values are rounded to it as they are written (kv_write), and read back as
    float32 for the arithmetic (kv_read).

    The cache is pages mapped for it alone (memory.zeros_mapped), untouched until written, in 4 KiB pages
    (memory.small_pages: with 2 MB huge pages the first position written in every head's region would make
    all of it resident), so a cache costs memory only as positions fill (decode speed the same either way,
    measured); callers size `seq_len` by the positions they will use, not by the header's context, and a
    cache that could never fit in memory is refused up front."""

    def __init__(self, args: ModelArgs, n_slots: int = 1, seq_len: int | None = None,
                 dtype: np.dtype | type[np.floating] = np.float32):
        dtype = np.dtype(dtype)
        q8 = kv_q8_dtype(args.head_size)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16), q8):
            raise ValueError(f"a KV cache holds float32, float16 or Q8_0 rows ({q8}), not {dtype}")
        self.seq_len = seq_len or args.max_seq_len
        shape, nbytes = kv_cache_layout(args, n_slots, self.seq_len, dtype)
        what = f"a KV cache of {self.seq_len:,} positions x {n_slots} sequence(s)"
        hint = ("size it for fewer positions (run -n, eval --seq-len) or sequences (run --parallel), or choose a "
                "smaller --kv-cache (f16, or q8_0: about half of f16)")
        check_fits(nbytes, what, hint)
        try:
            self.k = zeros_mapped(shape, dtype)
            self.v = zeros_mapped(shape, dtype)
        except MemoryError:
            raise allocation_failed(what, nbytes, hint) from None
        small_pages(self.k)
        small_pages(self.v)

    @property
    def dtype(self) -> np.dtype:
        return self.k.dtype

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]


def rope_tables(head_size: int, n_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * theta^(-2i/head_size) for every position and pair i: two (n_positions, hs/2) arrays."""
    freqs = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# Steps of at most this many tokens (decode, batched decode, speculative verification), and batched decode steps
# of any size (every token a sequence of its own), run their layers in one call where the backend has one
# (native: forward_step), so that a sequence decoded alone or in a batch runs the same kernels; larger prompts
# are compute-bound and go through BLAS (kernels.py), attention included.
FUSED_MAX_TOKENS = 8


_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _unlock_in_child() -> None:
    """A forked child gets fresh locks: a thread that held one (building a step plan, which regroups a quantized
    model's matrices) does not exist there, and the child's first step would wait for it forever. What the lock
    guards stays consistent: the plan is set only once built, and each matrix is regrouped whole."""
    for engine in list(_engines):
        engine._tables_lock = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


class Engine:
    """`plain=True` selects the unoptimized reference path (kernels_base.PlainKernels: one product per matrix,
    quantized products in NumPy): the baseline the fast path is tested and benchmarked against. The fast path
    runs on the backend kernels.py chooses, through the `Kernels` protocol only: products that read the same
    input (wq/wk/wv, w1/w3) in one call, and a decode-sized step in one call where the backend has one
    (native: the embedding, every layer as in `_block` with the norms, the SwiGLU gate and the residual
    additions inside the products, then the classifier), since Python's per-call overhead otherwise rivals a
    small model's arithmetic. `kernels=` pins a backend object (tests use it to run two builds side by side).
    Weights are never copied (they are the mapped file, or the buffer it was read into). `kv_cache` ("auto",
    "f32", "f16", "q8_0"; see config.KV_CACHE_TYPES) sets the row type of the caches `new_cache` makes (`kv_dtype`)."""

    def __init__(self, weights: Weights, plain: bool = False, kernels: Kernels | None = None,
                 kv_cache: str = "auto"):
        self.w = weights
        self.args = weights.args
        self.args.validate()
        self.plain = plain
        self.kv_dtype = kv_cache_dtype(weights, kv_cache)
        self._pinned = kernels
        self.cos = self.sin = np.empty((0, self.args.head_size // 2), dtype=np.float32)
        self._plan_for: Kernels | None = None
        self._step_plan: object | None = None
        # threads sharing the engine (one loaded model): a table grown by one while another builds its step
        # plan would leave that plan on the old, shorter tables (a refused position)
        self._tables_lock = threading.Lock()
        _engines.add(self)

    def __getstate__(self) -> dict:
        """What a pickled engine carries (a model passed to a worker of multiprocessing's spawn or forkserver
        start methods): the weights and settings. The lock, the RoPE tables and the backend's step plan (C
        pointers into this process) are made again where it is unpickled."""
        state = self.__dict__.copy()
        del state["_tables_lock"]
        state.update(cos=self.cos[:0], sin=self.sin[:0], _plan_for=None, _step_plan=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tables_lock = threading.Lock()
        _engines.add(self)

    def _ensure_rope(self, n_positions: int) -> None:
        """RoPE tables for positions [0, n_positions) at least: built as far as the caches in use reach (grown
        by doubling), not for the header's seq_len, which may be far larger than any run needs."""
        if n_positions <= len(self.cos):
            return
        a = self.args
        n = min(a.max_seq_len, max(n_positions, 2 * len(self.cos)))
        check_fits(4 * 8 * n * (a.head_size // 2), f"RoPE tables for {n:,} positions",
                   "size the run for fewer positions (run -n, eval --seq-len)")
        self.cos, self.sin = rope_tables(a.head_size, n, a.rope_theta)
        self._plan_for = None  # the step plan points at the old tables

    @property
    def kernels(self) -> Kernels:
        """The backend this engine runs on now."""
        if self.plain:
            return kernels.PLAIN
        return self._pinned or kernels.backend()

    def new_cache(self, n_slots: int = 1, seq_len: int | None = None) -> KVCache:
        """A cache for `n_slots` sequences of up to `seq_len` positions (default: the model's context), of the
        engine's `kv_dtype`."""
        cache = KVCache(self.args, n_slots, min(seq_len or self.args.max_seq_len, self.args.max_seq_len),
                        self.kv_dtype)
        with self._tables_lock:
            self._ensure_rope(cache.seq_len)
        return cache

    def forward(self, tokens: ArrayLike, positions: ArrayLike, cache: KVCache, slots: ArrayLike | None = None,
                logits: str = "all") -> np.ndarray:
        """Run `tokens` (N,) at `positions` (N,) through the model, writing their keys/values into
        `cache` at `slots` (N,; default slot 0). A token attends to its slot's cached positions up to its
        own. Returns logits (N, vocab) for logits="all", or only for the last token of each run of
        consecutive positions (one row per sequence) with logits="last"."""
        a, w, k = self.args, self.w, self.kernels
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        slots = np.zeros_like(tokens) if slots is None else np.asarray(slots, dtype=np.int64).reshape(-1)
        check_step_lengths(tokens, positions, slots, logits)
        runs = segments(slots, positions)
        rows = [end - 1 for _, end, _, _ in runs] if logits == "last" else range(len(tokens))
        with self._tables_lock:  # the plan and the tables it points at, consistent (tables only grow)
            self._ensure_rope(min(cache.seq_len, a.max_seq_len))
            plan = self._plan(k)  # made before a first prompt too: it puts Q4_0 matrices in the order kernels read
        if plan is not None and (len(tokens) <= FUSED_MAX_TOKENS or len(runs) == len(tokens)):
            return k.forward_step(plan, tokens, positions, slots, cache.k, cache.v, rows)  # checks the indices
        for values, end, what in ((tokens, a.vocab_size, "token ids"), (positions, cache.seq_len, "positions"),
                                  (slots, cache.n_slots, "slots")):  # NumPy would wrap negative indices
            if values.min(initial=0) < 0 or values.max(initial=0) >= end:
                raise ValueError(f"{what} must lie in [0, {end})")
        cos, sin = self.cos[positions], self.sin[positions]
        x = k.embed(w.tok_embeddings, tokens)
        for layer in range(a.n_layers):
            self._block(k, x, layer, cache, slots, positions, cos, sin)
        if logits == "last":
            x = x[rows]
        return k.matmul_many(k.rmsnorm(x, w.rms_final, a.norm_eps), [w.wcls])[0]

    def shift_cache(self, cache: KVCache, slot: int, start: int, delta: int, end: int) -> None:
        """Context shift without recomputation: the entries of `slot` at positions [start + delta, end) move
        to [start, end - delta) in every layer, keys rotated back by delta positions (RoPE: R(p - d) = R(-d)
        R(p)); what lay in [start, start + delta) is dropped. Keys are rotated in fp32 and stored back in the
        cache's type."""
        kc, vc = cache.k[:, slot], cache.v[:, slot]  # (L, kv_heads, seq_len) rows
        keys = kv_read(kc[:, :, start + delta:end])
        rows = keys.reshape(-1, 1, self.args.head_size)
        cos = np.broadcast_to(self.cos[delta], (len(rows), len(self.cos[delta])))
        sin = np.broadcast_to(-self.sin[delta], cos.shape)  # rotation by -delta
        rotated = apply_rope(rows, cos, sin).reshape(keys.shape)
        kv_write(kc, (slice(None), slice(None), slice(start, end - delta)), rotated)
        vc[:, :, start:end - delta] = vc[:, :, start + delta:end].copy()

    def _block(self, k: Kernels, x, layer, cache, slots, positions, cos, sin) -> None:
        """One transformer block, x updated in place, through the backend's separate operations (the plain
        path, prompts)."""
        a, w = self.args, self.w
        q, kk, v = k.matmul_many(k.rmsnorm(x, w.rms_att[layer], a.norm_eps), [w.wq[layer], w.wk[layer], w.wv[layer]])
        n, hs = x.shape[0], a.head_size
        att = k.attention(q.reshape(n, a.n_heads, hs), kk.reshape(n, a.n_kv_heads, hs),
                          v.reshape(n, a.n_kv_heads, hs), cos, sin, cache.k[layer], cache.v[layer], slots, positions)
        x += k.matmul_many(att, [w.wo[layer]])[0]
        h1, h3 = k.matmul_many(k.rmsnorm(x, w.rms_ffn[layer], a.norm_eps), [w.w1[layer], w.w3[layer]])
        x += k.matmul_many(k.swiglu(h1, h3), [w.w2[layer]])[0]

    def _plan(self, k: Kernels) -> object | None:
        """The backend's description of this model for its one-call step (None: it has none), made once per
        backend object."""
        if self._plan_for is not k:
            self._plan_for, self._step_plan = k, k.step_plan(self.w, self.cos, self.sin)
        return self._step_plan
