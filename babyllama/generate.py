"""The generation loop: prompts in, tokens out, for one sequence or many sharing one engine.

`Batch` is the loop every caller drives (the `run` command, chat, batched generation, the server): it
owns a KV cache with one slot per sequence and, on each `step()`, feeds every active sequence's pending
tokens (the last sampled token: decode; or a chunk of a prompt: prefill) through the engine, then samples
one new token per sequence whose input is complete. Sequences can join and leave between steps, which is
all continuous batching needs.

A step runs the decode tokens first and fills the rest of its token budget (`max_tokens_per_step`) with
prefill chunks, so a long prompt never stalls the sequences already generating: a prompt is cut into chunks
of at most that many tokens, from where its prefill starts, whatever else shares the steps (at least one
chunk runs per step). With the NumPy engine a step's tokens go through the engine in calls that its one-call
decode step takes (the native kernels compute each token's row in the same order whatever else is in the
call): the single tokens (decodes) all in one call, prompt chunks of at most FUSED_MAX_TOKENS packed into calls
of at most that many tokens; a longer chunk (a prefill through sgemm) goes alone. So a sequence's numbers do
not depend on which others share its steps.

Prefix reuse (`prefix_min`): a slot's cache keeps what its last sequence left in it. A new sequence goes to
the free slot whose cached tokens share the longest prefix with its own (at least `prefix_min` tokens) and
only the rest is prefilled (`Sequence.n_reused`). The reused entries may have been computed in other
chunks or by decode steps, so its logits equal a fresh prefill's within rounding, not bit for bit.

Positions follow run.c: a sequence may occupy at most `max_pos + 1` tokens (BOS and prompt included),
i.e. `max_pos` forward positions, which is run.c's `-n steps`.

Context shift (`Sequence.context_shift`): when a sequence's tokens no longer fit the cache, the first
`n_keep` tokens stay, the oldest half of the rest is dropped, and generation goes on past seq_len. Input
added by `extend` (a chat's turns) slides out whole turns at a time: the cut moves to the first turn start
at or past the half (or the newest turn's start where that makes room), and falls inside a turn only when
that turn and its reply alone outgrow the room. The dropped tokens leave `tokens` (which is the window the cache
holds, so that memory stays bounded however long generation goes on); `n_dropped` counts them. By default the
kept window is recomputed from scratch in one batched prefill, so
the continuation is exactly what a fresh run on the window gives. With `rotate_keys` the cached keys and
values of the kept tokens are moved down instead and the keys re-rotated to their new positions (RoPE
rotations compose: R(p - d) = R(-d)·R(p)), as llama.cpp does: no recomputation, but the kept entries still
carry what they saw of the dropped tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .engine import FUSED_MAX_TOKENS, Engine
from .errors import BabyLlamaError
from .sampler import Sampler
from .tokenizer import BOS


@dataclass
class Sequence:
    tokens: list[int]  # prompt and everything generated so far, less what context shifts dropped: the window
    sampler: Sampler
    max_pos: int  # forward positions allowed (run.c's steps)
    stop_ids: frozenset[int] = frozenset({BOS})
    slot: int = -1
    n_fed: int = 0  # tokens whose keys/values are in the cache
    done: bool = False
    generated: list[int] = field(default_factory=list)  # since the last `extend` (after a shift: those in the window)
    stop_reason: str | None = None  # "stop" (a stop token), "length", or "error" (see Batch's isolate_failures)
    error: str | None = None  # with stop_reason "error": what the model could not compute for this sequence
    context_shift: bool = False  # slide the window instead of stopping at the cache's seq_len
    n_keep: int = 0  # tokens always kept at the start of the window (the prompt, typically)
    n_dropped: int = 0  # tokens dropped after the first n_keep by context shifts so far (gone from `tokens`)
    rotate_keys: bool = False  # shift by moving and re-rotating cached keys instead of recomputing
    max_new: int | None = None  # generated tokens allowed (since the last `extend`): OpenAI's max_tokens
    n_reused: int = 0  # leading tokens whose keys/values were already in the slot (prefix reuse)
    logits: np.ndarray | None = None  # the logits row the last token was sampled from
    turn_starts: list[int] = field(default_factory=list)  # indices of `tokens` where `extend`ed input begins
    n_generated: int = 0  # tokens generated since the last `extend` (max_new counts them)

    def pending(self) -> int:
        """Tokens of the window not yet in the cache (1 while decoding)."""
        return len(self.window()) - self.n_fed

    def cached(self) -> list[int]:
        """The tokens whose keys/values this sequence has put in its slot, position by position (none after
        a shift by rotated keys: those entries still carry what they saw of the dropped tokens)."""
        if self.rotate_keys and self.n_dropped:
            return []
        return self.window()[: self.n_fed]

    def window(self) -> list[int]:
        """The tokens the cache holds (or will hold), position by position."""
        return self.tokens

    def shift_if_full(self, seq_len: int) -> int:
        """Drop the oldest half of the slidable tokens when the window outgrows the cache. Returns how many
        window positions were dropped (0: no shift); they are positions n_keep.. of the window before."""
        if len(self.tokens) <= seq_len:
            return 0
        # n_keep can only shrink on the first shift, while nothing is dropped yet: the window is then all of
        # the tokens, and positions keep.. are the ones dropped either way
        self.n_keep = keep = min(self.n_keep, seq_len // 2)
        slidable = len(self.tokens) - keep  # tokens[keep] is the oldest that may slide out
        # half the room after the kept tokens stays, and at least the newest token (sampled, not yet fed):
        # with a context of 1 or 2 that half is 0
        delta = slidable - max((seq_len - keep) // 2, 1)
        delta = self._at_turn_start(delta, keep, least=slidable - (seq_len - keep))
        # new lists, not trimmed in place: the sampler's running counts (sampler.RunningCounts) follow a list as
        # it grows, and a list trimmed by one token whose new last equals its old one would look merely unchanged
        # the generated tokens are the window's last ones (from gen_start on), and stay so: those in the kept
        # start (an n_keep beyond the prompt) meet the newest, which slide down to follow them
        gen_start = len(self.tokens) - len(self.generated)
        self.tokens = self.tokens[:keep] + self.tokens[keep + delta:]
        self.turn_starts = [s if s <= keep else s - delta for s in self.turn_starts if not keep < s < keep + delta]
        self.generated = self.tokens[gen_start if gen_start < keep else max(gen_start - delta, keep):]
        self.n_dropped += delta
        return delta

    def _at_turn_start(self, delta: int, start: int, least: int) -> int:
        """`delta` moved to whole turns: the first turn start at or past it, else the newest turn's when that
        drops at least `least` (what the window must lose to fit); else `delta` itself."""
        starts = [s - start for s in self.turn_starts if s > start]
        if not starts:
            return delta
        aligned = next((s for s in starts if s >= delta), starts[-1])
        return aligned if aligned >= least else delta

    def extend(self, ids: Iterable[int]) -> None:
        """Append more input (the next chat turn) and make the sequence runnable again."""
        self.turn_starts.append(len(self.tokens))
        self.tokens.extend(ids)
        self.generated, self.n_generated = [], 0
        self.done, self.stop_reason = False, None
        self._check_length()

    def _check_length(self) -> None:
        if (len(self.tokens) + self.n_dropped > self.max_pos
                or (self.max_new is not None and self.n_generated >= self.max_new)):
            self.done, self.stop_reason = True, "length"


# the NumPy engine's first cache size, in positions (a slot's keys and values of stories110M's 12 layers in fp32:
# 144 MiB of address space, touched only as positions fill); a batch's cache doubles from it as needed
INITIAL_CACHE = 2048
PREFILL_CHUNK = 512  # prompt tokens a step of `generate` (and `run`) prefills: Batch's default token budget


class Batch:
    def __init__(self, engine: Engine, n_slots: int = 1, max_tokens_per_step: int = PREFILL_CHUNK, prefix_min: int = 0,
                 seq_len: int | None = None, isolate_failures: bool = False):
        """`seq_len`: positions each slot holds (default: the model's context); a batch whose sequences stop
        within -n positions needs no more, whatever the header's seq_len says, and its cache is made (or
        refused) whole. Without it (chat: a conversation's length is not known) the NumPy engine's cache starts
        at INITIAL_CACHE positions at most and doubles as sequences reach its end (`_make_room`): a model whose
        header declares a context of 128k or 1M positions takes the memory its conversation fills, and starts
        where the whole context's cache could not fit. `isolate_failures`: a model error (BabyLlamaError) in a
        step ends only the sequences it comes from (`fail`), the others go on; without it, `step` raises it."""
        self.engine = engine
        max_seq_len = engine.args.max_seq_len
        self.seq_len = min(seq_len or max_seq_len, max_seq_len)
        self.cache = engine.new_cache(n_slots, seq_len=self.seq_len if seq_len else min(self.seq_len, INITIAL_CACHE))
        self.free_slots = list(range(n_slots))[::-1]
        self.active: list[Sequence] = []
        self.max_tokens_per_step = max_tokens_per_step
        self.prefix_min = prefix_min  # 0: no prefix reuse
        self.holders: list[Sequence | None] = [None] * n_slots  # the sequence whose entries each slot holds
        # the NumPy engine's batch-invariant call size (see the module's docstring); None: one call a step
        self.call_tokens = FUSED_MAX_TOKENS if isinstance(engine, Engine) else None
        self.isolate_failures = isolate_failures

    def add(self, seq: Sequence) -> Sequence:
        if not self.free_slots:
            raise RuntimeError("no free slot in the batch")
        if not seq.tokens:
            raise ValueError("a sequence needs at least one token (BOS)")
        if not seq.context_shift:
            seq.max_pos = min(seq.max_pos, self.seq_len)
        seq.slot, reused = self._pick_slot(seq.tokens)
        self.free_slots.remove(seq.slot)
        seq.n_fed = seq.n_reused = reused
        self.holders[seq.slot] = seq
        seq._check_length()
        self.active.append(seq)
        return seq

    def _pick_slot(self, tokens: list[int]) -> tuple[int, int]:
        """(slot, reused tokens): the free slot whose cache shares the longest prefix with `tokens` when that
        is at least prefix_min tokens (the last token is always fed again: its logits are needed); else an
        unused slot, else the one released longest ago (without prefix reuse: the last released)."""
        if not self.prefix_min:
            return self.free_slots[-1], 0
        best, best_len = None, 0
        for slot in self.free_slots:
            holder = self.holders[slot]
            if holder is not None:
                n = min(common_prefix(holder.cached(), tokens), len(tokens) - 1)
                if n > best_len:
                    best, best_len = slot, n
        if best is not None and best_len >= self.prefix_min:
            return best, best_len
        unused = [s for s in self.free_slots if self.holders[s] is None]
        return (unused[-1] if unused else self.free_slots[0]), 0

    def release(self, seq: Sequence) -> None:
        """Give the slot back. Its cache contents stay: a later sequence may reuse them as its prefix, else
        they are simply overwritten."""
        if seq in self.active:
            self.active.remove(seq)
            self.free_slots.append(seq.slot)

    def _shift_if_full(self, seq: Sequence) -> None:
        delta = seq.shift_if_full(self.seq_len)
        if not delta:
            return
        if not seq.rotate_keys:
            seq.n_fed = 0  # the window's keys/values are recomputed from position 0
        elif seq.n_fed > seq.n_keep + delta:  # cached entries after the dropped ones move down by delta
            self.engine.shift_cache(self.cache, seq.slot, seq.n_keep, delta, seq.n_fed)
            seq.n_fed -= delta
        else:  # nothing cached after the dropped positions: keep what precedes them
            seq.n_fed = min(seq.n_fed, seq.n_keep)

    def _plan(self) -> list[tuple[Sequence, int, int]]:
        """This step's runs (sequence, first window position, end): every decode token, then prefill chunks
        while the budget lasts (always at least one)."""
        decoding: list[Sequence] = []
        prefilling: list[Sequence] = []
        for seq in self.active:
            if seq.done:
                continue
            if seq.context_shift:
                self._shift_if_full(seq)
            (decoding if seq.pending() == 1 else prefilling).append(seq)
        runs = [(seq, seq.n_fed, seq.n_fed + 1) for seq in decoding]
        budget = self.max_tokens_per_step - len(runs)
        for i, seq in enumerate(prefilling):
            n = min(seq.pending(), self.max_tokens_per_step)
            if n > budget and i > 0:
                break
            runs.append((seq, seq.n_fed, seq.n_fed + n))
            budget -= n
        return runs

    def _calls(self, runs: list) -> list[list]:
        """The runs grouped into engine calls (see the module's docstring): single tokens in one call, other
        runs of at most call_tokens tokens packed into calls of at most that many, longer runs alone."""
        limit = self.call_tokens
        if limit is None:
            return [runs]
        singles = [r for r in runs if r[2] - r[1] == 1]
        small: list = []
        calls, size = [singles] if singles else [], 0
        for run in runs:
            n = run[2] - run[1]
            if n == 1:
                continue
            if n > limit:
                calls.append([run])
                continue
            if size + n > limit:
                calls.append(small)
                small, size = [], 0
            small.append(run)
            size += n
        return calls + ([small] if small else [])

    def _make_room(self, end: int) -> None:
        """Grow the cache (doubling, up to seq_len) so that it holds positions below `end`, each slot's cached
        entries copied over (the same values in the same layout: the outputs do not change)."""
        old = self.cache
        if end <= old.seq_len:
            return
        bigger = self.engine.new_cache(old.n_slots, seq_len=min(self.seq_len, max(end, 2 * old.seq_len)))
        for slot, holder in enumerate(self.holders):
            n = min(holder.n_fed, old.seq_len) if holder is not None else 0
            if n:  # only the written positions: the rest of the new cache stays untouched zero pages
                bigger.k[:, slot, :, :n] = old.k[:, slot, :, :n]
                bigger.v[:, slot, :, :n] = old.v[:, slot, :, :n]
        self.cache = bigger

    def step(self) -> list[tuple[Sequence, int]]:
        """One forward pass over every runnable sequence; returns the (sequence, new token) pairs."""
        runs = self._plan()
        self._make_room(max((end for _, _, end in runs), default=0))
        rows: dict[int, np.ndarray] = {}
        for call in self._calls(runs):
            self._forward(call, rows)
        out = []
        for seq, _, end in runs:
            if seq.done:
                continue  # its forward failed (isolate_failures)
            seq.n_fed = end
            if seq.pending():
                continue  # a long prompt still being prefilled in chunks
            seq.logits = rows[id(seq)]
            try:
                nxt = seq.sampler.sample(seq.logits, seq.tokens, seq.generated)
            except BabyLlamaError as e:  # NaN or infinite logits: this sequence's numbers, not the others'
                if not self.isolate_failures:
                    raise
                self.fail(seq, e)
                continue
            seq.tokens.append(nxt)
            if nxt in seq.stop_ids:
                seq.done, seq.stop_reason = True, "stop"
                continue
            seq.generated.append(nxt)
            seq.n_generated += 1
            seq._check_length()
            out.append((seq, nxt))
        return out

    def _forward(self, call: list[tuple[Sequence, int, int]], rows: dict[int, np.ndarray]) -> None:
        """One engine call over the runs of `call`, their last logits rows put in `rows`. With isolate_failures, a
        call that raises a model error is made again one run at a time, so that only the runs that raise it
        fail: each run writes only its own positions of its own slot, which the retry writes again, and a
        token's row does not depend on the others in the call (see the module's docstring)."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for seq, start, end in call:
            tokens.extend(seq.window()[start:end])
            positions.extend(range(start, end))
            slots.extend([seq.slot] * (end - start))
        try:
            logits = self.engine.forward(tokens, positions, self.cache, slots, logits="last")
        except BabyLlamaError as e:
            if not self.isolate_failures:
                raise
            if len(call) == 1:
                self.fail(call[0][0], e)
            else:
                for run in call:
                    self._forward([run], rows)
            return
        for (seq, _, _), row in zip(call, logits):
            rows[id(seq)] = row

    def fail(self, seq: Sequence, error: BabyLlamaError) -> None:
        """End a sequence whose step raised `error` (stop_reason "error"). Its slot's entries are not offered as
        a prefix again: the failed call may have written some of them."""
        seq.done, seq.stop_reason, seq.error = True, "error", str(error)
        seq.n_fed = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading elements a and b share."""
    n = min(len(a), len(b))
    if n and a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i]) if n else 0


def positions_reached(n_prompt: int, steps: int, max_new: int | None) -> int:
    """The forward positions a sequence of `n_prompt` tokens can use: `steps` (run.c's -n), or fewer where
    `max_new` generated tokens stop it first (the last one is sampled, never fed). A cache sized by it (and the
    model's context) holds everything the sequence feeds: where that is the whole context, a context shift can
    come; else it never does."""
    return steps if max_new is None else min(steps, n_prompt + max_new - 1)


def generate(engine: Engine, prompt_ids: list[int], steps: int, sampler: Sampler,
             stop_ids: Iterable[int] = (BOS,), context_shift: bool = False, n_keep: int | None = None,
             rotate_keys: bool = False, max_new: int | None = None) -> Iterator[int]:
    """Stream the tokens sampled after `prompt_ids` (run.c semantics: `steps` positions in all, and at most
    `max_new` generated tokens when given). With `context_shift`, `steps` may exceed seq_len; `n_keep`
    (default: the prompt) tokens stay in the window, and `rotate_keys` shifts the cache instead of
    recomputing it (see the module's docstring)."""
    # a context shift that can come needs the whole context (the window is the cache); else the positions reached
    batch = Batch(engine, 1, seq_len=positions_reached(len(prompt_ids), steps, max_new))
    keep = len(prompt_ids) if n_keep is None else n_keep
    seq = batch.add(Sequence(list(prompt_ids), sampler, steps, frozenset(stop_ids), context_shift=context_shift,
                             n_keep=keep, rotate_keys=rotate_keys, max_new=max_new))
    while not seq.done:
        for _, tok in batch.step():
            yield tok


def generate_batch(engine: Engine, prompts: list[list[int]], steps: int | list[int], samplers: list[Sampler],
                   stop_ids: Iterable[int] = (BOS,), on_token: Callable[[int, int], object] | None = None,
                   max_new: int | None = None, max_slots: int | None = None) -> list[Sequence]:
    """Generate after every prompt (one `Batch`; `steps` may differ per sequence and each stops on its own,
    also after `max_new` generated tokens when given). At most `max_slots` sequences (default: all) are live
    at once, each in its own cache slot; the others wait and join as slots free. `on_token(index, token)` is
    called as tokens arrive. Returns the sequences (their `generated` tokens and `stop_reason`; not their `logits`,
    which are dropped as each finishes), in prompt order."""
    return [seq for _, seq in stream_batch(engine, prompts, steps, samplers, stop_ids, on_token, max_new, max_slots)]


def stream_batch(engine: Engine, prompts: list[list[int]], steps: int | list[int], samplers: list[Sampler],
                 stop_ids: Iterable[int] = (BOS,), on_token: Callable[[int, int], object] | None = None,
                 max_new: int | None = None, max_slots: int | None = None) -> Iterator[tuple[int, Sequence]]:
    """`generate_batch`, yielding (index, sequence) in prompt order as soon as each is finished and all before
    it are, so a caller can print and drop them: memory stays bounded by `max_slots` live sequences (their KV
    cache) plus at most LOOKAHEAD x `max_slots` finished ones waiting for an earlier, longer one."""
    n = len(prompts)
    if isinstance(steps, int):
        steps = [steps] * n
    if not (n == len(steps) == len(samplers)):
        raise ValueError("prompts, steps and samplers must have one entry per sequence")
    if not n:
        return
    slots = max(1, min(n, max_slots or n))
    reached = max(positions_reached(len(p), s, max_new) for p, s in zip(prompts, steps))
    batch = Batch(engine, slots, seq_len=max(1, min(reached, engine.args.max_seq_len)))
    stops = frozenset(stop_ids)
    live: dict[int, tuple[int, Sequence]] = {}  # id(sequence) -> (index, sequence)
    finished: dict[int, Sequence] = {}
    admitted = emitted = 0
    while emitted < n:
        while batch.free_slots and admitted < min(n, emitted + LOOKAHEAD * slots):
            seq = batch.add(Sequence(list(prompts[admitted]), samplers[admitted], steps[admitted], stops,
                                     max_new=max_new))
            live[id(seq)] = (admitted, seq)
            admitted += 1
        for seq, tok in batch.step():
            if on_token is not None:
                on_token(live[id(seq)][0], tok)
        for key, (i, seq) in list(live.items()):
            if seq.done:
                batch.release(seq)
                del live[key]
                # its logits row is a view of its last step's logits, every sequence's in the step: kept by each
                # finished sequence, 1,000 prompts of a 32,000-token vocabulary held 360 MB
                seq.logits = None
                finished[i] = seq
        while emitted in finished:
            yield emitted, finished.pop(emitted)
            emitted += 1


LOOKAHEAD = 16  # finished sequences that may wait for an earlier one, per slot


__all__ = ["Batch", "Sequence", "generate", "generate_batch", "stream_batch"]
