import numpy as np
import pytest

from babyllama.sampler import Rng, Sampler, nucleus, sample_mult, sample_topp


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
