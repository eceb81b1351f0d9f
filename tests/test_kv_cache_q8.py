"""The Q8_0 KV cache (`kv_cache="q8_0"`, llama.cpp's -ctk/-ctv q8_0): each head's row of keys or values held as
int8 values with one fp32 scale per 32 (kernels_base.kv_q8_dtype). C writes the bytes NumPy's kv_write writes,
on every native build; attention reads them into the same fp32 arithmetic as NumPy's attention over the
dequantized rows; the effect on a trained model's logits is bounded; context shift and the command line take
it. The exactness rule, context-shift generation and batches with this cache: tests/test_kv_cache.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_greedy_agree,
    byte_tokenizer,
    logits_after,
    native_build,
    random_weights,
    tiny_args,
    tiny_model,
)
from test_kv_cache import BUILDS, shifted_cache

from babyllama import formats, kernels_native
from babyllama.engine import Engine, KVCache, kv_cache_dtype, kv_cache_name
from babyllama.generate import generate
from babyllama.kernels_base import NumpyKernels, apply_rope, attend, kv_q8_dtype, kv_read, kv_write, segments
from babyllama.loading import BUILTIN_MODEL
from babyllama.sampler import Sampler

rng = np.random.default_rng(23)
HEAD_SIZES = [8, 40, 64]  # one group of 8 (not a multiple of 32) and of 40 (8 + 32: AVX2's 8 at a time), two of 32


@pytest.fixture(params=BUILDS, scope="module")
def native(request):
    return native_build(request.param)


def q8_rows(x: np.ndarray) -> np.ndarray:
    """Rows x (..., head_size) as Q8_0 cache rows."""
    rows = np.zeros(x.shape[:-1], kv_q8_dtype(x.shape[-1]))
    kv_write(rows, ..., x)
    return rows


def raw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8)


def test_q8_rows_hold_int8_values_and_a_scale_per_32():
    """The row layout (what kernels.c reads): head_size int8 values, then an fp32 scale per group of 32 (one
    group for a head size that is not a multiple of 32); scale = max|x| / 127 and value = round(x / scale), ties
    to even, so a value is within half a step of x; an all-zero group keeps a zero scale."""
    assert [kv_q8_dtype(hs).itemsize for hs in (64, 40, 8, 128)] == [64 + 8, 40 + 4, 8 + 4, 128 + 16]
    x = rng.standard_normal((5, 64)).astype(np.float32) * np.float32([[1e-3], [1], [30], [1e4], [0]])
    x[1, :32] = np.float32([127, 2.5, 3.5, -2.5, -0.5, 1.5, *range(26)])  # scale exactly 1: ties at .5
    rows = q8_rows(x)
    np.testing.assert_array_equal(rows["d"][1, 0], np.float32(1.0))
    np.testing.assert_array_equal(rows["q"][1, :6], [127, 2, 4, -2, 0, 2])
    assert not rows["q"][4].any() and not rows["d"][4].any()
    step = np.repeat(rows["d"], 32, axis=-1)
    assert (np.abs(kv_read(rows) - x) <= step / 2 * (1 + 1e-6)).all()
    np.testing.assert_array_equal(kv_read(rows), rows["q"].astype(np.float32) * step)


def attention_inputs(head_size: int, n_heads: int = 4, kv_heads: int = 2):
    """An attention call's inputs: a 7-token prompt-shaped run in slot 0 and single decode tokens in slots 1 and
    2, over earlier positions already cached (rows of every magnitude, one all zero)."""
    args = tiny_args(dim=n_heads * head_size, n_heads=n_heads, n_kv_heads=kv_heads, max_seq_len=32)
    engine = Engine(random_weights(args), plain=True)
    engine.new_cache()  # RoPE tables
    slots = np.array([0] * 7 + [1, 2])
    positions = np.array([*range(3, 10), 20, 0])
    scale = np.exp2(rng.uniform(-12, 12, (len(slots), kv_heads, 1))).astype(np.float32)
    q = rng.standard_normal((len(slots), n_heads, head_size)).astype(np.float32)
    k = rng.standard_normal((len(slots), kv_heads, head_size)).astype(np.float32)
    v = rng.standard_normal((len(slots), kv_heads, head_size)).astype(np.float32) * scale
    v[3, 1] = 0.0
    history = rng.standard_normal((3, kv_heads, 32, head_size)).astype(np.float32)
    return (q, k, v, engine.cos[positions], engine.sin[positions]), history, slots, positions


def run_attention(kernels, inputs, history, slots, positions):
    """kernels.attention on copies of the inputs over a Q8_0 cache holding `history`: (out, keys, values, the
    keys after the kernels' RoPE)."""
    keys, values = q8_rows(history), q8_rows(history)
    q, k, v, cos, sin = (a.copy() for a in inputs)
    out = kernels.attention(q, k, v, cos, sin, keys, values, slots, positions)
    return out, keys, values, k


@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_q8_cache_writes_are_numpys_bytes(native, head_size):
    """C stores each new key and value row exactly as kv_write quantizes it (values as given, keys after C's
    RoPE, which the native attention applies to k in place); NumPy's attention stores the same value rows; rows
    not written keep their bytes."""
    inputs, history, slots, positions = attention_inputs(head_size)
    written = (slots, slice(None), positions)
    _, keys, values, k_rot = run_attention(native, inputs, history, slots, positions)
    assert not np.array_equal(k_rot, inputs[1])  # rotated in place
    np.testing.assert_array_equal(raw(values[written]), raw(q8_rows(inputs[2])))
    np.testing.assert_array_equal(raw(keys[written]), raw(q8_rows(k_rot)))
    _, np_keys, np_values, _ = run_attention(NumpyKernels(), inputs, history, slots, positions)
    np.testing.assert_array_equal(raw(np_values), raw(values))
    untouched = np.ones(values.shape, bool)
    untouched[written] = False
    np.testing.assert_array_equal(raw(values[untouched]), raw(q8_rows(history)[untouched]))


@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_q8_cache_attention_reads_into_fp32_arithmetic(native, head_size):
    """Attention over a Q8_0 cache computes, in C, what NumPy's attention computes from the same rows
    dequantized: agreement to the f32 cache's tolerance (rtol 1e-4, atol 1e-5: C applies each group's scale to
    its dot product, NumPy to each value). Against an f32 cache on the same inputs, within what the rounding of
    keys and values to 8 bits moves it (measured up to ~1% of the largest output; bound 4%)."""
    inputs, history, slots, positions = attention_inputs(head_size)
    got, keys, values, _ = run_attention(native, inputs, history, slots, positions)
    q_rot = inputs[0].copy()  # q rotated by C's arithmetic, as C attended with it
    native.attention(q_rot, inputs[1].copy(), inputs[2], inputs[3], inputs[4], q8_rows(history), q8_rows(history),
                     slots, positions)
    want = np.empty_like(got)
    for start, end, slot, pos0 in segments(slots, positions):
        end_pos = pos0 + end - start
        want[start:end] = attend(q_rot[start:end], kv_read(keys[slot, :, :end_pos]),
                                 kv_read(values[slot, :, :end_pos]), pos0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    keys32, values32 = history.copy(), history.copy()
    q, k, v, cos, sin = (a.copy() for a in inputs)
    f32 = native.attention(q, k, v, cos, sin, keys32, values32, slots, positions)
    for row in range(len(slots)):  # per token: the value rows' magnitudes differ by up to 2^24 between tokens
        np.testing.assert_allclose(got[row], f32[row], rtol=0, atol=4e-2 * np.abs(f32[row]).max())


def test_native_decode_with_q8_cache_matches_numpy(native):
    """Whole forward passes (a 12-token prompt, then decode steps of 2 slots through the one-call step) with a
    Q8_0 cache, C against the NumPy engine on fp32 weights: logits agree to 1e-4 of their largest (measured
    ~1e-6: a key or value whose fp32 result differs by an ulp between the paths rarely crosses a rounding
    boundary of its 8-bit step)."""
    w = tiny_model("fp32")
    out = {}
    toks = rng.integers(3, w.args.vocab_size, 12).tolist()
    for name, kernels in (("native", native), ("numpy", NumpyKernels())):
        e = Engine(w, kernels=kernels, kv_cache="q8_0")
        cache = e.new_cache(2)
        assert cache.k.dtype == kv_q8_dtype(w.args.head_size) and cache.k.shape == (2, 2, 2, w.args.max_seq_len)
        logits = [e.forward(toks, range(12), cache, slots=[1] * 12)]
        logits += [e.forward([toks[i], toks[-i]], [12 + i] * 2, cache, slots=[0, 1]) for i in range(10)]
        out[name] = np.concatenate(logits)
    np.testing.assert_allclose(out["native"], out["numpy"], rtol=0, atol=1e-4 * np.abs(out["numpy"]).max())


@pytest.mark.parametrize("kind", ["fp32", "q8_0", "q4_0"])
def test_q8_cache_on_the_builtin_model(kind):
    """The built-in (trained) model on the default backend, Q8_0 against f32 keys and values over 121 tokens.
    fp32 weights: the cache moves logits by at most 2% of the largest, 0.5% of the mean on average (measured
    0.44% and 0.12%; an fp16 cache: 0.014% and 0.004%). Quantized weights: bounds of 5% and 2% (measured 1.1%
    and 0.7%, about what Q8_0 weights themselves move them, and a fourteenth of Q4_0's 9.8% mean). Greedy
    decoding agrees up to the first near-tie (margin < 0.1 with logits up to ~20; measured: the six streams part
    after 8 to 200 tokens, at margins of 0.001 to 0.05)."""
    base = formats.load(BUILTIN_MODEL)
    w = base if kind == "fp32" else base.quantize_as(kind)
    tokens = [1, *np.random.default_rng(0).integers(3, base.args.vocab_size, 120).tolist()]
    q8, f32 = Engine(w, kv_cache="q8_0"), Engine(w, kv_cache="f32")
    lq, lf = (e.forward(tokens, range(len(tokens)), e.new_cache()) for e in (q8, f32))
    max_bound, mean_bound = (2e-2, 5e-3) if kind == "fp32" else (5e-2, 2e-2)
    np.testing.assert_allclose(lq, lf, rtol=0, atol=max_bound * np.abs(lf).max())
    assert 0 < np.abs(lq - lf).mean() < mean_bound * np.abs(lf).mean()
    for prompt in ([1], [1, 403, 411, 261]):
        want, got = (list(generate(e, prompt, 200, Sampler(0.0))) for e in (f32, q8))
        assert_greedy_agree(want, got, lambda i, p=prompt, s=want: logits_after(f32, p + s[:i]), max_margin=0.1)


def test_q8_cache_setting_and_size():
    """"q8_0" gives Q8_0 rows of the model's head size (never "auto"); the up-front memory check counts their
    bytes; a cache of another row type, or Q8_0 rows of another head size, is refused in NumPy and before C."""
    w = tiny_model("fp32")
    hs = w.args.head_size
    assert kv_cache_dtype(w, "q8_0") == kv_q8_dtype(hs) and kv_cache_name(kv_q8_dtype(hs)) == "q8_0"
    assert [kv_cache_name(kv_cache_dtype(w, kv)) for kv in ("auto", "f32", "f16")] == ["f32", "f32", "f16"]
    assert kv_cache_name(Engine(w.quantize_q4()).kv_dtype) == "f16"

    import babyllama.engine as engine_module

    asked = []
    real = engine_module.check_fits
    engine_module.check_fits = lambda nbytes, what, hint: asked.append(nbytes)
    try:
        KVCache(w.args, 3, 16, kv_q8_dtype(hs))
    finally:
        engine_module.check_fits = real
    assert asked == [2 * w.args.n_layers * 3 * w.args.n_kv_heads * 16 * (hs + 4 * (hs // 32 or 1))]
    with pytest.raises(ValueError, match="Q8_0 rows"):
        KVCache(w.args, 1, 8, kv_q8_dtype(2 * hs))
    native = kernels_native.load()
    if native is not None:
        e = Engine(w, kv_cache="q8_0")
        good, f32 = e.new_cache(), Engine(w).new_cache()
        other = np.zeros(good.k.shape, kv_q8_dtype(2 * hs))
        plan = native.step_plan(w, e.cos, e.sin)
        for keys, values in ((good.k, f32.v), (other, other), (good.k, good.v[:, :, :, ::2])):
            with pytest.raises(ValueError, match="arrays of one type"):
                native.forward_step(plan, np.array([3]), np.array([0]), np.array([0]), keys, values, [0])


def test_shift_cache_with_a_q8_cache():
    """Context shift on a Q8_0 cache: the moved keys are the old rows dequantized, rotated back by delta in
    fp32 and quantized again (kv_write); values move byte for byte; rows before the cut keep theirs."""
    e, _, cache, old_k, old_v = shifted_cache("q8_0")  # positions 3..7 dropped, 8..19 moved down to 3..14
    args = e.args
    moved = kv_read(old_k[:, :, 8:20])
    rows = moved.reshape(-1, 1, args.head_size)
    cos = np.broadcast_to(e.cos[5], (len(rows), args.head_size // 2))
    sin = np.broadcast_to(-e.sin[5], (len(rows), args.head_size // 2))
    want = q8_rows(apply_rope(rows, cos, sin).reshape(moved.shape))
    np.testing.assert_array_equal(raw(cache.k[:, 1, :, 3:15]), raw(want))
    np.testing.assert_array_equal(raw(cache.k[:, 1, :, :3]), raw(old_k[:, :, :3]))
    np.testing.assert_array_equal(raw(cache.v[:, 1, :, 3:15]), raw(old_v[:, :, 8:20]))


def test_cli_takes_q8_cache(tmp_path, monkeypatch, capsys):
    """`--kv-cache q8_0` reaches the engine from run, eval and serve (which names it), and bench's row says it."""
    pytest.importorskip("uvicorn", reason="serve's command needs the serve extra")
    import babyllama.api as api
    from babyllama import bench, serve
    from babyllama.cli import main

    seen = []
    real = api.Engine

    def spy(*args, **kw):
        engine = real(*args, **kw)
        seen.append(kv_cache_name(engine.kv_dtype))
        return engine

    monkeypatch.setattr(api, "Engine", spy)
    model, tok = tmp_path / "m.bin", tmp_path / "tok.bin"
    formats.save(tiny_model("fp32", max_seq_len=32), model)
    byte_tokenizer(320).save(tok)
    common = [str(model), "-z", str(tok), "--kv-cache", "q8_0"]
    assert main(["run", *common, "-n", "20", "-t", "0"]) == 0
    (tmp_path / "d.txt").write_text("a b c\n<|endoftext|>\n", encoding="utf-8")
    assert main(["eval", *common, "--data", str(tmp_path / "d.txt")]) == 0
    monkeypatch.setattr(serve, "create_app", lambda model, config: None)
    monkeypatch.setattr(serve, "listen", lambda host, port: [])
    monkeypatch.setattr(serve, "run", lambda *args: None)
    assert main(["serve", *common]) == 0
    assert seen == ["q8_0"] * 3
    assert "(8 slots, q8_0 KV cache)" in capsys.readouterr().err
    specs = []
    monkeypatch.setattr(bench, "_run_child", lambda spec, env=None: specs.append(spec) or {})
    monkeypatch.setattr(bench, "model_file", lambda *args: model)
    plan = bench.Plan(["builtin"], ("q4_0",), paths=("fast",), kv_cache="q8_0")
    row = bench._ours(plan, "builtin", "q4_0", "default", "fast", {}, tmp_path, log=lambda m: None)
    assert specs[-1]["kv_cache"] == "q8_0" and row.engine == "babyllama --kv-cache q8_0"
