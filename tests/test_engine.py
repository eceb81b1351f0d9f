"""The NumPy engine: a straightforward per-token reference, prefill, slots and Q8_0 agree."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_greedy_agree, logits_after, random_weights, tiny_args

from babyllama import formats
from babyllama.engine import Engine
from babyllama.generate import Batch, Sequence, generate
from babyllama.sampler import Sampler
from babyllama.tokenizer import Tokenizer


def reference_forward(w: formats.Weights, tokens: list[int]) -> np.ndarray:
    """run.c's forward written as plainly as possible (float64, loops over heads and positions)."""
    a = w.args
    hs, g = a.head_size, a.n_heads // a.n_kv_heads
    ks = [[] for _ in range(a.n_layers)]
    vs = [[] for _ in range(a.n_layers)]
    out = []

    def rms(x, gain):
        return x / np.sqrt(np.mean(x * x) + a.norm_eps) * gain

    def rope(vec, pos):
        vec = vec.copy()
        for i in range(0, len(vec), 2):
            freq = 1.0 / a.rope_theta ** ((i % hs) / hs)
            c, s = np.cos(pos * freq), np.sin(pos * freq)
            vec[i], vec[i + 1] = vec[i] * c - vec[i + 1] * s, vec[i] * s + vec[i + 1] * c
        return vec

    for pos, t in enumerate(tokens):
        x = w.tok_embeddings[t].astype(np.float64)
        for L in range(a.n_layers):
            xb = rms(x, w.rms_att[L])
            q = rope(w.wq[L] @ xb, pos)
            ks[L].append(rope(w.wk[L] @ xb, pos))
            vs[L].append(w.wv[L] @ xb)
            att = np.zeros(a.dim)
            for h in range(a.n_heads):
                kvh = h // g
                qh = q[h * hs:(h + 1) * hs]
                scores = np.array([qh @ k[kvh * hs:(kvh + 1) * hs] for k in ks[L]]) / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                att[h * hs:(h + 1) * hs] = sum(pi * v[kvh * hs:(kvh + 1) * hs] for pi, v in zip(p, vs[L]))
            x = x + w.wo[L] @ att
            xb = rms(x, w.rms_ffn[L])
            h1 = w.w1[L] @ xb
            x = x + w.w2[L] @ (h1 / (1 + np.exp(-h1)) * (w.w3[L] @ xb))
        out.append(w.wcls @ rms(x, w.rms_final))
    return np.array(out)


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=4), dict(n_kv_heads=1, shared_classifier=False),
                                dict(rope_theta=500000.0, norm_eps=1e-6)])
def test_engine_matches_reference(kw):
    w = random_weights(tiny_args(**kw), scale=0.2)
    tokens = list(np.random.default_rng(1).integers(0, w.args.vocab_size, 12))
    ref = reference_forward(w, tokens)
    e = Engine(w)
    prefill = e.forward(tokens, np.arange(12), e.new_cache(), logits="all")
    np.testing.assert_allclose(prefill, ref, atol=2e-4, rtol=0)
    cache = e.new_cache()
    stepwise = np.concatenate([e.forward([t], [i], cache) for i, t in enumerate(tokens)])
    np.testing.assert_allclose(stepwise, ref, atol=2e-4, rtol=0)


def test_slots_are_independent():
    w = random_weights(tiny_args(), scale=0.2)
    e = Engine(w)
    a, b = [5, 6, 7, 8, 9], [100, 101, 102]
    alone_a = e.forward(a, range(5), e.new_cache(), logits="last")
    alone_b = e.forward(b, range(3), e.new_cache(), logits="last")
    cache = e.new_cache(3)
    both = e.forward(a + b, [*range(5), *range(3)], cache, slots=[2] * 5 + [0] * 3, logits="last")
    np.testing.assert_allclose(both[0], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone_b[0], atol=1e-5)


def test_batch_generation_equals_single_streams():
    w = random_weights(tiny_args(), scale=0.3)
    e = Engine(w)
    prompts = [[1, 10, 11], [1, 50], [1, 7, 8, 9, 10, 11]]
    singles = [list(generate(e, p, 20, Sampler(0.0))) for p in prompts]
    batch = Batch(e, n_slots=3)
    seqs = [batch.add(Sequence(list(p), Sampler(0.0), 20)) for p in prompts]
    while any(not s.done for s in seqs):
        batch.step()
    # the batch's first step is an 11-token prefill (BLAS), each single one a short one (the decode kernel):
    # equal up to the first near-tie
    for p, single, s in zip(prompts, singles, seqs):
        if assert_greedy_agree(single, s.generated, lambda i, p=p, single=single: logits_after(e, p + single[:i]),
                               1e-2) == len(single):
            assert s.stop_reason == "length" and len(s.tokens) == 21


def test_python_generate_batch_keeps_at_most_parallel_sequences_live(tmp_path, monkeypatch):
    """generate_batch holds `parallel` KV caches at most (default 16, as run --batch-file), not one per prompt;
    each sequence's numbers do not depend on what shares its steps, so the text is the same."""
    from conftest import byte_tokenizer

    from babyllama import generate as gen
    from babyllama.api import load

    formats.save(random_weights(tiny_args(vocab_size=300), scale=0.3), tmp_path / "m.bin", version=1)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    model = load(tmp_path / "m.bin", tmp_path / "tok.bin")
    slots = []

    class CountedBatch(gen.Batch):
        def __init__(self, engine, n_slots, *args, **kw):
            slots.append(n_slots)
            super().__init__(engine, n_slots, *args, **kw)

    monkeypatch.setattr(gen, "Batch", CountedBatch)
    prompts = [f"p{i}" for i in range(20)]
    few = model.generate_batch(prompts, steps=12, seed=7, parallel=3)
    default = model.generate_batch(prompts, steps=12, seed=7)
    every = model.generate_batch(prompts, steps=12, seed=7, parallel=20)
    assert slots == [3, 16, 20]
    assert few == default == every and len(set(few)) > 1


def test_the_sequences_generate_batch_returns_do_not_keep_their_steps_logits():
    """Each sequence kept its last logits row, a view that held its whole step's logits (every live sequence's):
    generate_batch's results of 1,000 prompts on a 32,000-token vocabulary held 360 MB until they were dropped.
    They hold their tokens only."""
    import tracemalloc

    from babyllama.generate import generate_batch

    engine = Engine(random_weights(tiny_args(vocab_size=4096)))
    prompts = [[1, 3 + i] for i in range(200)]
    generate_batch(engine, prompts[:2], 8, [Sampler(1.0)] * 2)  # what a first step allocates for good
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        seqs = generate_batch(engine, prompts, 8, [Sampler(1.0, 0.9, i) for i in range(200)], max_slots=16)
        held = tracemalloc.get_traced_memory()[0] - before  # the results and what they keep
    finally:
        tracemalloc.stop()
    assert all(len(s.generated) for s in seqs)
    assert held < 1 << 20, held  # ~0.2 MB; with the logits views 3.5 MB


def test_python_calls_without_a_seed_sample_anew_each_time(tmp_path, monkeypatch):
    """A call that names no seed samples with a new one: seeded by the clock's seconds (run.c's rule for -s 0),
    every call within a second told the same story again."""
    import time

    from conftest import byte_tokenizer

    from babyllama.api import load

    formats.save(random_weights(tiny_args(vocab_size=300), scale=0.3), tmp_path / "m.bin", version=1)
    byte_tokenizer(300).save(tmp_path / "tok.bin")
    model = load(tmp_path / "m.bin", tmp_path / "tok.bin")
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.0)  # every call within the same second
    kw = dict(max_new_tokens=12, temperature=1.0, topp=1.0)
    assert len({model.generate("p", **kw) for _ in range(3)}) == 3
    assert len({"".join(model.stream("p", **kw)) for _ in range(3)}) == 3
    assert model.generate_batch(["p", "q"], **kw) != model.generate_batch(["p", "q"], **kw)
    assert model.generate("p", seed=5, **kw) == model.generate("p", seed=5, **kw)  # a seed still reproduces


def test_chunked_prefill_equals_one_shot():
    w = random_weights(tiny_args(), scale=0.3)
    e = Engine(w)
    prompt = [1, *range(20, 50)]
    one = list(generate(e, prompt, 40, Sampler(0.0)))
    batch = Batch(e, 1, max_tokens_per_step=7)
    seq = batch.add(Sequence(list(prompt), Sampler(0.0), 40))
    while not seq.done:
        batch.step()
    # chunks of 7 go through the decode kernel, the whole 31-token prompt through BLAS
    assert_greedy_agree(one, seq.generated, lambda i: logits_after(e, prompt + one[:i]), 1e-2)


def test_q8_engine_close_to_fp32_on_stories260k(stories260k, tok512, tmp_path):
    """Greedy text of stories260K converted to Q8_0 vs fp32: report how close (and bound it)."""
    fp32 = formats.load(stories260k)
    formats.save(fp32, tmp_path / "q.bin", version=2)
    q8 = formats.load(tmp_path / "q.bin")
    tok = Tokenizer.load(tok512, 512)
    prompt = tok.encode("Once upon a time", bos=True)
    a = list(generate(Engine(fp32), prompt, 200, Sampler(0.0)))
    b = list(generate(Engine(q8), prompt, 200, Sampler(0.0)))
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    print(f"Q8_0 greedy text equals fp32 for the first {same} of {len(a)} tokens")
    assert same >= 50
    # logits along the fp32 path stay close
    e32, e8 = Engine(fp32), Engine(q8)
    toks = (prompt + a)[:64]
    l32 = e32.forward(toks, range(64), e32.new_cache())
    l8 = e8.forward(toks, range(64), e8.new_cache())
    assert np.abs(l32 - l8).max() < 0.5
    assert (l32.argmax(-1) == l8.argmax(-1)).mean() > 0.9


FREED_MEMORY = """
import resource, sys
from babyllama.memory import keep_freed_memory
if sys.argv[2] == "keep" and not keep_freed_memory():
    print("untuned")
    sys.exit(0)
from babyllama.api import make_engine
from babyllama.loading import open_model
engine = make_engine(open_model(sys.argv[1]).weights, "numpy", False, False, "auto")
prompt = [1] + [3 + i % 200 for i in range(255)]
cache = engine.new_cache(1, len(prompt))  # the same positions each time: its pages fault in once
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    engine.forward(prompt, range(len(prompt)), cache, logits="last")
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_prompts_reuse_freed_memory_where_the_command_asks_for_it(tmp_path):
    """A prompt's activations and the kernels' buffers are allocated anew every step. With glibc's defaults the
    large ones are mapped fresh each time and every page faults in again; after memory.keep_freed_memory (what
    the `babyllama` command does at start) a later prompt of the same size reuses what the last one freed."""
    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(dim=256, hidden_dim=768, n_layers=2, n_heads=4, n_kv_heads=4,
                                          vocab_size=256, max_seq_len=512)), path, version=1)
    runs = {how: subprocess.run([sys.executable, "-c", FREED_MEMORY, str(path), how], capture_output=True,
                                text=True, check=True).stdout.split() for how in ("keep", "default")}
    if runs["keep"] == ["untuned"]:
        pytest.skip("not glibc: no mallopt")
    keep, default = int(runs["keep"][0]), int(runs["default"][0])
    assert default > 500  # 256 x 768 floats a step, mapped fresh: the case this guards against happens here
    assert keep < 50


class PlanWaitsForAGrowth:
    """The backend, but its step plan is built only once another thread has grown the RoPE tables (or after
    half a second): the interleaving of two threads sharing one engine that would leave a plan on the old tables."""

    def __init__(self, inner):
        import threading

        self.inner, self.building, self.grown = inner, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step_plan(self, weights, cos, sin):
        self.building.set()
        self.grown.wait(0.5)
        return self.inner.step_plan(weights, cos, sin)


def test_threads_sharing_an_engine_never_leave_its_step_plan_on_old_tables():
    import threading

    from babyllama.kernels import backend

    if backend().name != "native":
        pytest.skip("only the native kernels have a step plan")
    k = PlanWaitsForAGrowth(backend())
    engine = Engine(random_weights(tiny_args()), kernels=k)
    short = engine.new_cache(1, seq_len=4)
    first = threading.Thread(target=engine.forward, args=([1], [0], short))
    first.start()
    k.building.wait(5)
    long = engine.new_cache(1, seq_len=64)  # another thread's longer run grows the tables meanwhile
    k.grown.set()
    first.join()
    fresh = Engine(random_weights(tiny_args()), kernels=backend())
    ref = fresh.forward([1] * 41, range(41), fresh.new_cache(1, seq_len=64))[-1]
    engine.forward([1] * 40, range(40), long)
    np.testing.assert_allclose(engine.forward([1], [40], long)[-1], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("tokens, positions, slots, message", [
    ([1, 2, 3], [0, 1], None, "one entry per token"),
    ([1, 2], [0, 1, 2], None, "one entry per token"),
    ([1, 2, 3], [0, 1, 2], [0, 0], "one entry per token"),
    ([1] * 20, list(range(19)), None, "one entry per token"),  # a prompt past the one-call step's size
    ([5], [], None, "one entry per token"),
    ([], [], None, "at least one token"),
])
def test_forward_refuses_lengths_that_do_not_match_in_one_line_on_every_path(plain, tokens, positions, slots,
                                                                             message):
    """The per-op NumPy path (plain, or a long prompt) says what the one-call step says, not a broadcast error
    from inside a layer."""
    engine = Engine(random_weights(tiny_args()), plain=plain)
    with pytest.raises(ValueError, match=message):
        engine.forward(tokens, positions, engine.new_cache(2), slots)


def test_forward_refuses_an_unknown_logits_word():
    """A typo ("Last") would otherwise return every row, as "all" does."""
    engine = Engine(random_weights(tiny_args()))
    with pytest.raises(ValueError, match='logits must be "all" or "last", got \'Last\''):
        engine.forward([1, 2], [0, 1], engine.new_cache(1), logits="Last")


@pytest.mark.parametrize("quantize", [None, "q4_0"])
def test_a_model_pickles_and_generates_the_same_text(quantize):
    """A model passed to a worker of multiprocessing's spawn pool is pickled: the NumPy engine's lock ("cannot
    pickle '_thread.lock' object") and, once it had run, its step plan's C pointers ("ctypes objects containing
    pointers cannot be pickled") refused, where the PyTorch engine pickled. The engine now carries its weights and
    settings and makes the rest again; the copy generates the same text."""
    import pickle

    from babyllama.api import load

    model = load(quantize=quantize)
    fresh = pickle.loads(pickle.dumps(model))  # before any step too
    prompt = "Once upon a time there was a little girl named Lily who"  # a prompt of more than one fused step
    text = model.generate(prompt, steps=60, temperature=0)
    assert pickle.loads(pickle.dumps(model)).generate(prompt, steps=60, temperature=0) == text
    assert fresh.generate(prompt, steps=60, temperature=0) == text


def test_a_process_forked_while_another_thread_builds_a_step_plan_can_generate():
    """A thread's first step on a model builds its step plan (regrouping a quantized model's matrices) holding the
    engine's lock; a process forked meanwhile (a multiprocessing pool started beside a first request) inherited
    the lock held by a thread it does not have, and its first step waited forever. The child gets a fresh lock."""
    import os
    import signal

    w = random_weights(tiny_args())
    engine = Engine(w)
    engine._tables_lock.acquire()  # where the other thread is when the fork comes
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        signal.alarm(10)  # a hung child ends by SIGALRM
        code = 3
        try:
            engine.forward([1, 2, 3], [0, 1, 2], engine.new_cache(seq_len=8))
            code = 0
        finally:
            os._exit(code)
    engine._tables_lock.release()
    assert os.waitpid(pid, 0)[1] == 0  # not 14 (SIGALRM)
