"""Batch's scheduling for a server: decode first and prefill in fixed chunks, batch-invariant engine calls,
prefix reuse across sequences, and the logits row each token was sampled from."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_greedy_agree, random_weights, tiny_args, tiny_model

import babyllama.generate as gen
from babyllama.engine import Engine
from babyllama.generate import Batch, Sequence, common_prefix, generate
from babyllama.kernels import backend
from babyllama.sampler import Sampler


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(random_weights(tiny_args(max_seq_len=128), scale=0.3))


def prompt(i: int, n: int = 6) -> list[int]:
    return [1] + [(7 * i + 13 * k) % 290 + 3 for k in range(n - 1)]


def run_all(batch: Batch, seqs: list[Sequence]) -> dict[int, list[np.ndarray]]:
    """Step until every sequence is done; returns each one's logits rows (by index in seqs)."""
    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(seqs))}
    index = {id(s): i for i, s in enumerate(seqs)}
    while not all(s.done for s in seqs):
        for seq, _ in batch.step():
            rows[index[id(seq)]].append(seq.logits.copy())
    return rows


@pytest.mark.parametrize("companions", [1, 7, 12])
def test_a_sequence_decodes_the_same_whatever_shares_its_steps(engine, companions):
    """Its greedy tokens equal its solo ones; with the native kernels its logits are bit-identical whether
    it shares calls with 1, 7 or 12 others (more than one call's worth: the step is split)."""
    solo = list(generate(engine, prompt(0), 40, Sampler(0.0)))
    batch = Batch(engine, companions + 1)
    seqs = [batch.add(Sequence(prompt(i), Sampler(0.0), 40)) for i in range(companions + 1)]
    rows = run_all(batch, seqs)
    assert seqs[0].generated == solo
    if backend().name == "native":
        ref = Batch(engine, 2)
        pair = [ref.add(Sequence(prompt(i), Sampler(0.0), 40)) for i in (0, 50)]
        ref_rows = run_all(ref, pair)
        assert all(np.array_equal(a, b) for a, b in zip(rows[0], ref_rows[0]))


@pytest.mark.skipif(backend().name != "native", reason="batch invariance is the native kernels' property")
@pytest.mark.parametrize("quantize,kv_cache", [(False, "f32"), (True, "f32"), (False, "f16"), (True, "f16")])
def test_decodes_in_one_call_or_many_give_the_same_numbers(engine, quantize, kv_cache):
    """20 sequences decoding: one call for all, or calls of 8, or one each, give bit-identical logits (the
    engine's one-call step for single tokens, in fp32 and Q8_0, with an fp32 or fp16 KV cache)."""
    e = Engine(engine.w.quantize() if quantize else engine.w, kv_cache=kv_cache)
    rows = {}
    for calls in (1, 8, 20):
        batch = Batch(e, 20)
        plain_calls = batch._calls  # prompts as usual; decode tokens in calls of `calls`

        def regroup(runs, k=calls, plain_calls=plain_calls):
            if any(end - start > 1 for _, start, end in runs):
                return plain_calls(runs)
            return [runs[i:i + k] for i in range(0, len(runs), k)]

        batch._calls = regroup
        seqs = [batch.add(Sequence(prompt(i), Sampler(0.0), 30)) for i in range(20)]
        rows[calls] = run_all(batch, seqs)
    for calls in (1, 8):
        assert all(np.array_equal(a, b) for i in range(20) for a, b in zip(rows[calls][i], rows[20][i]))


def test_decode_goes_first_and_prompts_prefill_in_fixed_chunks(engine):
    batch = Batch(engine, 3, max_tokens_per_step=16)
    runners = [batch.add(Sequence(prompt(i), Sampler(0.0), 100)) for i in range(2)]
    batch.step()  # both short prompts in, first tokens out
    long_prompt = [1, *range(20, 80)]  # 61 tokens
    late = batch.add(Sequence(list(long_prompt), Sampler(0.0), 100))
    fed = []
    while late.pending() > 1 or not late.generated:
        before = late.n_fed
        out = batch.step()
        assert {id(s) for s, _ in out} >= {id(s) for s in runners}  # every runner decoded this step
        fed.append(late.n_fed - before)
    assert fed == [16, 16, 16, 13]  # chunks of the budget (at least one per step), not what the runners left
    alone = list(generate(engine, long_prompt, 100, Sampler(0.0)))
    batch2 = Batch(engine, 1, max_tokens_per_step=16)
    seq = batch2.add(Sequence(list(long_prompt), Sampler(0.0), 100))
    while not seq.done:
        batch2.step()
    while not late.done:
        batch.step()
    assert late.generated == seq.generated  # the same chunks as alone: the same numbers
    assert late.generated[:5] == alone[:5]  # one-shot prefill: the same text (within rounding)


def test_prefix_reuse_prefills_only_the_rest(engine):
    shared = [1, *range(30, 90)]  # 61 tokens
    first = shared + [200, 201, 202]
    second = shared + [150, 151, 152, 153]
    batch = Batch(engine, 2, prefix_min=16)
    a = batch.add(Sequence(list(first), Sampler(0.0), 100, max_new=5))
    run_all(batch, [a])
    batch.release(a)
    b = batch.add(Sequence(list(second), Sampler(0.0), 100, max_new=20))
    assert (b.slot, b.n_reused, b.n_fed) == (a.slot, len(shared), len(shared))
    rows = run_all(batch, [b])[0]
    fresh = list(generate(engine, second, 100, Sampler(0.0), max_new=20))
    # the reused entries came from other chunks: the same numbers within rounding, greedy up to a near-tie
    full = engine.forward(second + b.generated, range(len(second) + len(b.generated)), engine.new_cache(),
                          logits="all")
    np.testing.assert_allclose(np.stack(rows), full[len(second) - 1:len(second) - 1 + len(rows)], atol=1e-4)
    assert_greedy_agree(fresh, b.generated, lambda i: rows[i], max_margin=1e-3)


def test_prefix_reuse_rules(engine):
    batch = Batch(engine, 3, prefix_min=8)
    p = [1, *range(40, 60)]
    a = batch.add(Sequence(list(p), Sampler(0.0), 100, max_new=2))
    run_all(batch, [a])
    # an active slot is never shared
    b = batch.add(Sequence(list(p), Sampler(0.0), 100, max_new=2))
    assert b.slot != a.slot and b.n_reused == 0
    batch.release(a)
    # the same prompt again: everything but its last token (whose logits are needed) is reused
    c = batch.add(Sequence(list(p), Sampler(0.0), 100, max_new=2))
    assert c.slot == a.slot and c.n_reused == len(p) - 1
    batch.release(c)
    # a prefix shorter than prefix_min is not worth it: a fresh slot
    d = batch.add(Sequence(p[:5] + [250] * 10, Sampler(0.0), 100, max_new=2))
    assert d.n_reused == 0 and d.slot not in (a.slot, b.slot)
    # without prefix_min nothing is reused
    plain = Batch(engine, 1)
    e = plain.add(Sequence(list(p), Sampler(0.0), 100, max_new=2))
    run_all(plain, [e])
    plain.release(e)
    assert plain.add(Sequence(list(p), Sampler(0.0), 100)).n_reused == 0


def test_logits_row_is_the_one_sampled(engine):
    batch = Batch(engine, 1)
    seq = batch.add(Sequence(prompt(3), Sampler(1.0, 1.0, 5), 30))
    while not seq.done:
        for s, _ in batch.step():
            assert s.logits.shape == (engine.args.vocab_size,)
    full = engine.forward(seq.tokens[:-1], range(len(seq.tokens) - 1), engine.new_cache(), logits="all")
    np.testing.assert_allclose(seq.logits, full[-1], atol=1e-4)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([2], [1]) == 0


@pytest.mark.parametrize("kv_cache", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("rotate", [False, True])
def test_a_cache_that_grows_gives_the_numbers_of_one_made_whole(monkeypatch, kv_cache, rotate):
    """A Batch sized by the model's context (chat) starts with a small cache and doubles it as its
    sequences reach the end: the logits are bit for bit those of a cache of the whole context from the start,
    through chunked prefills, decodes, slots passed on with prefix reuse, and context shifts."""
    e = Engine(tiny_model("fp32", max_seq_len=128), kv_cache=kv_cache)
    shared = [1] + list(range(40, 60))

    def run(initial: int) -> tuple[list[list[np.ndarray]], set[int]]:
        monkeypatch.setattr(gen, "INITIAL_CACHE", initial)
        batch = Batch(e, 2, max_tokens_per_step=16, prefix_min=4)
        sizes = {batch.cache.seq_len}
        waiting = [Sequence(shared + [3, 4], Sampler(0.8, seed=1), 90),
                   Sequence([1, 5, 6], Sampler(0.8, seed=2), 300, context_shift=True, n_keep=3, rotate_keys=rotate),
                   Sequence(shared + [7], Sampler(0.8, seed=3), 128),
                   Sequence([1] + list(range(100, 180)), Sampler(0.8, seed=4), 128)]
        rows: list[list[np.ndarray]] = [[] for _ in waiting]
        index = {id(s): i for i, s in enumerate(waiting)}
        live: list[Sequence] = []
        while waiting or live:
            while waiting and batch.free_slots:
                live.append(batch.add(waiting.pop(0)))
            for seq, _ in batch.step():
                rows[index[id(seq)]].append(seq.logits.copy())
            sizes.add(batch.cache.seq_len)
            for seq in [s for s in live if s.done]:
                live.remove(seq)
                batch.release(seq)
        return rows, sizes

    grown, sizes = run(4)
    whole, whole_sizes = run(1 << 20)
    assert sizes == {4, 16, 32, 64, 128} and whole_sizes == {128}  # a first prefill chunk of 16 skips 8
    assert [len(r) for r in grown] == [len(r) for r in whole] and sum(map(len, whole)) > 300
    for a, b in zip(grown, whole):
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("n_keep", [3, 10])
def test_after_a_shift_the_penalties_count_every_generated_token_the_window_holds(n_keep):
    """The penalties look at the generated tokens still in the window: with --n-keep beyond the prompt, those in
    the kept start as well as the newest (they were left out, so a token generated early and kept was counted
    as never generated)."""
    from babyllama.sampler import Controls

    e = Engine(tiny_model("fp32", max_seq_len=16))
    prompt = [1, 5, 6]
    batch = Batch(e, 1)
    seq = batch.add(Sequence(list(prompt), Sampler(0.8, seed=3, controls=Controls(frequency_penalty=0.5)), 60,
                             frozenset(), context_shift=True, n_keep=n_keep))
    while not seq.done:
        batch.step()
        assert seq.generated == seq.tokens[len(prompt):]  # the prompt stays whole: every later token was generated
    assert seq.n_dropped > 0


@pytest.mark.parametrize("kind", ["q8_0", "q8_0.gguf", "q4_0.gguf"])
def test_quantized_prompts_give_the_same_numbers_in_any_chunks_on_avx512_vnni(kind, tmp_path):
    """On AVX-512 VNNI builds every quantized product of a prompt runs the int8 decode kernel, whose rows do not
    depend on the call's token count: a prompt prefilled whole, in chunks, or after a prefix from a slot's cache
    gives bit for bit the same logits (the built-in chat model: runq.c's groups of 32 on rows of 128 and 352, and
    its GGUF exports' llama.cpp blocks), so a server's answer does not depend on what its slots held."""
    from conftest import run_cli

    from babyllama import api, kernels_native
    from babyllama.loading import BUILTIN_CHAT

    native = kernels_native.load()
    if native is None or native.isa() != "avx512-vnni":
        pytest.skip("the int8 prompt kernel for every quantized row takes an AVX-512 VNNI build")
    path = BUILTIN_CHAT
    if kind.endswith(".gguf"):
        path = tmp_path / "chat.gguf"
        proc = run_cli("export", str(path), "--model", str(BUILTIN_CHAT), "--dtype", kind.split(".")[0])
        assert proc.returncode == 0, proc.stderr.decode()
    engine = api.load(str(path)).engine
    tokens = [1, *np.random.default_rng(3).integers(3, 512, 120).tolist()]
    whole = engine.forward(tokens, range(len(tokens)), engine.new_cache(), logits="all")
    for split in ([20], [100], [120], [7, 50]):
        cache, start, rows = engine.new_cache(), 0, []
        for end in [*split, len(tokens)]:
            rows.append(engine.forward(tokens[start:end], range(start, end), cache, logits="all"))
            start = end
        np.testing.assert_array_equal(np.concatenate(rows), whole)
    batch = Batch(engine, 2, prefix_min=16)  # a prefix from another sequence's cache, then greedy decoding
    first = batch.add(Sequence(tokens[:60] + [5, 6, 7], Sampler(0.0), 200, max_new=3))
    run_all(batch, [first])
    batch.release(first)
    second = batch.add(Sequence(list(tokens), Sampler(0.0), 200, max_new=10))
    assert second.n_reused == 60
    rows = run_all(batch, [second])[0]
    assert second.generated == list(generate(engine, tokens, 200, Sampler(0.0), max_new=10))
    np.testing.assert_array_equal(rows[0], whole[-1])
