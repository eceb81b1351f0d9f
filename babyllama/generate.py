"""The generation loop: prompts in, tokens out, for one sequence or many sharing one engine.

`Batch` is the loop every caller drives (the `run` command, chat, batched generation, the server): it
owns a KV cache with one slot per sequence and, on each `step()`, feeds every active sequence's pending
tokens (a whole prompt at once: prefill; or the last sampled token: decode) through a single
`Engine.forward` call, then samples one new token per sequence. Sequences can join and leave between
steps, which is all continuous batching needs.

Positions follow run.c: a sequence may occupy at most `max_pos + 1` tokens (BOS and prompt included),
i.e. `max_pos` forward positions, which is run.c's `-n steps`.
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

    def extend(self, ids: Iterable[int]) -> None:
        """Append more input (the next chat turn) and make the sequence runnable again."""
        self.tokens.extend(ids)
        self.generated = []
        self.done, self.stop_reason = False, None
        self._check_length()

    def _check_length(self) -> None:
        if len(self.tokens) > self.max_pos:
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

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward pass over every runnable sequence; returns the (sequence, new token) pairs."""
        tokens, positions, slots, ready = [], [], [], []
        budget = self.max_tokens_per_step
        for seq in self.active:
            if seq.done or budget <= 0:
                continue
            end = min(len(seq.tokens), seq.n_fed + budget)
            chunk = range(seq.n_fed, end)
            tokens.extend(seq.tokens[i] for i in chunk)
            positions.extend(chunk)
            slots.extend([seq.slot] * len(chunk))
            budget -= len(chunk)
            seq.n_fed = end
            ready.append((seq, end == len(seq.tokens)))
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
             stop_ids: Iterable[int] = (BOS,)) -> Iterator[int]:
    """Stream the tokens sampled after `prompt_ids` (run.c semantics: `steps` positions in all)."""
    batch = Batch(engine, 1)
    seq = batch.add(Sequence(list(prompt_ids), sampler, steps, frozenset(stop_ids)))
    while not seq.done:
        for _, tok in batch.step():
            yield tok


def chat_prompt(user: str, system: str | None = None) -> str:
    """run.c's Llama 2 chat template for one user turn (the system prompt only on the first turn)."""
    if system:
        return f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]"
    return f"[INST] {user} [/INST]"


__all__ = ["Batch", "Sequence", "generate", "chat_prompt", "BOS", "EOS"]
