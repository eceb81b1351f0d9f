"""The generation loop: prompts in, tokens out, for one sequence or many sharing one engine.

`Batch` is the loop every caller drives (the `run` command, chat, batched generation, the server): it
owns a KV cache with one slot per sequence and, on each `step()`, feeds every active sequence's pending
tokens (a whole prompt at once: prefill; or the last sampled token: decode) through a single
`Engine.forward` call, then samples one new token per sequence. Sequences can join and leave between
steps, which is all continuous batching needs.

Positions follow run.c: a sequence may occupy at most `max_pos + 1` tokens (BOS and prompt included),
i.e. `max_pos` forward positions, which is run.c's `-n steps`.

Context shift (`Sequence.context_shift`): when a sequence's tokens no longer fit the cache, the first
`n_keep` tokens stay, the oldest half of the rest is dropped, and generation goes on past seq_len. The
cache then holds `window()`: tokens[:n_keep] + tokens[n_keep+n_dropped:]. By default the kept window is
recomputed from scratch in one batched prefill, so the continuation is exactly what a fresh run on the
window gives. With `rotate_keys` the cached keys and values of the kept tokens are moved down instead and
the keys re-rotated to their new positions (RoPE rotations compose: R(p - d) = R(-d)·R(p)), as llama.cpp
does: no recomputation, but the kept entries still carry what they saw of the dropped tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .engine import Engine
from .sampler import Sampler
from .tokenizer import BOS, EOS


@dataclass
class Sequence:
    tokens: list[int]  # prompt and everything generated so far
    sampler: Sampler
    max_pos: int  # forward positions allowed (run.c's steps)
    stop_ids: frozenset[int] = frozenset({BOS})
    slot: int = -1
    n_fed: int = 0  # tokens whose keys/values are in the cache
    done: bool = False
    generated: list[int] = field(default_factory=list)
    stop_reason: str | None = None  # "stop" (a stop token) or "length"
    context_shift: bool = False  # slide the window instead of stopping at the cache's seq_len
    n_keep: int = 0  # tokens always kept at the start of the window (the prompt, typically)
    n_dropped: int = 0  # tokens dropped after the first n_keep by context shifts so far
    rotate_keys: bool = False  # shift by moving and re-rotating cached keys instead of recomputing
    max_new: int | None = None  # generated tokens allowed (since the last `extend`): OpenAI's max_tokens

    def window(self) -> list[int]:
        """The tokens the cache holds (or will hold), position by position."""
        if not self.n_dropped:
            return self.tokens
        return self.tokens[: self.n_keep] + self.tokens[self.n_keep + self.n_dropped:]

    def shift_if_full(self, seq_len: int) -> int:
        """Drop the oldest half of the slidable tokens when the window outgrows the cache. Returns how many
        window positions were dropped (0: no shift); they are positions n_keep.. of the window before."""
        if len(self.tokens) - self.n_dropped <= seq_len:
            return 0
        # n_keep can only shrink on the first shift, while nothing is dropped yet: the window is then all of
        # the tokens, and positions keep.. are the ones dropped either way
        self.n_keep = keep = min(self.n_keep, seq_len // 2)
        slidable = len(self.tokens) - self.n_dropped - keep
        delta = max(slidable - (seq_len - keep) // 2, 1)
        self.n_dropped += delta
        return delta

    def extend(self, ids: Iterable[int]) -> None:
        """Append more input (the next chat turn) and make the sequence runnable again."""
        self.tokens.extend(ids)
        self.generated = []
        self.done, self.stop_reason = False, None
        self._check_length()

    def _check_length(self) -> None:
        if len(self.tokens) > self.max_pos or (self.max_new is not None and len(self.generated) >= self.max_new):
            self.done, self.stop_reason = True, "length"


class Batch:
    def __init__(self, engine: Engine, n_slots: int = 1, max_tokens_per_step: int = 512):
        self.engine = engine
        self.cache = engine.new_cache(n_slots)
        self.free_slots = list(range(n_slots))[::-1]
        self.active: list[Sequence] = []
        self.max_tokens_per_step = max_tokens_per_step

    def add(self, seq: Sequence) -> Sequence:
        if not self.free_slots:
            raise RuntimeError("no free slot in the batch")
        if not seq.tokens:
            raise ValueError("a sequence needs at least one token (BOS)")
        if not seq.context_shift:
            seq.max_pos = min(seq.max_pos, self.cache.seq_len)
        seq.slot = self.free_slots.pop()
        seq._check_length()
        self.active.append(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Give the slot back (its cache contents are simply overwritten by the next user)."""
        if seq in self.active:
            self.active.remove(seq)
            self.free_slots.append(seq.slot)

    def _shift_if_full(self, seq: Sequence) -> None:
        delta = seq.shift_if_full(self.cache.seq_len)
        if not delta:
            return
        if not seq.rotate_keys:
            seq.n_fed = 0  # the window's keys/values are recomputed from position 0
        elif seq.n_fed > seq.n_keep + delta:  # cached entries after the dropped ones move down by delta
            self.engine.shift_cache(self.cache, seq.slot, seq.n_keep, delta, seq.n_fed)
            seq.n_fed -= delta
        else:  # nothing cached after the dropped positions: keep what precedes them
            seq.n_fed = min(seq.n_fed, seq.n_keep)

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward pass over every runnable sequence; returns the (sequence, new token) pairs."""
        tokens, positions, slots, ready = [], [], [], []
        budget = self.max_tokens_per_step
        for seq in self.active:
            if seq.done or budget <= 0:
                continue
            if seq.context_shift:
                self._shift_if_full(seq)
            window = seq.window()
            end = min(len(window), seq.n_fed + budget)
            chunk = range(seq.n_fed, end)
            tokens.extend(window[seq.n_fed:end])
            positions.extend(chunk)
            slots.extend([seq.slot] * len(chunk))
            budget -= len(chunk)
            seq.n_fed = end
            ready.append((seq, end == len(window)))
        if not tokens:
            return []
        logits = self.engine.forward(tokens, positions, self.cache, slots, logits="last")
        out = []
        for (seq, complete), row in zip(ready, logits):
            if not complete:
                continue  # a long prompt still being prefilled in chunks
            nxt = seq.sampler.sample(row)
            seq.tokens.append(nxt)
            if nxt in seq.stop_ids:
                seq.done, seq.stop_reason = True, "stop"
                continue
            seq.generated.append(nxt)
            seq._check_length()
            out.append((seq, nxt))
        return out


def generate(engine: Engine, prompt_ids: list[int], steps: int, sampler: Sampler,
             stop_ids: Iterable[int] = (BOS,), context_shift: bool = False, n_keep: int | None = None,
             rotate_keys: bool = False, max_new: int | None = None) -> Iterator[int]:
    """Stream the tokens sampled after `prompt_ids` (run.c semantics: `steps` positions in all, and at most
    `max_new` generated tokens when given). With `context_shift`, `steps` may exceed seq_len; `n_keep`
    (default: the prompt) tokens stay in the window, and `rotate_keys` shifts the cache instead of
    recomputing it (see the module's docstring)."""
    batch = Batch(engine, 1)
    keep = len(prompt_ids) if n_keep is None else n_keep
    seq = batch.add(Sequence(list(prompt_ids), sampler, steps, frozenset(stop_ids), context_shift=context_shift,
                             n_keep=keep, rotate_keys=rotate_keys, max_new=max_new))
    while not seq.done:
        for _, tok in batch.step():
            yield tok


def generate_batch(engine: Engine, prompts: list[list[int]], steps: int | list[int], samplers: list[Sampler],
                   stop_ids: Iterable[int] = (BOS,), on_token=None, max_new: int | None = None) -> list[Sequence]:
    """Generate after every prompt at once (one `Batch`, one slot each); `steps` may differ per sequence
    and each stops on its own (also after `max_new` generated tokens when given). `on_token(index, token)` is
    called as tokens arrive. Returns the sequences (their `generated` tokens and `stop_reason`), in prompt
    order."""
    if isinstance(steps, int):
        steps = [steps] * len(prompts)
    if not (len(prompts) == len(steps) == len(samplers)):
        raise ValueError("prompts, steps and samplers must have one entry per sequence")
    batch = Batch(engine, len(prompts))
    seqs = [batch.add(Sequence(list(p), s, n, frozenset(stop_ids), max_new=max_new))
            for p, n, s in zip(prompts, steps, samplers)]
    index = {id(s): i for i, s in enumerate(seqs)}
    while not all(s.done for s in seqs):
        for seq, tok in batch.step():
            if on_token is not None:
                on_token(index[id(seq)], tok)
    return seqs


__all__ = ["Batch", "Sequence", "generate", "generate_batch", "BOS", "EOS"]
