"""Every fast path against the plain path: Q8_0 kernel, grouped products, prefill, batches, context shift,
speculative decoding. Tolerances: fp32 paths agree to 1e-5 (same sums, different BLAS call shapes); Q8_0
kernels to 1e-5 relative (the same int8 products, summed in another order)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_greedy_agree, logits_after, random_weights, tiny_args

from babyllama import kernels, kernels_native
from babyllama.engine import Engine
from babyllama.errors import BabyLlamaError
from babyllama.generate import Sequence, generate, generate_batch
from babyllama.kernels_base import NumpyKernels
from babyllama.sampler import Controls, Sampler
from babyllama.speculative import SpecStats, speculative_generate

rng = np.random.default_rng(3)


@pytest.fixture(params=kernels.BACKENDS)
def q8_backend(request):
    """Run a test with each kernel backend: the C kernels, numba, and the NumPy fallback."""
    if request.param == "numba":
        pytest.importorskip("numba")
    if request.param == "native" and native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    assert kernels.use_backend(request.param) == request.param
    yield request.param
    kernels.use_backend()


def native_unavailable() -> bool:
    return kernels_native.compiler() is None


@pytest.mark.parametrize("group_size", [64, 8])  # 8: not a multiple of 32, the kernels' scalar path
@pytest.mark.parametrize("rows", [1, 3, 8, 11, kernels.QUANT_GEMM_MIN_ROWS + 4,
                                  kernels_native.QUANT_NATIVE_GEMM_MIN_ROWS + 4])
# 11: 8 + 3 tokens; the last two: the dequantize + sgemm path (the native kernel takes up to 47 rows)
def test_q8_kernel_matches_runq_reference(rows, group_size, q8_backend):
    w = random_weights(tiny_args(dim=128, hidden_dim=256), scale=0.2).quantize(group_size)
    assert w.wq[0].group_size == group_size
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    ws = [w.w1[0], w.wq[0], w.wk[1]]
    got = kernels.matmul_many(x, ws)
    for g, m in zip(got, ws, strict=True):
        ref = kernels.matmul_q8(x, m)
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("rows", [1, 8])
def test_q8_kernel_takes_the_full_int8_range(rows, q8_backend):
    """Weights and activations at -128 and +-127 (files from other quantizers may hold -128): the byte
    multiply-add's |w| and its pair sums must neither wrap nor saturate."""
    from babyllama.formats import QTensor

    n, gs = 128, 64
    q = np.tile(np.array([-128, 127, -127, -128], dtype=np.int8), (5, n // 4))
    w = QTensor(q, np.full((5, n // gs), 0.01, dtype=np.float32), gs)
    x = np.tile(np.array([1.0, -1.0, 1.0, 1.0], dtype=np.float32), (rows, n // 4))  # quantizes to +-127
    ref = kernels.matmul_q8(x, w)
    np.testing.assert_allclose(kernels.matmul_many(x, [w])[0], ref, rtol=1e-6)
    assert np.all(ref != 0)


def test_backend_choice_and_fallback(monkeypatch):
    """The best available backend is chosen; one that cannot load falls back down the list."""
    pytest.importorskip("numba")
    if native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    try:
        monkeypatch.delenv("BABYLLAMA_KERNELS", raising=False)  # the choice made without it
        assert kernels.use_backend() == "native"
        monkeypatch.setenv("BABYLLAMA_NATIVE", "0")  # out of the default choice, still there when named
        assert kernels.use_backend() == "numba"
        assert kernels.use_backend("native") == "native"
        monkeypatch.setattr(kernels_native, "load", lambda **kw: None)  # as if the library could not be built
        assert kernels.use_backend("native") == "numba"
        monkeypatch.setenv("BABYLLAMA_KERNELS", "numpy")
        assert kernels.use_backend() == "numpy" and kernels.backend().name == "numpy"
        with pytest.raises(ValueError, match="unknown kernel backend"):
            kernels.use_backend("cuda")
    finally:
        monkeypatch.undo()
        kernels.use_backend()


@pytest.mark.parametrize("quantized", [False, True])
def test_fast_engine_matches_plain(quantized, q8_backend):
    w = random_weights(tiny_args(), scale=0.2)
    w = w.quantize() if quantized else w
    fast, plain = Engine(w), Engine(w, plain=True)
    tokens = rng.integers(0, w.args.vocab_size, 20).tolist()  # 20 rows: the Q8_0 prefill takes the sgemm path
    for positions in (range(20), range(3)):
        toks = tokens[: len(positions)]
        a = fast.forward(toks, positions, fast.new_cache())
        b = plain.forward(toks, positions, plain.new_cache())
        np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max(), rtol=0)
    greedy = [list(generate(e, [1, 7, 9], 40, Sampler(0.0))) for e in (fast, plain)]
    # different arithmetic (kernels vs NumPy): equal up to the first near-tie
    assert_greedy_agree(greedy[1], greedy[0], lambda i: logits_after(plain, [1, 7, 9] + greedy[1][:i]), 1e-2,
                        min_same=10)


def test_prefill_equals_token_by_token():
    w = random_weights(tiny_args(), scale=0.2).quantize()
    e = Engine(w)
    tokens = rng.integers(0, w.args.vocab_size, 24).tolist()
    batched = e.forward(tokens, range(24), e.new_cache(), logits="last")
    cache = e.new_cache()
    for i, t in enumerate(tokens):
        last = e.forward([t], [i], cache)
    # the batched prompt (sgemm on dequantized Q8_0) and the int8 kernel: same sums, rounded differently
    np.testing.assert_allclose(batched, last, atol=1e-4 * np.abs(last).max(), rtol=0)


def test_batched_generation_equals_one_by_one():
    w = random_weights(tiny_args(), scale=0.2)
    e = Engine(w)
    prompts = [[1, 5], [1, 9, 10, 11, 12], [1, 200], [1, 42, 43]]
    steps = [30, 12, 25, 40]  # per-sequence lengths
    seqs = generate_batch(e, prompts, steps, [Sampler(0.0) for _ in prompts])
    for p, n, seq in zip(prompts, steps, seqs, strict=True):
        # the batch's first step is a 12-token prefill (BLAS), each one alone a short one (the decode kernel)
        alone = list(generate(e, p, n, Sampler(0.0)))
        same = assert_greedy_agree(alone, seq.generated, lambda i, p=p, a=alone: logits_after(e, p + a[:i]), 1e-2)
        if same == len(alone):
            assert seq.stop_reason == "length" and len(p) + len(seq.generated) == n + 1


def test_batched_sampling_and_stop_tokens_per_sequence():
    w = random_weights(tiny_args(), scale=0.2)
    e = Engine(w)
    prompts = [[1, 5], [1, 9, 10]]
    alone = [list(generate(e, p, 30, Sampler(1.0, 0.9, 11 + i))) for i, p in enumerate(prompts)]
    stop = alone[0][3]  # make the first sequence stop early on one of its own tokens
    seqs = generate_batch(e, prompts, 30, [Sampler(1.0, 0.9, 11 + i) for i in range(2)], stop_ids={stop})
    assert seqs[0].stop_reason == "stop" and seqs[0].generated == alone[0][: alone[0].index(stop)]
    expect = alone[1][: alone[1].index(stop)] if stop in alone[1] else alone[1]
    assert seqs[1].generated == expect


def test_context_shift_continues_past_seq_len_like_a_fresh_run_on_the_window():
    args = tiny_args(max_seq_len=24)
    w = random_weights(args, scale=0.2)
    e = Engine(w)
    prompt = [1, 17, 18]
    plain = list(generate(e, prompt, args.max_seq_len, Sampler(0.0)))
    shifted = list(generate(e, prompt, 60, Sampler(0.0), context_shift=True))
    assert len(shifted) == 60 + 1 - len(prompt) and shifted[: len(plain)] == plain  # identical before the shift
    # after it: each token is the greedy choice of a fresh run over the window the cache then holds
    tokens = prompt + shifted
    checked = 0
    for n in range(args.max_seq_len + 1, len(tokens)):
        window = _window_at(tokens[:n], len(prompt), args.max_seq_len)  # replays the shifts made up to n
        fresh = e.forward(window, range(len(window)), e.new_cache(), logits="last")[0]
        # a fresh prefill (BLAS) against the decode kernel: the same choice unless it was a near-tie
        assert int(np.argmax(fresh)) == tokens[n] or fresh.max() - fresh[tokens[n]] < 1e-2, n
        checked += 1
    assert checked > 20


def _window_at(tokens: list[int], n_keep: int, seq_len: int) -> list[int]:
    """Replays Sequence.shift_if_full over a growing token list: the window when tokens[-1] is fed."""
    seq = Sequence([], Sampler(0.0), 10**6, context_shift=True, n_keep=n_keep)
    for t in tokens:
        seq.tokens.append(t)
        seq.shift_if_full(seq_len)
    return seq.window()


@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("seq_len", [1, 2, 3])
def test_context_shift_in_a_context_of_a_few_positions(seq_len, rotate):
    """Half of a context of 1 or 2 after the kept tokens is no position: a shift still keeps the token just
    sampled (it is the next input), and generation goes on for every step asked for."""
    e = Engine(random_weights(tiny_args(max_seq_len=seq_len), scale=0.3))
    prompt = [1, 17]
    out = list(generate(e, prompt, 12, Sampler(0.0), context_shift=True, rotate_keys=rotate, stop_ids=()))
    assert len(out) == 12 + 1 - len(prompt)
    tokens = prompt + out
    for n in range(seq_len + 1, len(tokens)):
        window = _window_at(tokens[:n], len(prompt), seq_len)
        assert window[-1] == tokens[n - 1] and len(window) <= seq_len, (n, window)
        if not rotate:  # recomputed windows: each token is the greedy choice of a fresh run over its window
            fresh = e.forward(window, range(len(window)), e.new_cache(), logits="last")[0]
            assert int(np.argmax(fresh)) == tokens[n] or fresh.max() - fresh[tokens[n]] < 1e-2, n


def test_a_sequence_sliding_past_its_context_holds_only_its_window():
    """`tokens` and `generated` kept every token of the run (~40 bytes each: an endless --context-shift run grew
    without bound); the dropped ones now leave them, n_dropped counts them, and -n / max_new count them all."""
    seq = Sequence([1, 2, 3], Sampler(0.0), 10**6, context_shift=True, n_keep=3)
    for t in range(5000):
        seq.tokens.append(t)
        seq.generated.append(t)
        seq.n_generated += 1
        seq.shift_if_full(64)
        assert len(seq.tokens) <= 64 and len(seq.generated) <= 64
    assert seq.tokens[:3] == [1, 2, 3] and seq.tokens[3:] == list(range(5000 - len(seq.tokens) + 3, 5000))
    assert seq.generated == seq.tokens[-len(seq.generated):] and len(seq.tokens) + seq.n_dropped == 5003
    e = Engine(random_weights(tiny_args(max_seq_len=16), scale=0.3))
    assert len(list(generate(e, [1, 17], 100, Sampler(0.0), context_shift=True, stop_ids=()))) == 99
    assert len(list(generate(e, [1, 17], 100, Sampler(0.0), context_shift=True, stop_ids=(), max_new=40))) == 40


def test_penalties_count_the_window_after_a_shift_that_drops_one_generated_token():
    """A shift that drops exactly one generated token, the new token equal to the one before it: the list is as
    long as before with the same last token, and the sampler's running counts must still see that it changed
    (the dropped token no longer counts, the new one does)."""
    seq = Sequence([1, 2, 3, 4], Sampler(0.0), 10**6, context_shift=True, n_keep=0)
    sampler = Sampler(0.0, controls=Controls(frequency_penalty=1.0))
    logits = np.zeros(32, dtype=np.float32)
    logits[10], logits[0] = 1.5, 1.0  # 10 wins unless it is still counted (1.5 - 1 < 1)
    for t in (10, 11, 12, 13):
        seq.tokens.append(t)
        seq.generated.append(t)
        sampler.sample(logits, seq.tokens, seq.generated)  # counts follow the lists as they grow
    seq.tokens.append(13)
    seq.generated.append(13)
    assert seq.shift_if_full(8) == 5 and seq.generated == [11, 12, 13, 13]  # 10, the first generated, dropped
    assert sampler.sample(logits, seq.tokens, seq.generated) == 10


def test_context_shift_window_keeps_the_prefix():
    seq = Sequence(list(range(30)), Sampler(0.0), 100, context_shift=True, n_keep=4)
    seq.shift_if_full(20)
    win = seq.window()
    assert win[:4] == [0, 1, 2, 3] and len(win) <= 20
    assert win[4:] == list(range(30 - len(win) + 4, 30))  # the newest tokens, contiguous


def _chat_sequence(first: list[int], *turns: tuple[list[int], list[int]]) -> Sequence:
    """A chat's sequence: the kept first turn, then (reply, next turn) pairs as chat adds them."""
    seq = Sequence(list(first), Sampler(0.0), 10**6, context_shift=True, n_keep=len(first))
    for reply, turn in turns:
        seq.tokens.extend(reply)
        seq.extend(turn)
    return seq


def test_context_shift_slides_whole_chat_turns_out():
    """A turn added by `extend` stays whole: the cut moves from the half to a turn start."""
    first, reply, turn = list(range(4)), list(range(100, 120)), list(range(200, 210))
    seq = _chat_sequence(first, (reply, turn))
    assert seq.shift_if_full(30) == len(reply)  # the half would keep reply[-3:] before the new turn
    assert seq.window() == first + turn
    # several old turns: the first turn start at or past the half, the newer ones kept
    turns = [(list(range(100 * k, 100 * k + 6)), list(range(100 * k + 50, 100 * k + 55))) for k in range(1, 6)]
    seq = _chat_sequence(first, *turns)
    seq.shift_if_full(40)
    window = seq.window()
    assert window[:4] == first and window[4] in [t[0] for _, t in turns] and len(window) <= 40
    assert len(window) - 4 <= (40 - 4) // 2 + 5  # past the half by less than a turn and its reply
    assert window[4:] == seq.tokens[len(seq.tokens) - len(window) + 4:]


def test_context_shift_cuts_into_a_turn_only_when_it_and_its_reply_outgrow_the_room():
    first, turn = list(range(4)), list(range(200, 220))
    seq = _chat_sequence(first, (list(range(100, 110)), turn))
    seq.shift_if_full(30)
    assert seq.window() == first + turn  # the older reply made room
    for t in range(300, 320):  # the reply to the long turn goes on: its turn's oldest tokens slide out
        seq.tokens.append(t)
        seq.shift_if_full(30)
        assert len(seq.window()) <= 30 and seq.window()[-1] == t
    assert seq.window()[:4] == first and seq.window()[4] != turn[0]


@pytest.mark.parametrize("quantized", [False, True])
def test_speculative_greedy_is_identical_to_plain(quantized):
    target = random_weights(tiny_args(), seed=0, scale=0.2)
    draft = random_weights(tiny_args(n_layers=1), seed=5, scale=0.2)
    if quantized:
        target, draft = target.quantize(), draft.quantize()
    t, d = Engine(target), Engine(draft)
    for k in (1, 3, 5):
        stats = SpecStats()
        got = list(speculative_generate(t, d, [1, 9, 8], 50, Sampler(0.0), k=k, stats=stats))
        assert got == list(generate(t, [1, 9, 8], 50, Sampler(0.0)))
        assert stats.drafted > 0
    # the target as its own draft: every drafted token is accepted
    stats = SpecStats()
    list(speculative_generate(t, Engine(target), [1, 9], 40, Sampler(0.0), k=4, stats=stats))
    assert stats.accepted == stats.drafted > 0


class RowsByPrefix:
    """An engine whose logits rows are recorded by the tokens that led to them (what the cache held up to the
    row's position, and its own token): two runs' rows for the same prefix can then be compared."""

    def __init__(self, engine: Engine):
        self.engine, self.args, self.fed, self.rows = engine, engine.args, [], {}

    def new_cache(self, *a, **kw):
        return self.engine.new_cache(*a, **kw)

    def forward(self, tokens, positions, cache, slots=None, logits="all"):
        tokens, positions = list(tokens), list(positions)
        out = self.engine.forward(tokens, positions, cache, slots, logits)
        for t, p in zip(tokens, positions):
            self.fed[p:] = [t]
        for row, p in zip(out, positions[-len(out):]):
            self.rows.setdefault(tuple(self.fed[: p + 1]), []).append(row)
        return out


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("prompt_len", [6, 46, 600])
@pytest.mark.parametrize("k", [4, 12])
def test_speculative_verification_computes_the_plain_paths_logits(quantized, prompt_len, k):
    """Greedy speculative output is the target's greedy output only if the target's logits are the plain path's
    bit for bit: the prompt prefilled as plain decoding prefills it (not in one call with the first drafted
    tokens: with Q8_0 weights 48 rows or more take the dequantized sgemm where fewer take the int8 kernel, 0.06
    apart), and drafted tokens verified in one-call steps (FUSED_MAX_TOKENS at most), as decode steps run."""
    weights = random_weights(tiny_args(max_seq_len=1024), seed=0, scale=0.2)
    draft = random_weights(tiny_args(max_seq_len=1024, n_layers=1), seed=5, scale=0.2)
    if quantized:
        weights, draft = weights.quantize(), draft.quantize()
    prompt = [1] + rng.integers(3, 300, prompt_len - 1).tolist()
    plain, spec = RowsByPrefix(Engine(weights)), RowsByPrefix(Engine(weights))
    expected = list(generate(plain, prompt, prompt_len + 24, Sampler(0.0)))
    stats = SpecStats()
    got = list(speculative_generate(spec, Engine(draft), prompt, prompt_len + 24, Sampler(0.0), k=k, stats=stats))
    # the prompt goes through the same call on every backend; a step of several tokens equals one-token steps bit
    # for bit where the backend runs it in one call (native), else through other product shapes (to 1e-5)
    one_call = kernels.backend().name == "native"
    common = [key for key in plain.rows if key in spec.rows and len(key) >= prompt_len]
    assert tuple(prompt) in common
    if one_call:  # the prompt's row, then every decode step's
        assert len(common) == len(expected) and got == expected
    for key in common:
        for row in spec.rows[key]:
            if one_call or key == tuple(prompt):
                assert np.array_equal(row, plain.rows[key][0]), len(key)
            else:
                np.testing.assert_allclose(row, plain.rows[key][0], rtol=0, atol=1e-5 * np.abs(row).max())
    assert stats.drafted > 0


def test_speculative_caches_and_rope_tables_follow_the_positions_used():
    """As plain decoding's: a model whose header claims a huge context would otherwise get caches and RoPE
    tables for all of it (a 2**20 context: 10x the memory and time of the run without --draft; 2**24: refused)."""
    target = Engine(random_weights(tiny_args(max_seq_len=4096), scale=0.2))
    draft = Engine(random_weights(tiny_args(max_seq_len=4096, n_layers=1), seed=5, scale=0.2))
    made = []
    for e in (target, draft):
        real = e.new_cache
        e.new_cache = lambda n_slots=1, seq_len=None, real=real: made.append(seq_len) or real(n_slots, seq_len)
    out = list(speculative_generate(target, draft, [1, 5], 10, Sampler(0.0), k=4, stop_ids=()))
    assert out == list(generate(Engine(target.w), [1, 5], 10, Sampler(0.0), stop_ids=()))
    assert made == [10, 10] and len(target.cos) < 4096 and len(draft.cos) < 4096


def test_speculative_prefills_a_long_prompt_in_chunks_in_both_models():
    """A prompt goes through either model in PREFILL_CHUNK-token calls, as plain decoding prefills it: one call of
    all of it holds attention scores for every pair of its tokens (a 16k-token prompt: a GiB per head)."""
    from babyllama.generate import PREFILL_CHUNK

    target = Engine(random_weights(tiny_args(max_seq_len=2048), scale=0.2))
    draft = Engine(random_weights(tiny_args(max_seq_len=2048, n_layers=1), seed=5, scale=0.2))
    sizes: dict[str, list[int]] = {"target": [], "draft": []}

    def counted(name, forward):
        def spy(tokens, *a, **kw):
            sizes[name].append(len(tokens))
            return forward(tokens, *a, **kw)
        return spy

    target.forward, draft.forward = counted("target", target.forward), counted("draft", draft.forward)
    prompt = [1] + rng.integers(3, 300, 1100).tolist()
    out = list(speculative_generate(target, draft, prompt, len(prompt) + 8, Sampler(0.0), k=4))
    assert len(out) == 9 and sizes["draft"]
    assert max(sizes["target"]) == max(sizes["draft"]) == PREFILL_CHUNK


@pytest.mark.parametrize("broken", ["target", "draft"])
def test_speculative_greedy_refuses_nan_logits_as_plain_decoding_does(broken):
    """A model whose arithmetic overflows (NaN logits) is an error in plain greedy decoding; speculative greedy
    decoding must not print token 0 (argmax's pick among NaNs) in its place."""
    good = random_weights(tiny_args(), seed=0, scale=0.2)
    bad = random_weights(tiny_args(shared_classifier=False), seed=0, scale=0.2)
    bad.rms_final = bad.rms_final * np.float32(1e20)
    bad.wcls = bad.wcls * np.float32(1e20)  # products of 1e40: inf of both signs, summed to NaN
    t, d = (Engine(bad), Engine(good)) if broken == "target" else (Engine(good), Engine(bad))
    with pytest.raises(BabyLlamaError, match="NaN logits"):
        list(generate(Engine(bad), [1, 9, 8], 20, Sampler(0.0)))
    with pytest.raises(BabyLlamaError, match="NaN logits"):
        list(speculative_generate(t, d, [1, 9, 8], 20, Sampler(0.0), k=3))


def test_speculative_sampling_never_draws_a_token_outside_the_top_p_set():
    """Top-p distributions are zero outside their nucleus, and a coin at or above their running sum's fp32 total
    (1 - 2**-24 is a coin run.c's generator draws) finds no index: the draw must still be a token of the
    nucleus, not the vocabulary's last one, which the target would then accept (p/q of 0/0)."""
    args = tiny_args(n_layers=1)
    target = Engine(random_weights(args, seed=0, scale=0.6))
    draft = Engine(random_weights(args, seed=9, scale=0.6))
    prompt = [1, 2]
    sampler = Sampler(1.0, 0.9, 1)
    sampler.rng.f32 = lambda: np.float32(1 - 2**-24)  # every coin the largest one
    out = list(speculative_generate(target, draft, prompt, 16, sampler, k=3, stop_ids=()))
    for i, token in enumerate(out):
        p = sampler.distribution(logits_after(target, prompt + out[:i]))
        assert p[token] > 0, (i, token)


def test_speculative_sampling_preserves_the_target_distribution():
    """Exact marginal of the 2nd generated token under the target vs its empirical frequency."""
    args = tiny_args(vocab_size=6, n_layers=1)
    target = Engine(random_weights(args, seed=0, scale=0.6))
    draft = Engine(random_weights(args, seed=9, scale=0.6))
    prompt = [1, 2]
    s = Sampler(1.0, 1.0, 1)

    def marginal(e: Engine) -> np.ndarray:
        p1 = s.distribution(e.forward(prompt, range(2), e.new_cache(), logits="last")[0])
        rows = [e.forward(prompt + [t1], range(3), e.new_cache(), logits="last")[0] for t1 in range(6)]
        return sum(p1[t1] * s.distribution(rows[t1]) for t1 in range(6))

    exact = marginal(target)
    assert 0.5 * np.abs(marginal(draft) - exact).sum() > 0.15  # the draft alone would fail this test
    n = 2000
    counts = np.zeros(6)
    for seed in range(1, n + 1):
        out = list(speculative_generate(target, draft, prompt, 4, Sampler(1.0, 1.0, seed), k=2, stop_ids=()))
        counts[out[1]] += 1
    tv = 0.5 * np.abs(counts / n - exact).sum()
    assert tv < 0.05, (counts / n, exact)


def test_speculative_sampling_takes_top_k_and_min_p_and_refuses_penalties():
    """The draft and the target sample among the same candidates: top_k 1 (or min_p 1) is greedy's text at any
    temperature. The penalties depend on each drafted token: refused, not ignored."""
    from babyllama.errors import BabyLlamaError
    from babyllama.sampler import Controls

    t = Engine(random_weights(tiny_args(), seed=0, scale=0.2))
    d = Engine(random_weights(tiny_args(n_layers=1), seed=5, scale=0.2))
    greedy = list(generate(t, [1, 9, 8], 40, Sampler(0.0)))
    for controls in (Controls(top_k=1), Controls(min_p=1.0)):
        for seed in (1, 2):
            assert list(speculative_generate(t, d, [1, 9, 8], 40, Sampler(1.5, 0.9, seed, controls), k=3)) == greedy
    for controls in (Controls(repeat_penalty=1.1), Controls(presence_penalty=0.5), Controls(frequency_penalty=1),
                     Controls(logit_bias=((5, 1.0),))):
        with pytest.raises(BabyLlamaError, match="cannot apply a logit bias or repeat, presence or frequency"):
            list(speculative_generate(t, d, [1, 9, 8], 40, Sampler(1.0, 0.9, 1, controls)))


def _threads_seen(env_extra: dict, threads: int | None) -> str:
    """numba's thread count and OPENBLAS_NUM_THREADS in a fresh process after threads.configure."""
    code = ("import sys; from babyllama.threads import configure; configure(int(sys.argv[1]) or None)\n"
            "import os, numba; print(numba.get_num_threads(), os.environ.get('OPENBLAS_NUM_THREADS'))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code, str(threads or 0)], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_threads_flag_reaches_the_native_kernels():
    if native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    code = ("import sys; from babyllama.threads import configure; configure(int(sys.argv[1]) or None)\n"
            "from babyllama import kernels_native; print(kernels_native.load().threads())")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    for flag, extra, expected in ((1, {}, "1"), (0, {"OMP_NUM_THREADS": "1"}, "1"), (3, {}, "3")):
        out = subprocess.run([sys.executable, "-c", code, str(flag)], env={**env, **extra}, capture_output=True,
                             text=True, check=True)
        assert out.stdout.strip() == expected


def test_threads_flag_and_environment_reach_blas_and_numba():
    pytest.importorskip("numba")
    assert _threads_seen({}, 1) == "1 1"
    assert _threads_seen({"OPENBLAS_NUM_THREADS": "1"}, None) == "1 1"  # numba follows the BLAS setting


@pytest.mark.parametrize("n", [96, 101, 5])  # 101: 12 SIMD steps and a scalar tail; 5: the tail alone
@pytest.mark.parametrize("rows", [1, 3, kernels_native.F32_KERNEL_MAX_ROWS])
def test_fp32_decode_kernel_matches_blas(rows, n, q8_backend, monkeypatch):
    monkeypatch.setattr(kernels.backend(), "f32_min_elements", 0, raising=False)  # numba: small ones too
    x = rng.standard_normal((rows, n)).astype(np.float32)
    ws = [rng.standard_normal((m, n)).astype(np.float32) for m in (96, 7, 201)]
    for got, w in zip(kernels.matmul_many(x, ws), ws, strict=True):
        np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-5 * np.abs(x @ w.T).max())


def test_fast_fp32_engine_with_kernels_matches_plain(q8_backend, monkeypatch):
    monkeypatch.setattr(kernels.backend(), "f32_min_elements", 0, raising=False)
    w = random_weights(tiny_args(), scale=0.2)
    fast, plain = Engine(w), Engine(w, plain=True)
    greedy = [list(generate(e, [1, 7, 9], 40, Sampler(0.0))) for e in (fast, plain)]
    # different arithmetic (kernels vs NumPy): equal up to the first near-tie
    assert_greedy_agree(greedy[1], greedy[0], lambda i: logits_after(plain, [1, 7, 9] + greedy[1][:i]), 1e-2,
                        min_same=10)


def test_native_build_falls_back_through_flag_sets(tmp_path, monkeypatch, capsys):
    """A compiler that rejects a flag (here OpenMP's simd pragmas) still yields a library from the next flag
    set; one that fails everything yields None and one line on stderr naming the compiler and a marker that keeps
    its error, once: the next build tries nothing and says nothing."""
    if native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    real = kernels_native.compiler()
    fake = tmp_path / "cc"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp-simd ] && exit 1; done\nexec {real} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    lib = kernels_native.build(tmp_path / "ok", arch="native")
    assert lib is not None and len(list((tmp_path / "ok").glob("*.failed"))) == 1
    k = kernels_native.NativeKernels(lib)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    w = rng.standard_normal((10, 64)).astype(np.float32)
    np.testing.assert_allclose(k.matmul(x, [w])[0], x @ w.T, rtol=1e-5, atol=1e-5)

    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'kernels.c:1: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    capsys.readouterr()
    assert kernels_native.build(tmp_path / "bad", arch="native") is None
    markers = list((tmp_path / "bad").glob("*.failed"))
    assert len(markers) == len(kernels_native.flag_sets("native"))
    assert all("this compiler is broken" in m.read_text() for m in markers)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"did not compile with {broken} (see " in err[0], err
    assert any(f"(see {m})" in err[0] for m in markers), err
    assert kernels_native.build(tmp_path / "bad", arch="native") is None and capsys.readouterr().err == ""


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("rows", [1, 5])
def test_native_fused_products_match_numpy(quantized, rows):
    """The fused forms a decode step uses: norm= reads rmsnorm(x)*g, gate= reads silu(x)*g, into= adds."""
    from babyllama.formats import quantize_q80
    from babyllama.kernels_base import rmsnorm, silu

    native = kernels_native.load()
    if native is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    x = rng.standard_normal((rows, 64)).astype(np.float32)
    g = rng.standard_normal(64).astype(np.float32)
    ws = [rng.standard_normal((m, 64)).astype(np.float32) * 0.1 for m in (48, 16)]
    ws = [quantize_q80(w, 32) for w in ws] if quantized else ws

    def ref(inp, w):
        return kernels.matmul_q8(inp, w) if quantized else inp @ w.T

    tol = dict(rtol=1e-4, atol=1e-4)
    for got, w in zip(native.matmul(x, ws, norm=(g, 1e-5)), ws, strict=True):
        np.testing.assert_allclose(got, ref(rmsnorm(x, g, 1e-5), w), **tol)
    gate = rng.standard_normal((rows, 64)).astype(np.float32)
    np.testing.assert_allclose(native.matmul(x, ws[:1], gate=gate)[0], ref(silu(x) * gate, ws[0]), **tol)
    y = rng.standard_normal((rows, 48)).astype(np.float32)
    expected = y + ref(x, ws[0])
    out = native.matmul(x, ws[:1], into=y)[0]
    assert out is y
    np.testing.assert_allclose(y, expected, **tol)
    with pytest.raises(ValueError, match="one matrix"):
        native.matmul(x, ws, into=y)


def test_native_load_falls_back_on_unusable_cache(tmp_path, monkeypatch, capsys):
    """An unwritable cache folder, or a cached library that cannot be loaded although it matches the record of its
    build (so build() returns it: a folder mounted noexec refuses every library), means no native kernels and one
    line on stderr saying why, not a crash; the library stays, since building it again would fail the same way
    (it was compiled again on every run, ~15 s each). (One that does not match its record is rebuilt before it is
    loaded: test_kernels.py.)"""
    if native_unavailable():
        pytest.skip("no C compiler: the native kernels cannot be built here")
    built = kernels_native.build()  # in the usual cache (where other tests have built it): its file name
    monkeypatch.setattr(kernels_native, "_said", set())
    capsys.readouterr()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("BABYLLAMA_CACHE", str(blocker))  # cache root below a regular file
    assert kernels_native.load() is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("babyllama: cannot build the C kernels in their cache ("), err
    assert str(blocker) in err[0] and err[0].endswith("running without them, several times slower"), err

    monkeypatch.setenv("BABYLLAMA_CACHE", str(tmp_path / "cache"))
    lib = kernels_native.cache_root() / built.name  # the library this cache would hold, unloadable
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not a shared library")
    kernels_native.fingerprint_path(lib).write_text(kernels_native.fingerprint(lib))
    monkeypatch.setattr(kernels_native, "_run_compiler", lambda cmd: pytest.fail(f"compiled again: {cmd}"))
    assert kernels_native.load() is None and lib.read_bytes() == b"not a shared library"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"babyllama: cannot load the C kernels built in {lib.parent} ("), err
    assert kernels_native.load() is None and capsys.readouterr().err == ""  # said once a process


def test_native_load_without_a_home_folder_is_one_line(monkeypatch, capsys):
    """No $HOME and no password entry (a container run as an arbitrary user id): Path.home() raises (KeyError on
    Python 3.10, RuntimeError later): the kernels are skipped with one line that names the setting that places
    their cache elsewhere, not a traceback."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("BABYLLAMA_CACHE", raising=False)
    monkeypatch.setattr(kernels_native.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(kernels_native, "_said", set())
    monkeypatch.setattr(kernels_native, "compiler", lambda: "cc")
    assert kernels_native.load() is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no home folder to keep babyllama's cache in (set HOME or BABYLLAMA_CACHE)" in err[0], err


def test_an_empty_home_is_no_home(monkeypatch):
    """HOME set but empty is read as unset (the password entry's home), not as / (Path.home()'s reading, which put
    the cache in /.cache)."""
    import pwd
    from pathlib import Path

    from babyllama import safeio

    monkeypatch.setenv("HOME", "")
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    assert safeio.home_cache("native", instead="BABYLLAMA_CACHE") == home / ".cache" / "babyllama" / "native"


def test_a_tilde_in_babyllama_cache_is_the_home_folder(monkeypatch, tmp_path):
    """A "~" that no shell expanded (quoted, Docker's ENV, systemd's Environment=) made a folder named "~" in the
    current folder, a cache of its own in every folder a command ran in; bench's folder variable likewise."""
    from babyllama import bench, safeio

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BABYLLAMA_CACHE", "~/.cache/mine")
    assert safeio.cache_folder("native") == tmp_path / "home" / ".cache" / "mine" / "native"
    monkeypatch.setenv("BABYLLAMA_BENCH_DIR", "~/bench")
    assert bench.cache_dir() == tmp_path / "home" / "bench" and not (tmp_path / "~").exists()


def test_babyllama_spin_us_outside_its_range_is_an_error(monkeypatch):
    """BABYLLAMA_SPIN_US went through a C int: "4294967296" became 0 and 10**20 about 27 minutes of spinning
    after every job; "50us" was ignored without a word. Now 0..1,000,000 µs, else one error naming it."""
    for value, expected in (("", -1), ("0", 0), (" 200 ", 200), ("1000000", 1_000_000)):
        monkeypatch.setenv("BABYLLAMA_SPIN_US", value)
        assert kernels_native.spin_us() == expected
    for value in ("50us", "-1", "4294967296", "1" + "0" * 20, "１２"):
        monkeypatch.setenv("BABYLLAMA_SPIN_US", value)
        with pytest.raises(BabyLlamaError, match="BABYLLAMA_SPIN_US=.* must be a whole number of microseconds"):
            kernels_native.spin_us()


def test_without_a_compiler_the_first_run_says_so_once(tmp_path):
    """Without a C compiler the kernels fall back to numba or NumPy, several times slower: the first run says so
    in one line (it said nothing), later runs do not (a marker in the cache)."""
    from conftest import run_cli

    env = {"PATH": str(tmp_path / "empty"), "CC": "", "BABYLLAMA_CACHE": str(tmp_path / "cache"),
           "BABYLLAMA_KERNELS": ""}  # the default choice
    notes = []
    for named in ("", "", "native"):
        r = run_cli("run", "-t", "0", "-n", "8", env={**env, "BABYLLAMA_KERNELS": named})
        assert r.returncode == 0 and r.stdout.startswith(b"Once upon a time"), r.stderr.decode()
        notes.append([line for line in r.stderr.decode().splitlines() if line.startswith("babyllama:")])
    assert notes[:2] == [["babyllama: no C compiler (cc, gcc or clang on PATH, or $CC) to build the C kernels "
                          "with; running without them, several times slower"], []]
    # asked for by name, their absence is said on every run
    assert len(notes[2]) == 1 and notes[2][0].startswith("babyllama: the C kernels asked for cannot run here (no C "
                                                         "compiler, or the line above says why); running on ")


@pytest.mark.parametrize("head_size", [8, 12, 48, 96, 128])  # 12: the scalar path; 96, 128: two AVX2 chunks
def test_native_attention_step_matches_numpy(head_size):
    """The C attention (RoPE, cache writes, causal softmax attention) against the engine's NumPy attention,
    for a prompt-shaped run (causal inside the chunk) plus single decode tokens of other slots, with grouped
    key/value heads and lengths that are not multiples of the SIMD width."""
    native = kernels_native.load()
    if native is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    n_heads, kv_heads = 4, 2
    args = tiny_args(dim=n_heads * head_size, n_heads=n_heads, n_kv_heads=kv_heads, max_seq_len=64)
    engine = Engine(random_weights(args), plain=True)
    slots = np.array([0] * 21 + [1, 2])
    positions = np.array(list(range(3, 24)) + [40, 0])
    q = rng.standard_normal((len(slots), args.dim)).astype(np.float32)
    k, v = (rng.standard_normal((len(slots), args.kv_dim)).astype(np.float32) for _ in range(2))
    caches = [engine.new_cache(3), engine.new_cache(3)]
    for name in ("k", "v"):  # earlier positions already cached, the same in both
        filled = rng.standard_normal(caches[0].k.shape).astype(np.float32)
        getattr(caches[0], name)[:], getattr(caches[1], name)[:] = filled, filled
    cos, sin = engine.cos[positions], engine.sin[positions]
    hs = head_size
    shaped = q.reshape(-1, n_heads, hs), k.reshape(-1, kv_heads, hs), v.reshape(-1, kv_heads, hs)
    want = NumpyKernels().attention(*shaped, cos, sin, caches[0].k[0], caches[0].v[0], slots, positions)
    got = native.attention(*shaped, cos, sin, caches[1].k[0], caches[1].v[0], slots, positions)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(caches[1].k, caches[0].k, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(caches[1].v, caches[0].v)


def test_shift_cache_moves_entries_and_rerotates_keys():
    """After Engine.shift_cache, layer 0's keys equal those a fresh run computes at the new positions (a
    layer-0 key depends on its own token only), and every moved value is the old one."""
    args = tiny_args(max_seq_len=32)
    e = Engine(random_weights(args, scale=0.2))
    tokens = np.random.default_rng(5).integers(0, args.vocab_size, 20)
    cache = e.new_cache(2)
    e.forward(tokens, np.arange(20), cache, slots=np.ones(20, int))
    old_v = cache.v[:, 1].copy()
    e.shift_cache(cache, 1, 3, 5, 20)  # drop positions 3..7, move 8..19 down to 3..14
    window = np.concatenate([tokens[:3], tokens[8:]])
    fresh = e.new_cache(1)
    e.forward(window, np.arange(15), fresh)
    np.testing.assert_allclose(cache.k[0, 1, :, :15], fresh.k[0, 0, :, :15], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cache.v[:, 1, :, 3:15], old_v[:, :, 8:20])
    np.testing.assert_array_equal(cache.v[:, 1, :, :3], old_v[:, :, :3])


def test_context_shift_by_rotation_matches_across_engines():
    """--rotate-keys: generation goes past seq_len with the cache shifted in place (no recomputation), with
    the same greedy tokens on the fast, plain and PyTorch engines."""
    args = tiny_args(max_seq_len=24)
    w = random_weights(args, scale=0.2)
    prompt = [1, 17, 18]
    runs = {name: list(generate(engine, prompt, 70, Sampler(0.0), context_shift=True, rotate_keys=True))
            for name, engine in (("fast", Engine(w)), ("plain", Engine(w, plain=True)))}
    torch_model = pytest.importorskip("babyllama.model")
    runs["torch"] = list(generate(torch_model.TorchEngine(torch_model.Transformer.from_weights(w)), prompt, 70,
                                  Sampler(0.0), context_shift=True, rotate_keys=True))
    assert len(runs["fast"]) == 70 + 1 - len(prompt)
    assert runs["fast"] == runs["plain"] == runs["torch"]
    recomputed = list(generate(Engine(w), prompt, 70, Sampler(0.0), context_shift=True))
    assert recomputed[:args.max_seq_len - len(prompt)] == runs["fast"][:args.max_seq_len - len(prompt)]


@pytest.mark.parametrize("group_size", [64, 4])  # 4: shorter than one AVX2 vector, the scalar path
def test_native_dequantize_is_exact(group_size):
    from babyllama.formats import quantize_q80

    native = kernels_native.load()
    if native is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    w = quantize_q80(rng.standard_normal((24, 128)).astype(np.float32), group_size)
    np.testing.assert_array_equal(native.dequantize(w), w.dequantize())


@pytest.mark.parametrize("n", [1, 3, 12])  # 1 and 3: one native call (forward_step); 12: the prompt path
def test_engine_rejects_indices_outside_its_tables(n, q8_backend):
    """Token ids, positions and slots index tables that C reads and writes: bad ones must raise, on every path,
    and leave the cache as it was."""
    args = tiny_args()
    e = Engine(random_weights(args, scale=0.2))
    cache = e.new_cache(2)
    ok_tokens, ok_positions = [5] * n, list(range(n))
    bad = [([args.vocab_size] + ok_tokens[1:], ok_positions, None),
           ([-1] + ok_tokens[1:], ok_positions, None),
           (ok_tokens, ok_positions[:-1] + [cache.seq_len], None),
           (ok_tokens, ok_positions[:-1] + [-1], None),
           (ok_tokens, ok_positions, [0] * (n - 1) + [2])]
    for tokens, positions, slots in bad:
        with pytest.raises(ValueError, match="must lie in"):
            e.forward(tokens, positions, cache, slots, logits="last")
    if n <= 8 and kernels.backend().name == "native":  # the one-call step checks before writing anything
        assert not cache.k.any() and not cache.v.any()
    good = e.forward(ok_tokens, ok_positions, cache, logits="last")
    assert good.shape == (1, args.vocab_size) and np.isfinite(good).all()


def test_bench_checks_the_prompt_length_and_the_output_before_measuring(tmp_path, capsys, monkeypatch):
    """A prompt or a decode longer than a model's context cannot be timed, and an output that cannot be written
    would lose the table: both are refused before anything is measured; --output's folders are made."""
    from babyllama import bench
    from babyllama.cli import main

    measured = []
    monkeypatch.setattr(bench, "run", lambda *a, **k: measured.append(1) or ([], None))
    argv = ["bench", "--shapes", "15M", "--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--prompt-len", "300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --prompt-len 300 is longer than the 15M model's context (256 tokens)"]
    assert main([*argv, "--tokens", "257"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --tokens 257 is longer than the 15M model's context (256 tokens)"]
    assert main([*argv, "--plain-tokens", "300"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --plain-tokens 300 is longer than the 15M model's context (256 tokens)"]
    assert main([*argv, "--reference-q", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"babyllama: error: --reference-q {tmp_path}: not an executable file"]
    assert main([*argv, "--formats", "fp32", "--reference-q", sys.executable]) == 1  # runq.c reads Q8_0 only
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --reference-q times runq.c on q8_0 files: add q8_0 to --formats"]
    assert main([*argv, "--device", "cpu", "--formats", "fp32,q8_0"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --device cpu runs the PyTorch engine on fp32 files only: --formats fp32 (the "
                   "default with --device)"]
    assert main([*argv, "--formats", "fp32", "--gguf"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["babyllama: error: --gguf times babyllama on q8_0 and q4_0 GGUF files: add one of them to --formats"]
    (tmp_path / "file").write_text("x")
    assert main([*argv, "--output", str(tmp_path / "file" / "table.md")]) == 1
    assert not measured
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write bench table" in err[0] and "file is not a directory" in err[0], err
    assert main(["bench", "--shapes", "15M", "--cache-dir", str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"babyllama: error: cannot write bench model cache {tmp_path / 'file'}: {tmp_path / 'file'} is "
                   "not a directory"]
    assert main([*argv, "--prompt-len", "256", "--output", str(tmp_path / "new" / "table.md")]) == 0
    assert measured and (tmp_path / "new" / "table.md").read_text().startswith("Machine: ")
