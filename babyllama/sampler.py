"""Choosing the next token from logits by run.c's procedure (so `-s SEED` reproduces run.c's text).

All arithmetic is fp32 like run.c's; the random generator is run.c's xorshift64*. Where the native kernels are
loaded, a draw at temperature > 0 is one C call (`_logits_sampler`): its softmax rounds differently from
NumPy's in the last bits, the search through the probabilities is the same.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .config import CONTROL_DEFAULTS
from .errors import BabyLlamaError
from .fields import is_integer, is_number

_MASK64 = (1 << 64) - 1


class Rng:
    """run.c's xorshift64* generator on a 64-bit state: `u32` and `f32` are run.c's random_u32 and random_f32."""

    def __init__(self, seed: int):
        # a NumPy integer would overflow the mask; state 0 is xorshift's fixed point (every draw 0), which a
        # seed that is a multiple of 2**64 would reach: it takes seed 0's stand-in instead
        self.state = int(seed) & _MASK64 or ZERO_SEED

    def u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & _MASK64) >> 32

    def f32(self) -> np.float32:
        return np.float32((self.u32() >> 8) / 16777216.0)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(), dtype=np.float32)
    return e / e.sum(dtype=np.float32)


# The first index whose running fp32 sum of a contiguous float32 vector exceeds a threshold, in one pass (the
# native kernels lend theirs when their library loads: the same additions in the same order as np.cumsum, so
# the same index, in a fifth of the time); None: NumPy's cumsum and searchsorted.
_cdf_search: Callable[[np.ndarray, float], int] | None = None


def use_cdf_search(search: Callable[[np.ndarray, float], int] | None) -> None:
    global _cdf_search
    _cdf_search = search


# run.c's top-p sampling in one call (the native kernels lend theirs: the same fp32 arithmetic as
# sample_topp's NumPy path, so the same token); None: NumPy.
_topp_sampler: Callable[[np.ndarray, np.float32, np.float32, np.float32], int] | None = None


def use_topp_sampler(sampler: Callable[[np.ndarray, np.float32, np.float32, np.float32], int] | None) -> None:
    global _topp_sampler
    _topp_sampler = sampler


# Sampler.sample for temperature > 0 in one call (the native kernels lend theirs: run.c's procedure on their own
# softmax, whose probabilities agree with `softmax`'s to a few units in the last place, so a coin within that of a
# boundary between two tokens may pick the other; the search itself is the same); None: NumPy.
_logits_sampler: Callable[[np.ndarray, float, float, np.float32], int] | None = None


def use_logits_sampler(sampler: Callable[[np.ndarray, float, float, np.float32], int] | None) -> None:
    global _logits_sampler
    _logits_sampler = sampler


def sample_mult(probs: np.ndarray, coin: np.float32) -> int:
    """First index whose running CDF exceeds the coin (the last index if rounding leaves it short)."""
    search = _cdf_search
    if search is not None and probs.dtype == np.float32 and probs.ndim == 1 and probs.flags.c_contiguous:
        return search(probs, float(coin))
    cdf = np.cumsum(probs, dtype=np.float32)
    i = int(np.searchsorted(cdf, coin, side="right"))
    return min(i, len(probs) - 1)


def _cutoff(n: int, topp: float) -> np.float32:
    """run.c's floor for top-p candidates: below (1-topp)/(n-1) a token cannot be in the nucleus."""
    return np.float32((1.0 - np.float32(topp)) / (n - 1))


def nucleus(probs: np.ndarray, topp: float) -> tuple[np.ndarray, np.ndarray]:
    """run.c's top-p set: drop candidates below the cutoff before sorting (they cannot be in it, and sorting
    the whole vocabulary is what costs), then keep the smallest prefix, by falling probability, whose mass
    exceeds topp. Returns its token ids and their running mass."""
    cand = np.flatnonzero(probs >= _cutoff(len(probs), topp))
    if not len(cand):  # topp under 1/n on a flat distribution (run.c reads out of bounds): the top token
        cand = np.array([probs.argmax()])
    p = probs[cand]
    order = np.argsort(-p, kind="stable")
    cand, cum = cand[order], np.cumsum(p[order], dtype=np.float32)
    over = np.flatnonzero(cum > np.float32(topp))
    last = int(over[0]) if len(over) else len(cand) - 1
    return cand[: last + 1], cum[: last + 1]


def sample_topp(probs: np.ndarray, topp: float, coin: np.float32) -> int:
    """run.c's nucleus sampling: a coin scaled by the nucleus's mass, looked up in its running mass. Where the
    most likely token alone holds more than topp (often, for a trained model), the nucleus is that token and
    any coin picks it: the first of the largest, as the stable sort would put it."""
    top = int(probs.argmax())
    if probs[top] > np.float32(topp):
        return top
    native = _topp_sampler
    if native is not None and probs.dtype == np.float32 and probs.ndim == 1 and probs.flags.c_contiguous:
        token = native(probs, np.float32(topp), _cutoff(len(probs), topp), coin)
        if token >= 0:
            return token
    cand, cum = nucleus(probs, topp)
    r = np.float32(coin * cum[-1])
    i = int(np.searchsorted(cum, r, side="right"))
    return int(cand[min(i, len(cand) - 1)])


def check_logits(logits: np.ndarray) -> None:
    """Logits with a NaN or +inf (a model whose arithmetic overflowed) have no distribution to draw from:
    one clear error rather than an argmax of NaN or an empty nucleus. The max is NaN if any entry is."""
    top = float(np.max(logits))
    if not math.isfinite(top):
        raise BabyLlamaError(f"the model produced {'NaN' if math.isnan(top) else 'infinite'} logits: its weights "
                             "overflow in fp32 (or are corrupt)")


def overflows(top: float, temperature: float) -> bool:
    """Whether the largest logit divided by the temperature leaves fp32 (a temperature near 0, or one that rounds
    to 0 in fp32): softmax(logits / temperature) is then NaN, and what sampling tends to as the temperature goes
    to 0 is the argmax. The division is the one the softmax makes, in fp32."""
    with np.errstate(over="ignore"):  # a temperature beyond fp32's range is inf there: nothing overflows after it
        t = np.float32(temperature)
    if abs(float(top)) < float(t) * 3e38:  # well below fp32's largest, 3.4e38 (every draw: no NumPy error state)
        return False
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return not np.isfinite(np.float32(top) / t)


def one_hot(n: int, i: int) -> np.ndarray:
    out = np.zeros(n, dtype=np.float32)
    out[i] = 1.0
    return out


# seed 0's stand-in (run.c reads 0 as "the time") where 0 is a seed like any other (the Python API, the server): no
# other seed they sample with reaches it (theirs are below config.SEED_LIMIT, plus a choice index), so seed 0 is
# reproducible without repeating another seed's text
ZERO_SEED = 2**64 - 1


def choice_seed(base: int, i: int = 0) -> int:
    """Sequence (choice) i samples with seed base + i (run.c's -s); 0, which run.c reads as "the time", becomes a
    fixed stand-in (ZERO_SEED) so that seed 0 is reproducible too."""
    return int(base) + i or ZERO_SEED  # int(): a NumPy integer seed would wrap around (with a warning) near 2**63


def batch_seeds(base: int, n: int) -> list[int]:
    """choice_seed(base, i) for i < n, as the 64-bit seeds run.c's generator keeps (a negative base, as run.c
    reads -s, is 2**64 + base), with one difference: where the batch runs through 0 from just below 2**64 the
    sequence before the one at 0 already has ZERO_SEED (2**64 - 1), so the one at 0 takes 2**63, which no seed of
    such a batch reaches."""
    seeds = [(int(base) + i) % 2**64 for i in range(n)]
    stand_in = 2**63 if ZERO_SEED in seeds else ZERO_SEED
    return [seed or stand_in for seed in seeds]


LOGIT_BIAS_LIMIT = 100  # OpenAI's range for a token's logit bias: [-100, 100]

# Each control's (type, whether a value is in range, the rule a message states): the one range check of the CLI,
# the Python API and the server. NaN fails every comparison, so it is refused too.
CONTROL_RANGES: dict[str, tuple[type, Callable[[Any], bool], str]] = {
    "top_k": (numbers.Integral, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "min_p": (numbers.Real, lambda v: 0.0 <= v <= 1.0, "in [0, 1] (0: off)"),
    "repeat_penalty": (numbers.Real, lambda v: 0.0 < v < math.inf, "a finite number > 0 (1: off)"),
    "repeat_last_n": (numbers.Integral, lambda v: v >= -1, "an integer >= -1 (-1: every token of the window, 0: off)"),
    "presence_penalty": (numbers.Real, lambda v: -2.0 <= v <= 2.0, "in [-2, 2] (0: off)"),
    "frequency_penalty": (numbers.Real, lambda v: -2.0 <= v <= 2.0, "in [-2, 2] (0: off)"),
}


def sampling_problem(temperature: float, topp: float) -> tuple[str, str] | None:
    """The first of temperature and top-p out of the range the interfaces accept, as Controls.problem gives a
    control's: its name and "must be RULE, got VALUE"; None when both are in range. (Sampler itself takes any
    top-p, as run.c does: outside (0, 1) it samples the whole distribution.)"""
    if not is_number(temperature) or not 0 <= temperature < math.inf:  # also refuses NaN
        return "temperature", f"must be a finite number >= 0, got {temperature!r}"
    if not is_number(topp) or not 0.0 <= topp <= 1.0:
        return "topp", f"must be in [0, 1], got {topp!r}"
    return None


@dataclass(frozen=True)
class Controls:
    """llama.cpp's and OpenAI's sampling controls, a step before run.c's draw (the defaults leave it out):

    - OpenAI's and llama.cpp's logit bias, on a copy of the logits: each (token id, bias) of `logit_bias` adds
      the bias, in [-100, 100], to that token's logit (-100 all but bans it, 100 all but forces it);
    - penalties: llama.cpp's repeat penalty on each distinct token among the last
      `repeat_last_n` tokens of the sequence, prompt included (a positive logit divided by it, a negative one
      multiplied); then OpenAI's `logit -= count * frequency_penalty + (count > 0) * presence_penalty`, count being
      how often the token was generated so far in this choice (the prompt not counted);
    - then the candidates: those whose probability is at least `min_p` times the likeliest's (on the penalized
      logits before temperature, as llama.cpp's default order has it), of which the `top_k` likeliest (ties: the
      lower token id first, so top_k 1 is greedy's token).

    Temperature and top-p then apply to the candidates as run.c applies them to the whole vocabulary."""

    top_k: int = CONTROL_DEFAULTS["top_k"]
    min_p: float = CONTROL_DEFAULTS["min_p"]
    repeat_penalty: float = CONTROL_DEFAULTS["repeat_penalty"]
    repeat_last_n: int = CONTROL_DEFAULTS["repeat_last_n"]
    presence_penalty: float = CONTROL_DEFAULTS["presence_penalty"]
    frequency_penalty: float = CONTROL_DEFAULTS["frequency_penalty"]
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs, each id once

    def problem(self, vocab_size: int | None = None) -> tuple[str, str] | None:
        """The first control out of range: its name and "must be RULE, got VALUE" (each interface names it its
        own way: a flag, an argument, a request field); None when all are in range. With `vocab_size`, the
        logit bias's token ids must lie in the vocabulary."""
        for name, (kind, ok, rule) in CONTROL_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
                return name, f"must be {rule}, got {value!r}"
        ids = f" in [0, {vocab_size})" if vocab_size is not None else ""
        for token, bias in self.logit_bias:
            if not (is_integer(token) and 0 <= token < (vocab_size if vocab_size is not None else math.inf)
                    and is_number(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                return "logit_bias", (f"must map token ids{ids} to biases in [-{LOGIT_BIAS_LIMIT}, "
                                      f"{LOGIT_BIAS_LIMIT}], got {token!r}: {bias!r}")
        if len({token for token, _ in self.logit_bias}) < len(self.logit_bias):
            return "logit_bias", "must give each token id once"
        return None

    @cached_property
    def _bias_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """logit_bias as token ids and float32 biases, made once (a request may list thousands)."""
        return (np.array([t for t, _ in self.logit_bias], dtype=np.int64),
                np.array([b for _, b in self.logit_bias], dtype=np.float32))

    @property
    def penalizes(self) -> bool:
        """Whether the logits change before the candidates are chosen: a logit bias or a penalty."""
        return bool(self.logit_bias) or self.repeats or self.counts_generated

    @property
    def neutral(self) -> bool:
        """Whether every control is off: sampling is then run.c's alone."""
        return not (self.top_k or self.min_p or self.penalizes)

    @property
    def repeats(self) -> bool:
        """Whether the repeat penalty applies."""
        return self.repeat_penalty != 1.0 and self.repeat_last_n != 0

    @property
    def counts_generated(self) -> bool:
        """Whether the presence or frequency penalty applies (both look at the generated tokens' counts)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    def apply_penalties(self, logits: np.ndarray, recent_ids: np.ndarray | None, gen_ids: np.ndarray | None,
                        gen_counts: np.ndarray | None) -> np.ndarray:
        """The penalties on a float32 copy of `logits`: the repeat penalty on `recent_ids` (the distinct tokens of
        the window, ascending), the presence and frequency penalties on `gen_ids` generated `gen_counts` times
        (None: that penalty is off, or nothing was generated yet), after the logit bias."""
        x = np.array(logits, dtype=np.float32)
        if self.logit_bias:
            ids, biases = self._bias_arrays
            x[ids] += biases
        if recent_ids is not None:
            v = x[recent_ids]
            # a penalty beyond fp32's range takes its nearest finite one (an infinite one, or one rounded to 0,
            # would make a logit of 0 NaN): the penalized logits reach their limits, overflowing quietly
            f32 = np.finfo(np.float32)
            penalty = np.float32(min(max(self.repeat_penalty, float(f32.tiny)), float(f32.max)))
            with np.errstate(over="ignore", under="ignore"):
                x[recent_ids] = np.where(v > 0, v / penalty, v * penalty)
        if gen_ids is not None and gen_counts is not None:
            x[gen_ids] -= (gen_counts * self.frequency_penalty + self.presence_penalty).astype(np.float32)
        return x

    def candidates(self, logits: np.ndarray) -> np.ndarray | None:
        """The ids that min_p and top_k keep, ascending (so that run.c's draw on them breaks ties as on the whole
        vocabulary); None: every token."""
        ids = None
        if self.min_p > 0.0:
            # p_i / p_max = exp(x_i - x_max) >= min_p
            ids = np.flatnonzero(logits >= logits.max() + np.float32(math.log(self.min_p)))
        n = len(logits) if ids is None else len(ids)
        if 0 < self.top_k < n:
            x = logits if ids is None else logits[ids]
            kth = np.partition(x, n - self.top_k)[n - self.top_k]  # the k-th largest
            above = np.flatnonzero(x > kth)
            keep = np.concatenate([above, np.flatnonzero(x == kth)[: self.top_k - len(above)]])
            keep.sort()
            ids = keep if ids is None else ids[keep]
        return ids


class RunningCounts:
    """How often each token occurs among the last `window` tokens of a growing sequence (window < 0: all of
    them), kept up to date as it grows: a step counts its new token in and the one leaving the window out, so
    a penalty costs the same at token 20,000 as at token 20 instead of recounting the history. It follows one
    list as it is appended to (a chat's tokens across its turns); another list, a shorter one or a changed
    last token is counted again from scratch."""

    def __init__(self, window: int):
        self.window = window
        self.source: Sequence[int] | None = None
        self.seen = 0  # the source's tokens counted so far
        self.last: int | None = None  # the last of them, to tell a list changed in place
        self.counts = np.zeros(0, dtype=np.int64)

    def update(self, tokens: Sequence[int], vocab_size: int) -> np.ndarray:
        """The counts (vocab_size int64s) for `tokens` as they are now."""
        n = len(tokens)
        if (tokens is not self.source or n < self.seen or len(self.counts) != vocab_size
                or (self.seen and tokens[self.seen - 1] != self.last)):
            self.source, self.seen = tokens, 0
            self.counts = np.zeros(vocab_size, dtype=np.int64)
        if n > self.seen:
            self._add(tokens, self.seen, n, 1)
            if self.window >= 0:  # the window moved from [seen - window, seen) to [n - window, n)
                self._add(tokens, max(0, self.seen - self.window), max(0, n - self.window), -1)
            self.seen, self.last = n, tokens[n - 1]
        return self.counts

    def _add(self, tokens: Sequence[int], start: int, end: int, sign: int) -> None:
        if end - start == 1:
            self.counts[tokens[start]] += sign
        elif end > start:
            np.add.at(self.counts, np.asarray(tokens[start:end], dtype=np.int64), sign)


class Sampler:
    """temperature 0 → argmax; otherwise softmax(logits / temperature) sampled plainly or with top-p (the argmax
    too where the temperature is so small that logits / temperature overflow fp32: its limit). `controls` (see
    Controls) first penalize the logits and choose the candidates; the greedy token is then the penalized logits'
    argmax."""

    def __init__(self, temperature: float = 1.0, topp: float = 0.9, seed: int | None = None,
                 controls: Controls | None = None):
        if not temperature >= 0:  # also refuses NaN
            raise ValueError("temperature must be >= 0")
        if math.isnan(topp):
            raise ValueError("top-p must be a number in [0, 1]")
        problem = controls.problem() if controls is not None else None
        if problem:
            raise ValueError(" ".join(problem))
        self.temperature = float(temperature)
        self.topp = float(topp)
        self.rng = Rng(seed if seed else int(time.time()))
        # None where every control is off: run.c's sampling, untouched
        self.controls = None if controls is None or controls.neutral else controls
        # the penalties' counts, kept as the sequence grows
        self._recent = RunningCounts(controls.repeat_last_n if controls is not None else 0)
        self._generated = RunningCounts(-1)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution this sampler draws from (before top-p truncation)."""
        x = np.asarray(logits, dtype=np.float32)
        if self.temperature == 1.0:
            return softmax(x)  # x / 1 is x
        best = int(x.argmax())
        if overflows(x[best], self.temperature):
            return one_hot(len(x), best)
        with np.errstate(over="ignore"):  # a logit far below the largest may reach -inf: its probability is 0
            return softmax(x / np.float32(self.temperature))

    def distribution(self, logits: np.ndarray) -> np.ndarray:
        """The distribution `sample` draws from, top-p truncation and the controls' candidates included
        (renormalized): what speculative decoding compares between draft and target. The penalties, which need
        the sequence, are left out (speculative decoding refuses them). Needs temperature > 0."""
        check_logits(logits)
        x = np.asarray(logits, dtype=np.float32)
        ids = self.controls.candidates(x) if self.controls is not None else None
        if ids is None:
            return self._distribution(x)
        out = np.zeros(len(x), dtype=np.float32)  # the candidates' distribution, in the whole vocabulary's places
        out[ids] = self._distribution(x[ids]) if len(ids) > 1 else 1.0
        return out

    def _distribution(self, logits: np.ndarray) -> np.ndarray:
        probs = self.probs(logits)
        if not 0.0 < self.topp < 1.0:
            return probs
        keep, cum = nucleus(probs, self.topp)
        out = np.zeros_like(probs)
        out[keep] = probs[keep] / cum[-1]
        return out

    def sample(self, logits: np.ndarray, tokens: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        """The next token after `tokens` (the sequence so far, prompt included, of which `generated` are the tokens
        this choice generated): what the controls' penalties look at; run.c's sampling looks at the logits only."""
        best = int(logits.argmax())  # the first NaN where there is one, else the largest (+inf included)
        if not math.isfinite(logits[best]):
            check_logits(logits)
        if self.controls is not None:
            return self._sample_controlled(self.controls, logits, tokens, generated)
        if self.temperature == 0.0:
            return best
        coin = self.rng.f32()  # drawn even where it is not needed: later draws do not depend on this one's path
        return self._draw(logits, best, coin)

    def _sample_controlled(self, controls: Controls, logits: np.ndarray, tokens: Sequence[int],
                           generated: Sequence[int]) -> int:
        """`sample` with the controls: penalties, then run.c's draw among the candidates."""
        x = self._penalize(controls, logits, tokens, generated)
        if self.temperature == 0.0:
            return int(x.argmax())  # min_p and top_k always keep the (first) argmax
        coin = self.rng.f32()
        ids = controls.candidates(x)
        if ids is None:
            return self._draw(x, int(x.argmax()), coin)
        if len(ids) == 1:
            return int(ids[0])
        sub = np.ascontiguousarray(x[ids], dtype=np.float32)
        return int(ids[self._draw(sub, int(sub.argmax()), coin)])

    def _penalize(self, controls: Controls, logits: np.ndarray, tokens: Sequence[int],
                  generated: Sequence[int]) -> np.ndarray:
        """The logits after the penalties (a float32 copy; `logits` itself when there are none): `tokens` is the
        sequence so far, prompt included, `generated` the tokens this choice generated so far, both read through
        running counts (RunningCounts) rather than counted again each step."""
        if not controls.penalizes:
            return logits
        recent_ids = gen_ids = gen_counts = None
        if controls.repeats:
            recent_ids = np.flatnonzero(self._recent.update(tokens, len(logits)))
        if controls.counts_generated and len(generated):
            counts = self._generated.update(generated, len(logits))
            gen_ids = np.flatnonzero(counts)
            gen_counts = counts[gen_ids]
        return controls.apply_penalties(logits, recent_ids, gen_ids, gen_counts)

    def _draw(self, logits: np.ndarray, best: int, coin: np.float32) -> int:
        """run.c's draw at temperature > 0 with `coin`; `best`: the logits' argmax."""
        if overflows(logits[best], self.temperature):
            return best
        native = _logits_sampler
        if native is not None and logits.dtype == np.float32 and logits.ndim == 1 and logits.flags.c_contiguous:
            token = native(logits, self.temperature, self.topp, coin)  # one C call instead of a dozen NumPy ones
            if token >= 0:
                return token
        probs = self.probs(logits)
        if 0.0 < self.topp < 1.0:
            return sample_topp(probs, self.topp, coin)
        return sample_mult(probs, coin)


def top_logprobs(logits: np.ndarray, token: int, k: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probabilities (log-softmax of the logits, before temperature and top-p) of `token` and
    of the k most likely tokens, most likely first: what an OpenAI `logprobs` answer reports."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    logp = x - (m + np.log(np.exp(x - m).sum()))
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, len(x))
        ids = np.argpartition(-logp, k - 1)[:k]
        ids = ids[np.argsort(-logp[ids], kind="stable")]
        top = [(int(i), float(logp[i])) for i in ids]
    return float(logp[token]), top
