"""The sampler: run.c's xorshift64* generator, greedy, multinomial and top-p draws (C and NumPy alike), and the
sampling controls (top-k, min-p, llama.cpp's repeat penalty, OpenAI's presence and frequency penalties)."""

import re

import numpy as np
import pytest

from babyllama.sampler import Rng, Sampler, nucleus, sample_mult, sample_topp, softmax


def reference_u32(state: int) -> tuple[int, int]:
    """run.c's random_u32 written out with explicit 64-bit masking."""
    m = (1 << 64) - 1
    state ^= state >> 12
    state = (state ^ (state << 25)) & m
    state ^= state >> 27
    return state, ((state * 0x2545F4914F6CDD1D) & m) >> 32


def test_rng_is_xorshift64star():
    rng, state = Rng(42), 42
    for _ in range(100):
        state, expected = reference_u32(state)
        assert rng.u32() == expected
    f = Rng(7).f32()
    assert 0.0 <= f < 1.0 and f.dtype == np.float32


def test_a_seed_that_masks_to_zero_does_not_draw_zeros_forever():
    """xorshift's state 0 draws 0 every time (a sampler that always takes the first token); a seed of 2**64 (or
    a multiple) would reach it through the 64-bit mask, so it takes seed 0's stand-in as the API does."""
    from babyllama.sampler import ZERO_SEED

    for seed in (2**64, 3 * 2**64):
        rng, stand_in = Rng(seed), Rng(ZERO_SEED)
        draws = [rng.u32() for _ in range(5)]
        assert draws == [stand_in.u32() for _ in range(5)] and any(draws)


def test_greedy_takes_first_max():
    s = Sampler(temperature=0.0, seed=1)
    assert s.sample(np.array([0.1, 3.0, 3.0, -1.0], dtype=np.float32)) == 1


def test_multinomial_follows_cdf():
    probs = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    assert sample_mult(probs, np.float32(0.05)) == 0
    assert sample_mult(probs, np.float32(0.1)) == 1  # cdf must *exceed* the coin
    assert sample_mult(probs, np.float32(0.65)) == 3
    assert sample_mult(probs, np.float32(0.9999999)) == 3


def test_topp_keeps_the_nucleus():
    probs = np.array([0.05, 0.5, 0.3, 0.15], dtype=np.float32)
    # nucleus for p=0.7: [0.5, 0.3] (cumulative 0.8 > 0.7); coin scales over 0.8
    assert sample_topp(probs, 0.7, np.float32(0.0)) == 1
    assert sample_topp(probs, 0.7, np.float32(0.7)) == 2
    assert sample_topp(probs, 0.7, np.float32(0.99)) == 2


def test_sampling_distribution_matches_softmax():
    logits = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    s = Sampler(temperature=1.0, topp=1.0, seed=123)
    counts = np.bincount([s.sample(logits) for _ in range(20000)], minlength=4) / 20000
    expected = np.exp(logits) / np.exp(logits).sum()
    assert np.abs(counts - expected).max() < 0.02


@pytest.mark.parametrize("vocab", [7, 512, 32000])
def test_topp_distribution_is_the_renormalized_nucleus_of_the_full_sort(vocab):
    """`distribution` (what speculative decoding compares) skips the tail before sorting; it must still be the
    top-p set of a full sort, renormalized, and put mass exactly where sample_topp can land."""
    rng = np.random.default_rng(vocab)
    # coins over [0, 1); for the 32,000-token vocabulary (each draw sorts a nucleus of up to ~26,000 tokens) fewer
    # over the whole range and as many in its last 1%, where a nucleus one token too long would be landed on
    coins = (np.linspace(0, 0.999999, 4001) if vocab < 32000 else
             np.concatenate([np.linspace(0, 0.99, 200), np.linspace(0.99, 0.999999, 200)]))
    for scale in (0.5, 3.0, 8.0):
        s = Sampler(1.0, 0.9, 1)
        logits = (rng.standard_normal(vocab) * scale).astype(np.float32)
        probs = s.probs(logits)
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order], dtype=np.float32)
        keep = order[: int(np.searchsorted(cum, np.float32(0.9), side="right")) + 1]
        dist = s.distribution(logits)
        assert set(np.flatnonzero(dist)) == set(keep.tolist())
        np.testing.assert_allclose(dist[keep], probs[keep] / probs[keep].sum(), rtol=1e-5)
        landed = {sample_topp(probs, 0.9, np.float32(c)) for c in coins}
        assert landed <= set(keep.tolist())


def test_top_logprobs_are_log_softmax_of_the_logits():
    from babyllama.sampler import top_logprobs

    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum())
    chosen, top = top_logprobs(logits, 2, k=3)
    assert chosen == pytest.approx(ref[2])
    assert [i for i, _ in top] == [1, 2, 0]
    assert [p for _, p in top] == pytest.approx([ref[1], ref[2], ref[0]])
    assert top_logprobs(logits, 0)[1] == []
    assert len(top_logprobs(logits, 0, k=10)[1]) == 4
    assert np.exp([p for _, p in top_logprobs(logits, 0, k=4)[1]]).sum() == pytest.approx(1.0)


def test_a_top_p_below_one_over_the_vocabulary_takes_the_top_token():
    """With topp under 1/n no token of a flat distribution reaches run.c's candidate floor (1-topp)/(n-1)
    (run.c then reads out of bounds): the nucleus is the most likely token, which alone holds more than topp.
    Sampling takes it at once; the nucleus itself (what `distribution` truncates to) is that token. C's sampler
    on such a distribution: test_kernels.py (flat ones of 2, 3 and 7 tokens at topp 0.01)."""
    logits = np.array([0.3, 0.1, 0.35, 0.2, 0.0, 0.35, 0.25], dtype=np.float32)
    s = Sampler(temperature=1.0, topp=0.01, seed=3)
    assert {s.sample(logits) for _ in range(20)} == {2}
    probs = s.probs(logits)
    assert sample_topp(probs, 0.01, np.float32(0.5)) == 2
    cand, cum = nucleus(probs, 0.01)
    assert cand.tolist() == [2] and cum[-1] == probs[2]
    dist = s.distribution(logits)
    assert dist[2] == 1.0 and dist.sum() == 1.0


TINY_TEMPERATURES = [1e-38, 1e-40, 1e-45, 5e-324]  # in [0, 2], but logits / T leave fp32 (5e-324 rounds to 0)


def _logits_for_tiny_temperatures() -> list[np.ndarray]:
    """Logits where a tiny temperature overflows: mixed signs, all negative, zeros (0 / 0 where T rounds to 0)
    with a -inf, and a first largest one repeated."""
    mixed = np.random.default_rng(5).normal(0, 3, 512).astype(np.float32)
    negative = -np.abs(mixed) - 1
    zeros = np.zeros(16, dtype=np.float32)
    zeros[[3, 9]] = [-np.inf, 0.5]
    tie = np.array([0.1, 20.0, -4.0, 20.0], dtype=np.float32)
    return [mixed, negative, zeros, tie]


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("path", ["default", "numpy"])
def test_a_temperature_too_small_for_fp32_samples_the_argmax(temperature, path, monkeypatch):
    """As T goes to 0 sampling becomes greedy: where logits / T overflow fp32 (the softmax would be NaN) every
    seed and top-p gives -t 0's token, and `distribution` is all on it. "default": through the native kernels'
    one-call sampler where they load; "numpy": NumPy's softmax and search."""
    from babyllama import kernels, sampler

    kernels.backend()  # the native kernels lend their sampler when they are the backend
    if path == "numpy":
        for name in ("_logits_sampler", "_topp_sampler", "_cdf_search"):
            monkeypatch.setattr(sampler, name, None)
    for logits in _logits_for_tiny_temperatures():
        greedy = Sampler(0.0).sample(logits)
        for topp in (0.0, 0.5, 0.9, 1.0):
            assert {Sampler(temperature, topp, seed).sample(logits) for seed in range(1, 6)} == {greedy}
        dist = Sampler(temperature, 0.9, 1).distribution(logits)
        assert dist[greedy] == 1.0 and dist.sum() == 1.0


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
def test_the_c_sampler_takes_the_argmax_where_logits_over_the_temperature_overflow(temperature):
    from babyllama import kernels

    native = kernels.native_backend()
    if native is None:
        pytest.skip("the native kernels are not the backend")
    for logits in _logits_for_tiny_temperatures():
        greedy = int(logits.argmax())
        probs = native.softmax_logits(logits, temperature)
        assert probs[greedy] == 1.0 and probs.sum() == 1.0
        for topp in (0.0, 0.9, 1.0):
            for coin in np.array([0.0, 0.5, 0.999999], dtype=np.float32):
                assert native.sample_logits(logits, temperature, topp, coin) == greedy


# ------------------------------------------------------------------ llama.cpp's and OpenAI's sampling controls


def _logits(n: int = 64, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


@pytest.mark.parametrize("temperature, topp", [(0.0, 0.9), (1.0, 0.9), (0.7, 1.0), (1.3, 0.0)])
def test_neutral_controls_leave_run_c_sampling_untouched(temperature, topp):
    """Controls at their defaults are no controls: the sampler keeps run.c's path (the native one-call draw where
    the kernels load) and draws the same tokens, seed for seed."""
    from babyllama.sampler import Controls

    logits = _logits(512, 1)
    with_controls = Sampler(temperature, topp, 9, Controls())
    assert with_controls.controls is None
    plain = Sampler(temperature, topp, 9)
    assert [with_controls.sample(logits, [1, 5, 5], [5]) for _ in range(200)] == \
        [plain.sample(logits) for _ in range(200)]


def test_top_k_1_is_greedy_and_top_k_keeps_the_k_likeliest():
    from babyllama.sampler import Controls

    for seed in range(20):
        logits = _logits(100, seed)
        assert Sampler(1.0, 0.9, seed + 1, Controls(top_k=1)).sample(logits) == int(logits.argmax())
    ties = np.array([0.5, 3.0, 1.0, 3.0, 3.0], dtype=np.float32)
    assert {Sampler(1.5, 1.0, s, Controls(top_k=1)).sample(ties) for s in range(1, 30)} == {1}  # greedy's token
    assert Controls(top_k=2).candidates(ties).tolist() == [1, 3]  # ties: the lower ids first
    logits = _logits(200, 3)
    s = Sampler(1.0, 1.0, 4, Controls(top_k=5))
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {s.sample(logits) for _ in range(500)} == top5
    dist = s.distribution(logits)
    keep = sorted(top5)
    np.testing.assert_allclose(dist[keep], softmax(logits[keep]), rtol=1e-6)
    assert dist.sum() == pytest.approx(1.0) and set(np.flatnonzero(dist).tolist()) == top5


def test_min_p_drops_tokens_below_its_share_of_the_likeliest():
    from babyllama.sampler import Controls

    logits = np.log(np.array([0.5, 0.2, 0.04, 0.16, 0.1], dtype=np.float32))
    assert Controls(min_p=0.3).candidates(logits).tolist() == [0, 1, 3]  # p >= 0.3 * 0.5 = 0.15
    assert Controls(min_p=1.0).candidates(logits).tolist() == [0]
    # before temperature: a high temperature flattens the draw, not the candidate set
    s = Sampler(2.0, 1.0, 5, Controls(min_p=0.3))
    assert {s.sample(logits) for _ in range(400)} == {0, 1, 3}
    assert {Sampler(2.0, 0.9, seed, Controls(min_p=1.0)).sample(logits) for seed in range(1, 20)} == {0}
    assert set(np.flatnonzero(s.distribution(logits)).tolist()) == {0, 1, 3}


def test_candidates_that_keep_every_token_draw_run_c_s_token():
    """The draw among the candidates is run.c's on their logits: where min_p keeps the whole vocabulary, the
    token is the plain sampler's, coin for coin."""
    from babyllama.sampler import Controls

    logits = _logits(300, 7, scale=1.0)  # every probability within e^-8 of the likeliest
    for topp in (0.9, 1.0):
        controlled = Sampler(1.0, topp, 11, Controls(min_p=1e-9))
        plain = Sampler(1.0, topp, 11)
        assert [controlled.sample(logits) for _ in range(300)] == [plain.sample(logits) for _ in range(300)]


def recounted(controls, logits: np.ndarray, tokens, generated) -> np.ndarray:
    """The penalties' rule written out, counting the whole history on every call (what a Sampler's running counts
    must give): the repeat penalty over the last repeat_last_n tokens (prompt included), presence and frequency
    over the generated ones."""
    if not controls.penalizes:
        return logits
    recent_ids = gen_ids = gen_counts = None
    if controls.repeats:
        recent = tokens if controls.repeat_last_n < 0 else tokens[-controls.repeat_last_n:]
        recent_ids = np.unique(np.asarray(recent, dtype=np.int64))
    if controls.counts_generated and len(generated):
        gen_ids, gen_counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    return controls.apply_penalties(logits, recent_ids, gen_ids, gen_counts)


def test_repeat_penalty_is_llama_cpp_s_over_the_last_n_tokens():
    from babyllama.sampler import Controls

    logits = np.array([2.0, -1.0, 3.0, 0.5, -2.0], dtype=np.float32)
    tokens = [0, 1, 3, 1]  # the prompt and what was generated, oldest first
    out = recounted(Controls(repeat_penalty=2.0, repeat_last_n=3), logits, tokens, [3, 1])
    assert out.tolist() == [2.0, -2.0, 3.0, 0.25, -2.0]  # 0 is older than the last 3; each token once
    assert recounted(Controls(repeat_penalty=2.0, repeat_last_n=-1), logits, tokens, []).tolist() == \
        [1.0, -2.0, 3.0, 0.25, -2.0]
    assert recounted(Controls(repeat_penalty=2.0, repeat_last_n=0), logits, tokens, []) is logits
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5, -2.0]  # the model's logits are not changed


def test_a_repeat_penalty_beyond_fp32_s_range_takes_the_logits_to_their_limits_never_nan():
    """A penalty of 1e39 (accepted: a finite number > 0) became inf in fp32, and 0 * inf made a logit of exactly 0
    NaN, which greedy argmax then chose, the very token penalized; one of 1e-50 (0 in fp32) made 0 / 0. The
    penalty takes fp32's nearest finite value: penalized logits go to their limits, no warning, no NaN."""
    import warnings

    from babyllama.sampler import Controls

    logits = np.array([0.0, 1.0, -1.0, 2.0], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        huge = recounted(Controls(repeat_penalty=1e39, repeat_last_n=-1), logits, [0, 1, 2], [])
        tiny = recounted(Controls(repeat_penalty=1e-50, repeat_last_n=-1), logits, [0, 1, 2], [])
        assert Sampler(0.0, controls=Controls(repeat_penalty=1e39)).sample(logits, [0, 3]) == 1
    assert huge[0] == 0.0 and 0.0 < huge[1] < 1e-37 and huge[2] <= -3e38 and huge[3] == 2.0
    assert tiny[0] == 0.0 and tiny[1] > 8e37 and -1e-37 < tiny[2] < 0.0 and tiny[3] == 2.0


def test_presence_and_frequency_penalties_are_openai_s_over_the_generated_tokens():
    from babyllama.sampler import Controls

    logits = np.zeros(5, dtype=np.float32)
    out = recounted(Controls(presence_penalty=0.5, frequency_penalty=0.25), logits, [1, 4, 4, 2, 2, 2], [2, 2, 2, 0])
    assert out.tolist() == [-0.75, 0.0, -1.25, 0.0, 0.0]  # count * 0.25 + 0.5; prompt tokens (4) not counted
    negative = recounted(Controls(presence_penalty=-1.0), logits, [], [3])
    assert negative.tolist() == [0.0, 0.0, 0.0, 1.0, 0.0]


def test_logit_bias_adds_to_the_logits_before_the_penalties():
    """OpenAI's logit_bias: each (token id, bias) adds the bias to that token's logit, before the repeat penalty
    (which then divides the biased logit) and the presence and frequency penalties; the model's logits are not
    changed."""
    from babyllama.sampler import Controls

    logits = np.array([2.0, -1.0, 3.0, 0.5, -2.0], dtype=np.float32)
    assert recounted(Controls(logit_bias=((0, 2.0), (4, -100.0))), logits, [], []).tolist() == \
        [4.0, -1.0, 3.0, 0.5, -102.0]
    both = Controls(repeat_penalty=2.0, repeat_last_n=-1, frequency_penalty=0.5, logit_bias=((0, 2.0), (1, 1.5)))
    assert recounted(both, logits, [0, 1], [1]).tolist() == [2.0, -0.25, 3.0, 0.5, -2.0]  # (2+2)/2, (-1+1.5)/2-.5
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5, -2.0]


def test_logit_bias_forces_and_bans_tokens_greedy_and_sampled():
    from babyllama.sampler import Controls

    logits = _logits(300, 3, scale=1.0)
    best = int(logits.argmax())
    assert Sampler(0.0, controls=Controls(logit_bias=((7, 100.0),))).sample(logits) == 7
    banned = Sampler(0.0, controls=Controls(logit_bias=((best, -100.0),))).sample(logits)
    assert banned == int(np.argsort(-logits, kind="stable")[1])  # the second likeliest
    forced = Sampler(1.0, 0.9, 5, Controls(logit_bias=((7, 100.0),)))
    assert {forced.sample(logits) for _ in range(200)} == {7}
    never = Sampler(1.0, 1.0, 5, Controls(logit_bias=tuple((i, -100.0) for i in range(0, 300, 2))))
    assert all(never.sample(logits) % 2 for _ in range(500))
    assert Controls(logit_bias=((7, 0.0),)).neutral is False  # a bias of 0 is applied (and changes nothing)


@pytest.mark.parametrize("bias, vocab, message", [
    (((5, 100.5),), None, "logit_bias must map token ids to biases in [-100, 100], got 5: 100.5"),
    (((5, float("nan")),), None, "got 5: nan"),
    (((5, float("-inf")),), None, "got 5: -inf"),
    (((-1, 1.0),), None, "got -1: 1.0"),
    ((("5", 1.0),), None, "got '5': 1.0"),
    (((True, 1.0),), None, "got True: 1.0"),
    (((5, True),), None, "got 5: True"),
    (((5, 1.0), (5, 2.0)), None, "logit_bias must give each token id once"),
    (((512, 1.0),), 512, "logit_bias must map token ids in [0, 512) to biases in [-100, 100], got 512: 1.0"),
])
def test_a_logit_bias_out_of_range_is_one_error(bias, vocab, message):
    from babyllama.sampler import Controls

    assert message in " ".join(Controls(logit_bias=bias).problem(vocab))
    assert Controls(logit_bias=((511, -100), (0, 100.0))).problem(512) is None


def test_the_python_api_takes_a_logit_bias_map():
    """model.generate/stream/generate_batch(logit_bias={token id: bias}): +100 all but forces the token; ids
    beyond the model's vocabulary, biases out of [-100, 100] and a bias that is no map are one error each."""
    import babyllama
    from babyllama.errors import BabyLlamaError

    model = babyllama.load()
    piece = model.tokenizer.pieces[400].decode()
    assert model.generate("Hi", temperature=0.0, max_new_tokens=5, logit_bias={400: 100}) == "Hi" + piece * 5
    assert "".join(model.stream("Hi", temperature=0.0, max_new_tokens=5, logit_bias={400: 100})) == piece * 5
    assert model.generate_batch(["Hi", "Yo"], temperature=0.0, max_new_tokens=3, logit_bias={400: 100}) == \
        ["Hi" + piece * 3, "Yo" + piece * 3]
    assert model.generate("Hi", temperature=0.0, max_new_tokens=5, logit_bias={}) == \
        model.generate("Hi", temperature=0.0, max_new_tokens=5)
    vocab = model.args.vocab_size
    for bias, message in (({5: 101}, f"logit_bias must map token ids in [0, {vocab}) to biases in [-100, 100], "
                                     "got 5: 101"),
                          ({vocab: 1}, f"got {vocab}: 1"),
                          ([(5, 1.0)], "logit_bias must map token ids to biases (a dict), got list")):
        for call in (model.generate, model.stream, lambda p, **kw: model.generate_batch([p], **kw)):
            with pytest.raises(BabyLlamaError, match=re.escape(message)):
                call("Hi", logit_bias=bias)


@pytest.mark.parametrize("window", [-1, 1, 3, 17, 64])
def test_a_sampler_s_running_counts_penalize_as_recounting_the_history_does(window):
    """The sampler keeps the penalties' counts as the sequence grows; its logits are bit for bit those of
    `recounted`, which counts the whole history, through generated tokens, chat turns (many tokens at
    once, the generated list started again), new sequences and a list changed in place."""
    from babyllama.sampler import Controls

    rng = np.random.default_rng(window + 2)
    controls = Controls(repeat_penalty=1.3, repeat_last_n=window, presence_penalty=0.4, frequency_penalty=-0.7)
    sampler = Sampler(0.0, controls=controls)
    vocab = 40
    tokens, generated = list(rng.integers(0, vocab, 30)), []
    for _ in range(400):
        logits = rng.standard_normal(vocab).astype(np.float32) * 3
        ours = sampler._penalize(controls, logits, tokens, generated)
        want = recounted(controls, logits, tokens, generated)
        assert ours.view(np.int32).tolist() == want.view(np.int32).tolist()
        action = rng.random()
        if action < 0.8:  # a generated token
            token = int(rng.integers(0, vocab))
            tokens.append(token)
            generated.append(token)
        elif action < 0.9:  # the next chat turn
            tokens.extend(int(t) for t in rng.integers(0, vocab, int(rng.integers(1, 90))))
            generated = []
        elif action < 0.95:  # another sequence
            tokens, generated = list(rng.integers(0, vocab, int(rng.integers(1, 50)))), []
        elif generated:  # the last token replaced in place
            tokens[-1] = generated[-1] = (tokens[-1] + 1) % vocab


class CountedReads(list):
    """A list that counts the elements read through indexing and slicing (the counts read nothing else)."""

    reads = 0

    def __getitem__(self, i):
        item = super().__getitem__(i)
        CountedReads.reads += len(item) if isinstance(i, slice) else 1
        return item

    def __array__(self, dtype=None, copy=None):  # NumPy's view of the whole history
        CountedReads.reads += len(self)
        return np.array(list(self), dtype=dtype)


@pytest.mark.parametrize("window", [-1, 64])
def test_a_penalized_step_reads_the_new_token_not_the_whole_history(window):
    """A step's penalties cost the same at token 20,000 as at token 20: after the first step, each reads a few
    elements of the history (the new token, the one leaving the window), not all of it."""
    from babyllama.sampler import Controls

    sampler = Sampler(0.0, controls=Controls(repeat_penalty=1.1, repeat_last_n=window, frequency_penalty=0.5))
    rng = np.random.default_rng(0)
    tokens, generated = CountedReads(rng.integers(0, 100, 5000).tolist()), CountedReads()
    logits = rng.standard_normal(100).astype(np.float32)
    for _ in range(50):
        CountedReads.reads = 0
        token = sampler.sample(logits, tokens, generated)
        tokens.append(token)
        generated.append(token)
    assert CountedReads.reads <= 8


def test_greedy_applies_the_penalties_then_takes_the_argmax():
    from babyllama.sampler import Controls

    logits = np.array([1.0, 3.0, 2.5], dtype=np.float32)
    assert Sampler(0.0).sample(logits, [1], [1]) == 1
    assert Sampler(0.0, controls=Controls(repeat_penalty=1.5)).sample(logits, [1], [1]) == 2  # 3 / 1.5 = 2 < 2.5
    assert Sampler(0.0, controls=Controls(frequency_penalty=0.4)).sample(logits, [1, 1], [1, 1]) == 2
    assert Sampler(0.0, controls=Controls(presence_penalty=0.4)).sample(logits, [1, 1], [1, 1]) == 1


def test_penalties_lower_the_repeats_of_the_built_in_model():
    """Greedy text from the built-in story model repeats its tokens (its most frequent one 9 times in 150): each
    penalty has its most repeated token come back less often."""
    from collections import Counter

    import babyllama
    from babyllama.generate import generate
    from babyllama.sampler import Controls

    model = babyllama.load()
    prompt = model.tokenizer.encode("Once upon a time", bos=True)

    def most_repeated(**controls) -> int:
        tokens = list(generate(model.engine, prompt, 256, Sampler(0.0, controls=Controls(**controls)), max_new=150))
        assert len(tokens) == 150
        return Counter(tokens).most_common(1)[0][1]

    plain = most_repeated()
    for controls in ({"repeat_penalty": 1.5}, {"frequency_penalty": 1.0}, {"presence_penalty": 2.0}):
        assert most_repeated(**controls) < plain, controls
    assert model.generate("Once upon a time", temperature=0.0, max_new_tokens=30, top_k=0, min_p=0.0,
                          repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0) == \
        model.generate("Once upon a time", temperature=0.0, max_new_tokens=30)


@pytest.mark.parametrize("controls, message", [
    ({"top_k": -1}, "top_k must be an integer >= 0 (0: off), got -1"),
    ({"top_k": 2.0}, "top_k must be an integer"),
    ({"min_p": 1.5}, "min_p must be in [0, 1]"),
    ({"min_p": float("nan")}, "min_p must be in [0, 1]"),
    ({"repeat_penalty": 0.0}, "repeat_penalty must be a finite number > 0"),
    ({"repeat_penalty": float("inf")}, "repeat_penalty must be a finite number > 0"),
    ({"repeat_last_n": -2}, "repeat_last_n must be an integer >= -1"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty must be in [-2, 2]"),
    ({"frequency_penalty": True}, "frequency_penalty must be in [-2, 2]"),
])
def test_out_of_range_controls_are_one_error(controls, message):
    import babyllama
    from babyllama.errors import BabyLlamaError
    from babyllama.sampler import Controls

    with pytest.raises(ValueError, match=re.escape(message)):
        Sampler(1.0, 0.9, 1, Controls(**controls))
    model = babyllama.load()
    for call in (model.generate, model.stream, lambda p, **kw: model.generate_batch([p], **kw)):
        with pytest.raises(BabyLlamaError, match=re.escape(message)):
            call("Hi", **controls)
