"""Llama 2 in PyTorch, for training and for PyTorch-side generation (llama2.c's model.py, same names).

Parameter names follow Meta/llama2.c (tok_embeddings, layers.N.attention.wq, ..., norm, output) so that
state dicts line up with the llama2.c exporters. The math is the NumPy engine's (engine.py), written for
batches of training sequences:

    h   = x + Wo · attention(RoPE(Wq·rms(x)), RoPE(Wk·rms(x)), Wv·rms(x))
    x'  = h + W2 · (silu(W1·rms(h)) * W3·rms(h))                       (SwiGLU feed-forward)

RoPE rotates interleaved pairs (2i, 2i+1) of every head by pos · theta^(-2i/head_size), as Meta's complex
multiplication does. Grouped-query attention: n_heads query heads share n_kv_heads key/value heads.

`Transformer.from_weights` / `to_weights` convert to and from `formats.Weights` (fp32 NumPy), the common
currency of every file format. `TorchEngine` gives the model the NumPy engine's `forward` interface, so the
generation loop in generate.py (and the `run` printing code) drives PyTorch unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import nn

from . import engine
from .config import ModelArgs
from .errors import say
from .formats import Weights
from .interop.state_dict import from_state_dict, to_state_dict
from .memory import check_fits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even under autocast: mean(x²) of bf16 values loses too much precision
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_size: int, n_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The NumPy engine's tables (engine.rope_tables) as tensors, so that both engines rotate by the same angles."""
    cos, sin = engine.rope_tables(head_size, n_positions, theta)
    return torch.from_numpy(cos), torch.from_numpy(sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (batch, seq, heads, head_size) by angles (seq, head_size/2)."""
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = args.n_heads, args.n_kv_heads, args.head_size
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_size, bias=False)
        self.wk = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.kv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_size, args.dim, bias=False)
        self.dropout = args.dropout
        self.resid_dropout = nn.Dropout(args.dropout)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and keys, and values, each (batch, seq, heads, head_size)."""
        bsz, seqlen, _ = x.shape
        q = apply_rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_size), cos, sin)
        k = apply_rope(self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_size), cos, sin)
        return q, k, self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        causal, mask = True, None
        if cache is not None:  # generation: append to this sequence's keys/values, attend over all so far
            kc, vc = cache  # (batch, max_seq_len, n_kv_heads, head_size)
            end = start_pos + seqlen
            kc[:bsz, start_pos:end] = k
            vc[:bsz, start_pos:end] = v
            k, v = kc[:bsz, :end], vc[:bsz, :end]
            if start_pos > 0:  # query i (position start_pos+i) sees keys 0..start_pos+i
                causal = False
                if seqlen > 1:
                    mask = torch.ones(seqlen, end, dtype=torch.bool, device=x.device).tril(start_pos)
        return self.attend(q, k, v, mask, causal and seqlen > 1)

    def decode_step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    cache: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
        """One token of each of n sequences, x (1, n, dim) with each token's angles cos/sin (n, hs/2): its key
        and value go into cache row slots[i] at positions[i], and it attends over that whole row under `mask`
        (n, 1, 1, max_seq_len), which hides the positions after its own. Fixed shapes, whatever the positions."""
        n = x.shape[1]
        q, k, v = self.qkv(x, cos, sin)
        kc, vc = cache
        kc[slots, positions] = k[0]
        vc[slots, positions] = v[0]
        return self.attend(q[0, :, None], kc[slots], vc[slots], mask, False).view(1, n, -1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool) -> torch.Tensor:
        """Softmax attention of q (batch, seq, heads, hs) over k, v (batch, keys, kv_heads, hs), then Wo."""
        bsz, seqlen = q.shape[:2]
        # grouped-query attention: each key/value head serves n_heads/n_kv_heads query heads
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=2)
            v = v.repeat_interleave(groups, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_size)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.resid_dropout(self.wo(out))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))

    def decode_step(self, x, cos, sin, cache, slots, positions, mask):
        h = x + self.attention.decode_step(self.attention_norm(x), cos, sin, cache, slots, positions, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    freqs_cos: torch.Tensor  # RoPE tables: non-persistent buffers (register_buffer)
    freqs_sin: torch.Tensor

    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.shared_classifier:
            self.output.weight = self.tok_embeddings.weight  # weight tying
        check_fits(4 * 8 * args.max_seq_len * (args.head_size // 2), f"RoPE tables for {args.max_seq_len:,} positions")
        cos, sin = rope_tables(args.head_size, args.max_seq_len, args.rope_theta)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("w3.weight", "wo.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, start_pos: int = 0,
                cache: list | None = None, weights: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """tokens (batch, seq) → (logits (batch, seq, vocab), loss or None). With `targets`, the mean
        cross-entropy (-1 targets ignored), or with `weights` (like targets) its weighted mean
        sum(w·ce) / sum(w). `cache` (one (k, v) pair per layer) and `start_pos` are for generation: the
        tokens sit at positions start_pos.. and attend to everything cached before them."""
        seqlen = tokens.shape[1]
        if start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seqlen} exceed max_seq_len {self.args.max_seq_len}")
        cos = self.freqs_cos[start_pos:start_pos + seqlen]
        sin = self.freqs_sin[start_pos:start_pos + seqlen]
        h = self.dropout(self.tok_embeddings(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if cache is None else cache[i], start_pos)
        logits = self.output(self.norm(h))
        loss = None
        if targets is not None:
            flat = logits.float().view(-1, logits.size(-1))
            if weights is None:
                loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
            else:
                w = weights.reshape(-1).float() * (targets.reshape(-1) != -1)
                ce = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1, reduction="none")
                loss = (ce * w).sum() / w.sum().clamp_min(1e-9)
        return logits, loss

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    cache: list) -> torch.Tensor:
        """One token for each of n sequences at once (tokens, positions, slots: (n,) int64; cache rows are
        sequences): logits (n, vocab). The n tokens travel as one row of n, each rotated by its own angle."""
        cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        seq = torch.arange(self.args.max_seq_len, device=tokens.device)
        mask = (seq[None, :] <= positions[:, None])[:, None, None, :]
        h = self.tok_embeddings(tokens)[None]
        # nn.ModuleList is not generic: its items are typed as nn.Module
        for layer, layer_cache in zip(cast("Iterable[TransformerBlock]", self.layers), cache):
            h = layer.decode_step(h, cos, sin, layer_cache, slots, positions, mask)
        return self.output(self.norm(h))[0]

    def cast(self, dtype: torch.dtype) -> Transformer:
        """The weights (and so new caches) in `dtype`, for inference; unlike `to(dtype)`, the RoPE tables stay
        fp32, rebuilt rather than cast back (bf16 tables put every rotation off by up to 0.4%)."""
        a, device = self.args, self.freqs_cos.device
        self.to(dtype)
        self.freqs_cos, self.freqs_sin = (t.to(device) for t in rope_tables(a.head_size, a.max_seq_len, a.rope_theta))
        return self

    def new_cache(self, batch: int = 1, device=None, dtype=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        a = self.args
        ref = self.output.weight
        shape = (batch, a.max_seq_len, a.n_kv_heads, a.head_size)
        return [(torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype),
                 torch.zeros(shape, device=device or ref.device, dtype=dtype or ref.dtype))
                for _ in range(a.n_layers)]

    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12·L·H·Q·T."""
        a = self.args
        n_params = sum(p.numel() for p in self.parameters())
        return 6 * n_params + 12 * a.n_layers * a.n_heads * a.head_size * a.max_seq_len

    # ---------------------------------------------------------------------------- Weights conversion

    @classmethod
    def from_weights(cls, w: Weights, dropout: float = 0.0) -> Transformer:
        """A model holding `w`'s tensors (Q8_0 weights are dequantized); `dropout` for fine-tuning it."""
        args = ModelArgs.from_dict(w.args.to_dict())
        args.dropout = dropout
        model = cls(args)
        sd = to_state_dict(w)
        if args.shared_classifier:
            sd["output.weight"] = sd["tok_embeddings.weight"]  # one tied parameter, two names
        # copy: memory-mapped arrays are read-only
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
        return model

    def to_weights(self) -> Weights:
        """The model's parameters as fp32 NumPy `Weights` (what formats.save writes)."""
        sd = {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}
        return from_state_dict(ModelArgs.from_dict(self.args.to_dict()), sd)


# GNU OpenMP's threads (PyTorch's CPU operations) do not survive a fork: a child's first parallel operation waits
# for the parent's threads forever. A process forked after the engine ran on the CPU runs PyTorch on one thread.
_cpu_threads_started = False  # the engine has run on the CPU in this process (or its parent)
_say_forked = False  # this process is a fork of one where it had, not yet told


def _after_fork_in_child() -> None:
    global _say_forked
    if _cpu_threads_started and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        _say_forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def _note_cpu_use() -> None:
    """Record that PyTorch's CPU threads may have started; in a forked child, say once why it runs on one."""
    global _cpu_threads_started, _say_forked
    _cpu_threads_started = True
    if _say_forked:
        _say_forked = False
        say("babyllama: PyTorch's OpenMP threads do not survive a fork; this forked process runs PyTorch on one "
            "thread (start processes with multiprocessing's 'spawn' to keep them)")


class TorchEngine:
    """The NumPy `Engine.forward` interface on a PyTorch model, so that generate.py's loop (and therefore the
    `run` command's printing) drives PyTorch as is. One cache slot = one row of the batch cache.

    A step of one token per sequence (decode, batched decode) is one `Transformer.decode_step` call over all
    of them, with shapes that do not change from step to step: with `compile=True` it is compiled once per
    batch size by torch.compile, and on CUDA captured as a CUDA graph (mode "reduce-overhead"), so a decode
    step costs one graph launch instead of a few hundred kernel launches. Prompts go through the model's
    own forward, one sequence at a time."""

    class Cache:
        def __init__(self, layers: list, seq_len: int):
            self.layers, self.seq_len = layers, seq_len

        @property
        def n_slots(self) -> int:
            return self.layers[0][0].shape[0]

    def __init__(self, model: Transformer, device: str | torch.device = "cpu", compile: bool = False,
                 dtype: torch.dtype | None = None):
        self.model = (model if dtype is None else model.cast(dtype)).to(device).eval()
        self.args = model.args
        self.device = torch.device(device)
        self._decode: Callable[..., torch.Tensor] = self.model.decode_step
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode = torch.compile(self.model.decode_step, mode=mode, dynamic=False)

    def new_cache(self, n_slots: int = 1, seq_len: int | None = None) -> TorchEngine.Cache:
        """A cache for `n_slots` sequences; it always spans the whole context (`seq_len` is accepted for the
        NumPy engine's interface: its decode step's shapes depend on the context)."""
        a = self.args
        check_fits(2 * a.n_layers * n_slots * a.max_seq_len * a.kv_dim * self.model.output.weight.element_size(),
                   f"a KV cache of {a.max_seq_len:,} positions x {n_slots} sequence(s)",
                   "the PyTorch engine sizes it by the model's context")
        cache = self.Cache(self.model.new_cache(n_slots, self.device), self.args.max_seq_len)
        if self.device.type == "cuda":  # updated in place inside the CUDA graph: its address must not change
            for tensor in (t for pair in cache.layers for t in pair):
                torch._dynamo.mark_static_address(tensor)
        return cache

    @torch.inference_mode()
    def shift_cache(self, cache: TorchEngine.Cache, slot: int, start: int, delta: int, end: int) -> None:
        """Engine.shift_cache on the PyTorch cache: entries [start + delta, end) of `slot` move to
        [start, end - delta), keys rotated back by delta positions."""
        cos, sin = self.model.freqs_cos[delta], self.model.freqs_sin[delta]
        n = end - start - delta
        for k, v in cache.layers:  # (slots, seq_len, kv_heads, hs)
            keys = k[slot:slot + 1, start + delta:end].float()
            k[slot, start:end - delta] = apply_rope(keys, cos.expand(n, -1), -sin.expand(n, -1))[0].to(k.dtype)
            v[slot, start:end - delta] = v[slot, start + delta:end].clone()

    @torch.inference_mode()
    def forward(self, tokens: ArrayLike, positions: ArrayLike, cache: TorchEngine.Cache, slots: ArrayLike | None = None,
                logits: str = "all") -> np.ndarray:
        from .kernels_base import check_step_lengths, segments

        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        slots = np.zeros_like(tokens) if slots is None else np.asarray(slots, dtype=np.int64).reshape(-1)
        check_step_lengths(tokens, positions, slots, logits)  # as the NumPy engine: not a shorter list zipped
        if self.device.type == "cpu":
            _note_cpu_use()
        if len(np.unique(slots)) == len(slots):  # one token per sequence: the batched decode step
            out = self._decode(*(torch.from_numpy(a).to(self.device) for a in (tokens, positions, slots)),
                               cache.layers)
            return out.float().cpu().numpy()
        rows = []
        for start, end, slot, pos0 in segments(slots, positions):
            ids = torch.from_numpy(tokens[start:end]).to(self.device)[None]
            slot_cache = [(k[slot:slot + 1], v[slot:slot + 1]) for k, v in cache.layers]
            out, _ = self.model(ids, start_pos=pos0, cache=slot_cache)
            rows.append(out[0, -1:] if logits == "last" else out[0])
        return torch.cat(rows).float().cpu().numpy()
