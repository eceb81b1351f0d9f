"""The NumPy inference engine: Llama 2's forward pass over a batch of tokens with a KV cache.

One call, `Engine.forward(tokens, positions, slots)`, serves every caller: a prompt (many tokens of one
sequence: causal attention inside the chunk), a decode step (one token each of several sequences) or a
mix of both, as a batching server schedules them. Each token names its cache slot (which sequence it
belongs to) and its position in that sequence. The engine knows nothing of files, tokenizers or sampling.

Math, per layer (x is the residual stream, one row per token):
    h   = x + Wo · attention(RoPE(Wq·rms(x)), RoPE(Wk·rms(x)), Wv·rms(x))
    x'  = h + W2 · (silu(W1·rms(h)) * W3·rms(h))          (SwiGLU feed-forward)
rms(x) = x / sqrt(mean(x²) + eps) * g;  RoPE rotates pairs (2i, 2i+1) of each head by pos · theta^(-2i/hs).
"""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .formats import Weights
from .kernels import backend, matmul_many, matmul_plain


class KVCache:
    """Keys and values of every layer for `n_slots` sequences: arrays (L, slots, kv_heads, seq_len, head_size),
    so that one head's keys are a contiguous (positions, head_size) matrix for attention's products.

    np.zeros maps untouched pages lazily, so a large cache costs memory only as positions fill."""

    def __init__(self, args: ModelArgs, n_slots: int = 1, seq_len: int | None = None):
        self.seq_len = seq_len or args.max_seq_len
        shape = (args.n_layers, n_slots, args.n_kv_heads, self.seq_len, args.head_size)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]


def rope_tables(head_size: int, n_positions: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin of pos * theta^(-2i/head_size) for every position and pair i: two (n_positions, hs/2) arrays."""
    freqs = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    angles = np.outer(np.arange(n_positions, dtype=np.float64), freqs)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


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


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("ij,ij->i", x, x)[:, None] / np.float32(x.shape[-1])  # einsum: no x*x temporary
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def segments(slots: np.ndarray, positions: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Split a token batch into runs of one slot at consecutive positions: (start, end, slot, first_pos)."""
    n = len(slots)
    if n == 1:  # a decode step: the common case, without NumPy's per-call costs
        return [(0, 1, int(slots[0]), int(positions[0]))]
    breaks = np.flatnonzero((slots[1:] != slots[:-1]) | (positions[1:] != positions[:-1] + 1)) + 1
    bounds = [0, *breaks.tolist(), n]
    return [(a, b, int(slots[a]), int(positions[a])) for a, b in zip(bounds[:-1], bounds[1:])]


# Steps of at most this many tokens (decode, batched decode, speculative verification) run their layers in
# one native call; larger ones (prefill) are compute-bound and go through BLAS (kernels.py), attention included.
FUSED_MAX_TOKENS = 8


class Engine:
    """`plain=True` selects the unoptimized reference path (one product per matrix, Q8_0 in NumPy): the
    baseline the fast path is tested and benchmarked against. The fast path groups the products that read
    the same input (wq/wk/wv, w1/w3) into one kernel call and uses the compiled kernels when present
    (kernels.py). With the native (C) backend, a decode-sized step is one C call (`forward_step`: the
    embedding, every layer as in `_block` with the norms, the SwiGLU gate and the residual additions inside
    the products, then the classifier), since Python's per-call overhead otherwise rivals a small model's
    arithmetic.
    Weights are never copied (they stay memory-mapped unless loaded with mmap=False)."""

    def __init__(self, weights: Weights, plain: bool = False):
        self.w = weights
        self.args = weights.args
        self.args.validate()
        self.plain = plain
        self.cos, self.sin = rope_tables(self.args.head_size, self.args.max_seq_len, self.args.rope_theta)

    @property
    def _native(self):
        """The native kernels object when the fast path has one, else None."""
        if self.plain:
            return None
        name, kernels = backend()
        return kernels if name == "native" else None

    def _mm(self, x: np.ndarray, *ws) -> list[np.ndarray]:
        if self.plain:
            return [matmul_plain(x, w) for w in ws]
        return matmul_many(x, ws)

    def new_cache(self, n_slots: int = 1) -> KVCache:
        return KVCache(self.args, n_slots)

    def forward(self, tokens, positions, cache: KVCache, slots=None, logits: str = "all") -> np.ndarray:
        """Run `tokens` (N,) at `positions` (N,) through the model, writing their keys/values into
        `cache` at `slots` (N,; default slot 0). A token attends to its slot's cached positions up to its
        own. Returns logits (N, vocab) for logits="all", or only for the last token of each run of
        consecutive positions (one row per sequence) with logits="last"."""
        a, w = self.args, self.w
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        slots = np.zeros_like(tokens) if slots is None else np.asarray(slots, dtype=np.int64).reshape(-1)
        runs = segments(slots, positions)
        rows = [end - 1 for _, end, _, _ in runs] if logits == "last" else range(len(tokens))
        nk = self._native
        if nk is not None and len(tokens) <= FUSED_MAX_TOKENS:  # one C call, which checks the indices itself
            return nk.forward_step(self._plan(nk), tokens, positions, slots, cache.k, cache.v, rows)
        for values, end, what in ((tokens, a.vocab_size, "token ids"), (positions, cache.seq_len, "positions"),
                                  (slots, cache.n_slots, "slots")):  # NumPy would wrap negative indices
            if values.min(initial=0) < 0 or values.max(initial=0) >= end:
                raise ValueError(f"{what} must lie in [0, {end})")
        cos, sin = self.cos[positions], self.sin[positions]
        x = w.tok_embeddings[tokens].astype(np.float32)
        for layer in range(a.n_layers):
            self._block(x, layer, cache, slots, positions, runs, cos, sin)
        if logits == "last":
            x = x[rows]
        return self._mm((nk.rmsnorm if nk else rmsnorm)(x, w.rms_final, a.norm_eps), w.wcls)[0]

    def shift_cache(self, cache: KVCache, slot: int, start: int, delta: int, end: int) -> None:
        """Context shift without recomputation: the entries of `slot` at positions [start + delta, end) move
        to [start, end - delta) in every layer, keys rotated back by delta positions (RoPE: R(p - d) = R(-d)
        R(p)); what lay in [start, start + delta) is dropped."""
        kc, vc = cache.k[:, slot], cache.v[:, slot]  # (L, kv_heads, seq_len, hs)
        keys = kc[:, :, start + delta:end]
        rows = keys.reshape(-1, 1, self.args.head_size)
        cos = np.broadcast_to(self.cos[delta], (len(rows), len(self.cos[delta])))
        sin = np.broadcast_to(-self.sin[delta], cos.shape)  # rotation by -delta
        kc[:, :, start:end - delta] = apply_rope(rows, cos, sin).reshape(keys.shape)
        vc[:, :, start:end - delta] = vc[:, :, start + delta:end].copy()

    def _block(self, x, layer, cache, slots, positions, runs, cos, sin) -> None:
        """One transformer block, x updated in place: products through kernels.py (the plain path, prefill)."""
        a, w, nk = self.args, self.w, self._native
        norm = nk.rmsnorm if nk else rmsnorm
        q, k, v = self._mm(norm(x, w.rms_att[layer], a.norm_eps), w.wq[layer], w.wk[layer], w.wv[layer])
        x += self._mm(self._attention(q, k, v, layer, cache, slots, positions, runs, cos, sin), w.wo[layer])[0]
        h1, h3 = self._mm(norm(x, w.rms_ffn[layer], a.norm_eps), w.w1[layer], w.w3[layer])
        x += self._mm(nk.swiglu(h1, h3) if nk else silu(h1) * h3, w.w2[layer])[0]

    def _plan(self, nk):
        """The native kernels' description of this model's layers, made once (per kernels object)."""
        if getattr(self, "_plan_for", None) is not nk:
            self._plan_for, self._native_plan = nk, nk.describe(self.w, self.cos, self.sin)
        return self._native_plan

    def _attention(self, q, k, v, layer, cache, slots, positions, runs, cos, sin) -> np.ndarray:
        """RoPE on q and k, k and v into the cache, then each run's causal attention: (N, dim)."""
        a, nk = self.args, self._native
        n, hs = q.shape[0], a.head_size
        q, k, v = q.reshape(n, a.n_heads, hs), k.reshape(n, a.n_kv_heads, hs), v.reshape(n, a.n_kv_heads, hs)
        kc, vc = cache.k[layer], cache.v[layer]
        if nk:
            return nk.attention_step(q, k, v, cos, sin, kc, vc, slots, positions)
        qk = apply_rope(np.concatenate([q, k], axis=1), cos, sin)  # query and key heads in one NumPy call
        q, k = qk[:, :a.n_heads], qk[:, a.n_heads:]
        kc[slots, :, positions] = k
        vc[slots, :, positions] = v
        att = np.empty((n, a.dim), dtype=np.float32)
        for start, end, slot, pos0 in runs:
            end_pos = pos0 + (end - start)
            att[start:end] = self._attend(q[start:end], kc[slot, :, :end_pos], vc[slot, :, :end_pos], pos0)
        return att

    def _attend(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, pos0: int) -> np.ndarray:
        """Causal attention of T queries (T, n_heads, head_size) at positions pos0..pos0+T-1 over keys/values
        (kv_heads, P, head_size), grouped so that n_heads/n_kv_heads query heads share each key/value head."""
        a = self.args
        t, hs, kvh = q.shape[0], a.head_size, a.n_kv_heads
        g = a.n_heads // kvh
        p = keys.shape[1]
        qg = q.reshape(t, kvh, g, hs).transpose(1, 2, 0, 3).reshape(kvh, g * t, hs)
        scores = (qg @ keys.transpose(0, 2, 1)) * np.float32(1.0 / np.sqrt(hs))  # (kvh, g*T, P)
        if t > 1:
            qpos = np.tile(np.arange(pos0, pos0 + t), g)  # row r of each head group is query r % t
            scores = np.where(np.arange(p)[None, :] <= qpos[:, None], scores, -np.inf)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        out = scores @ values  # (kvh, g*T, hs)
        return out.reshape(kvh, g, t, hs).transpose(2, 0, 1, 3).reshape(t, a.dim)

