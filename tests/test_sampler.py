import numpy as np

from babyllama.sampler import Rng, Sampler, sample_mult, sample_topp


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
