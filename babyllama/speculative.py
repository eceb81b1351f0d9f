"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one batched pass.

Each round (Leviathan et al. 2023, Chen et al. 2023):
  1. the draft samples d_1..d_k one by one from its distributions q_1..q_k;
  2. the target runs [last token, d_1..d_k] in one pass (one call for k < FUSED_MAX_TOKENS, else calls of that
     many), giving its distributions p_1..p_{k+1};
  3. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)), in order; at the first rejection a
     token is drawn from norm(max(0, p_i - q_i)) instead and the round ends; if all k are accepted, a
     bonus token is drawn from p_{k+1}.
Every token so produced is distributed exactly as the target's own sampling would be. With temperature 0
both "distributions" are one-hot argmaxes: a draft token is kept iff it is the target's argmax, so the
output is token for token the target's greedy output: the target's calls are shaped as plain decoding's (the
prompt prefilled alone, as `generate` prefills it, then steps whose rows equal one-token decode steps' bit for
bit with the native kernels; the other backends run such a step through other product shapes, within 1e-5), so
its logits are the plain path's (on those backends up to that rounding: through quantized weights a greedy text
can part from plain decoding's at a near-tie). Keys/values of rejected tokens stay in the caches
but lie beyond the accepted length, so the next round simply overwrites them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .engine import FUSED_MAX_TOKENS, Engine
from .errors import BabyLlamaError
from .generate import PREFILL_CHUNK, positions_reached
from .sampler import Sampler, check_logits, sample_mult
from .tokenizer import BOS


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def check_pair(target: Engine, draft: Engine) -> None:
    if target.args.vocab_size != draft.args.vocab_size:
        raise BabyLlamaError(f"draft model vocab {draft.args.vocab_size} differs from the target's "
                             f"{target.args.vocab_size}: they must share a tokenizer")


def speculative_generate(target: Engine, draft: Engine, prompt_ids: list[int], steps: int, sampler: Sampler,
                         k: int = 4, stop_ids: Iterable[int] = (BOS,), stats: SpecStats | None = None,
                         max_new: int | None = None) -> Iterator[int]:
    """Stream the target's tokens after `prompt_ids` (run.c semantics: `steps` positions in all; at most
    `max_new` tokens when given). A draft with a shorter context drafts while its context lasts."""
    check_pair(target, draft)
    if sampler.controls is not None and sampler.controls.penalizes:
        raise BabyLlamaError("speculative decoding cannot apply a logit bias or repeat, presence or frequency "
                             "penalties (the penalties depend on each drafted token)")
    stats = stats if stats is not None else SpecStats()
    stops = frozenset(stop_ids)
    max_pos = min(positions_reached(len(prompt_ids), steps, max_new), target.args.max_seq_len)
    # every position fed lies below max_pos: caches (and the RoPE tables they bring) follow it, as plain decoding's
    # follow -n, not the header's context
    tcache, dcache = target.new_cache(1, seq_len=max(max_pos, 1)), draft.new_cache(1, seq_len=max(max_pos, 1))
    tokens = list(prompt_ids)
    t_fed = d_fed = 0  # tokens whose keys/values each cache holds
    greedy = sampler.temperature == 0.0
    rng = sampler.rng

    while len(tokens) <= max_pos:
        # the j-th drafted token comes from the draft's position len(tokens) - 1 + j: past the draft's context
        # the target goes on alone (rounds of no drafted tokens are plain decode steps)
        n_draft = max(0, min(k, max_pos - len(tokens), draft.args.max_seq_len + 1 - len(tokens)))
        if len(tokens) - t_fed > 1:  # the prompt: the target prefills it alone, as plain decoding does
            n_draft = 0
        drafted: list[int] = []
        qs: list[np.ndarray] = []
        for j in range(n_draft):  # 1. draft, one token at a time (the first call catches the draft up)
            if j == 0:
                row = _logits(draft, dcache, tokens[d_fed:], d_fed, 1)[-1]
            else:
                row = draft.forward([drafted[-1]], [len(tokens) + j - 1], dcache, logits="last")[-1]
            if greedy:
                drafted.append(_argmax(row))
            else:
                qs.append(sampler.distribution(row))
                drafted.append(_draw(qs[-1], rng.f32()))
        if drafted:
            d_fed = len(tokens) + len(drafted) - 1
        # 2. verify: the target's distributions after the last token and after each drafted token
        logits = _logits(target, tcache, tokens[t_fed:] + drafted, t_fed, len(drafted) + 1)
        t_fed = len(tokens) + len(drafted)

        new, n_ok = [], 0  # 3. accept / reject
        fix: int | None
        for i, d in enumerate(drafted):
            if greedy:
                best = _argmax(logits[i])
                ok = best == d
                fix = best
            else:
                p = sampler.distribution(logits[i])
                ok = rng.f32() < min(1.0, p[d] / qs[i][d])
                fix = None if ok else _draw(_residual(p, qs[i]), rng.f32())
            if not ok:
                assert fix is not None  # a rejected draft always gets its replacement
                new.append(fix)
                break
            new.append(d)
            n_ok += 1
        else:
            row = logits[len(drafted)]
            new.append(_argmax(row) if greedy else _draw(sampler.distribution(row), rng.f32()))
        stats.rounds += 1
        stats.drafted += len(drafted)
        stats.accepted += n_ok

        t_fed = min(t_fed, len(tokens) + len(new) - 1)  # drop rejected tokens' cache entries
        d_fed = min(d_fed, len(tokens) + len(new) - 1)
        for tok in new:
            tokens.append(tok)
            if tok in stops:
                return
            yield tok
            if len(tokens) > max_pos:
                return


def _logits(model: Engine, cache, new: list[int], start: int, n_rows: int) -> np.ndarray:
    """A model's logits for the last `n_rows` of `new` (fed at positions start..), from the calls plain decoding
    makes, so that the target's greedy output is the plain path's token for token (other call shapes run other
    kernels: with Q8_0 weights, 48 rows or more take the dequantized sgemm and fewer the int8 kernel, logits up to
    0.06 apart): a prompt in Batch's prefill chunks, its last row only (one call of all of it would hold every
    token's activations at once, and on the NumPy backends attention scores for every pair of its tokens); a token
    and its drafts in steps of at most FUSED_MAX_TOKENS, the one-call step whose rows are one-token decode steps'
    bit for bit."""
    size, logits = (PREFILL_CHUNK, "last") if n_rows == 1 else (FUSED_MAX_TOKENS, "all")
    rows = [model.forward(new[i:i + size], range(start + i, start + min(i + size, len(new))), cache, logits=logits)
            for i in range(0, len(new), size)]
    return np.concatenate(rows)[-n_rows:]


def _argmax(logits: np.ndarray) -> int:
    """The greedy choice, refused as the plain path's sampler refuses it where the logits hold a NaN or +inf (a
    model whose arithmetic overflowed): argmax would pick the first NaN, token 0, as if it were text."""
    check_logits(logits)
    return int(np.argmax(logits))


def _draw(dist: np.ndarray, coin: np.float32) -> int:
    """sample_mult's token, but never one of probability 0: where rounding leaves the running sum short of the
    coin, sample_mult takes the last index, which a top-p distribution or a residual gives no mass (the
    acceptance test's p/q is then 0/0, and the token one the target cannot sample)."""
    token = sample_mult(dist, coin)
    return token if dist[token] > 0 else int(np.flatnonzero(dist)[-1])


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """norm(max(0, p - q)): where the target wants more mass than the draft gave."""
    r = np.maximum(p - q, 0)
    total = r.sum()
    return (r / total).astype(np.float32) if total > 0 else p
