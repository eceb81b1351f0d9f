"""The native kernels on every instruction set the CPU allows (the native build, AVX-512 and VNNI where present,
and a forced AVX2 build), against the plain NumPy reference: every weight type (fp32, runq.c's Q8_0, llama.cpp's
Q8_0 and Q4_0 blocks), the exactness rule (a row's arithmetic does not depend on the batch or the thread count),
the thread pool, the build cache's keys, and the backend protocol that engine.py calls through."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
import weakref

import numpy as np
import pytest
from conftest import (
    ROOT,
    alive,
    assert_greedy_agree,
    byte_tokenizer,
    cpu_has,
    native_build,
    random_weights,
    resident_bytes,
    tiny_args,
    tiny_model,
)

from babyllama import formats, kernels, kernels_native, memory, sampler
from babyllama.engine import Engine
from babyllama.formats import BF16Tensor, Matrix, QTensor, bf16_to_f32, quantize_q80, table_rows
from babyllama.generate import generate
from babyllama.kernels_base import (
    Kernels,
    NumpyKernels,
    PlainKernels,
    dequantize_rows,
    matmul_quantized,
    quantize_rows,
    quantized_gemm,
)
from babyllama.quant import QUANTIZERS as BLOCK_QUANTIZERS
from babyllama.quant import BlockTensor, quantize_q4_0, quantize_q8_0, unpacked_q8
from babyllama.sampler import Rng, Sampler
from babyllama.threads import usable_cpus

rng = np.random.default_rng(11)
ARCHES = tuple(kernels_native.ARCHES)  # native, avx2, avx2-vnni, avx512 (no VNNI), avx512-vnni (no VBMI)


@pytest.fixture(params=ARCHES, scope="module")
def native(request):
    """The native kernels built for `arch`: the CPU's own instruction set, and each forced one it can run
    (AVX2 alone, AVX2 with AVX-VNNI, AVX-512 without VNNI, AVX-512 with VNNI but not VBMI: each has code paths
    of its own)."""
    return native_build(request.param)


def test_native_build_uses_avx512_and_vnni_where_the_cpu_has_them():
    if not cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq"):
        pytest.skip("the CPU lacks AVX-512: its kernels cannot be tested here")
    k = kernels_native.load("native")
    if k is None:
        pytest.skip("no C compiler")
    assert k.isa() == ("avx512-vnni" if cpu_has("avx512_vnni") else "avx512")
    assert kernels_native.load("avx2").isa() == "avx2"
    if cpu_has("avx_vnni"):
        assert kernels_native.load("avx2-vnni").isa() == "avx2-vnni"


def cpu_field(key: str) -> str | None:
    """A field of the CPU's description (kernels_native.cpu_signature: /proc/cpuinfo's first processor), or None
    where it is not there."""
    prefix = f"{key}: "
    return next((line[len(prefix):] for line in kernels_native.cpu_signature().splitlines()
                 if line.startswith(prefix)), None)


def cpu_vendor() -> str | None:
    """The CPU's vendor as Linux names it (GenuineIntel, AuthenticAMD), or None where /proc/cpuinfo is not there."""
    return cpu_field("vendor_id")


def cpu_family() -> int | None:
    """The CPU's family number as /proc/cpuinfo gives it (AMD's Zen 3 and Zen 4: 25, Zen 5: 26), or None."""
    family = cpu_field("cpu family")
    return None if family is None else int(family)


def prefetch_distances(native) -> tuple[int, int]:
    """The int8 rows' prefetch distances (bytes ahead) for weights streaming from memory and for cached ones."""
    native.lib.kernel_prefetch_bytes.restype = ctypes.c_int64
    native.lib.kernel_prefetch_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    return native.lib.kernel_prefetch_bytes(0, -1), native.lib.kernel_prefetch_bytes(1, -1)


def test_the_int8_rows_prefetch_distances_follow_the_cpu(native):
    """The int8 rows' software prefetch distances are chosen when the library loads, by what was measured on each
    kind of CPU: 2 KiB ahead on Intel's; on AMD's with AVX-512 none for weights in the cache, and from memory none
    on Zen 4 (whose prefetchers keep up), 6 KiB on later ones; 6 KiB on AMD's without AVX-512. Whichever they are,
    the products are the same (the parity tests run every build)."""
    vendor, family = cpu_vendor(), cpu_family()
    if vendor is None or family is None:
        pytest.skip("no /proc/cpuinfo: the CPU's vendor and family are not known here")
    if vendor == "GenuineIntel":
        want = (2048, 2048)
    elif vendor == "AuthenticAMD" and cpu_has("avx512f"):
        want = (0 if family == 25 else 6144, 0)
    else:
        want = (6144, 6144)
    assert prefetch_distances(native) == want


def test_a_step_prefetches_as_for_the_cache_where_its_model_fits_in_it(native):
    """forward_step prefetches a model's int8 weights at the cache's distance where all its matrices fit in the
    last-level cache (known on AMD's CPUs, from CPUID), else at the memory's: a tiny model fits, and the same
    model with a classifier of one row more than the cache holds does not."""
    native.lib.kernel_llc_bytes.restype = ctypes.c_int64
    llc = native.lib.kernel_llc_bytes()
    if cpu_vendor() == "AuthenticAMD" and cpu_has("topoext"):  # the flag of CPUID leaf 0x8000001D, which VMs may hide
        assert 1 << 20 <= llc <= 1 << 30  # a core complex's L3: MiBs, not a whole socket's or nothing
    streaming, cached = prefetch_distances(native)
    w = tiny_model("q8_0")
    e = Engine(w, kernels=native)
    e.new_cache()  # the RoPE tables follow the cache's length
    plan = native.step_plan(w, e.cos, e.sin)
    native.lib.kernel_step_prefetch.restype = ctypes.c_int64
    native.lib.kernel_step_prefetch.argtypes = [ctypes.c_void_p]

    def step_prefetch(cls_rows: int) -> int:
        model = type(plan.struct).from_buffer_copy(plan.struct)  # a step is never run with it: only its sizes count
        model.cls.rows = cls_rows
        return native.lib.kernel_step_prefetch(ctypes.addressof(model))

    assert step_prefetch(plan.struct.cls.rows) == (cached if llc else streaming)
    if llc:
        row = w.args.dim + 4 * (w.args.dim // w.wcls.group_size)  # a row of runq.c's int8 values and its scales
        matrices = sum(a.nbytes for m in [w.wcls, *(m for s in w.layer_matrices().values() for m in s)]
                       for a in formats.matrix_arrays(m))
        fits = plan.struct.cls.rows + (llc - matrices) // row
        assert (step_prefetch(fits), step_prefetch(fits + 1)) == (cached, streaming)


QUANTIZERS = {
    "q8_0 gs64": lambda w: quantize_q80(w, 64),
    "q8_0 gs32": lambda w: quantize_q80(w, 32),
    "q8_0 gs8": lambda w: quantize_q80(w, 8),  # not a multiple of 32: the scalar path
    "q8_0 gs16": lambda w: quantize_q80(w, 16),
    "q8_0 blocks": quantize_q8_0,
    "q4_0": quantize_q4_0,
}


@pytest.mark.parametrize("kind", QUANTIZERS)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 20])  # 11, 20: more than one pass of 8 tokens
def test_quantized_products_match_the_reference(native, kind, rows):
    w = rng.standard_normal((77, 256)).astype(np.float32)
    q = QUANTIZERS[kind](w)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    got, ref = native.matmul(x, [q])[0], matmul_quantized(x, q)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def group_size(kind: str) -> int:
    return int(kind.split("gs")[1]) if "gs" in kind else 32


# group sizes that are multiples of 32 but neither 32 nor 64 (a .bin header may carry any): the SIMD kernel that
# reads the group size at run time, where 32 and 64 have kernels of their own
OTHER_GROUPS = {"q8_0 gs96": lambda w: quantize_q80(w, 96), "q8_0 gs128": lambda w: quantize_q80(w, 128)}


# 9 and 10 blocks, 5 groups of 64: the kernels' partial last steps (each format at the lengths its groups divide)
@pytest.mark.parametrize("kind,n", [(k, n) for k in {**QUANTIZERS, **OTHER_GROUPS} for n in (288, 320, 2048)
                                    if n % group_size(k) == 0])
def test_quantized_products_match_the_reference_on_every_row_length(native, kind, n):
    w = rng.standard_normal((19, n)).astype(np.float32)
    q = {**QUANTIZERS, **OTHER_GROUPS}[kind](w)
    for rows in (1, 8):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        got, ref = native.matmul(x, [q])[0], matmul_quantized(x, q)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", QUANTIZERS)
def test_a_row_does_not_depend_on_its_neighbours(native, kind):
    """The exactness rule across rows: a weight row's result is the same whichever rows share the call with it
    (where a chunk of rows starts or ends, how many follow; one token's rows are summed sixteen at a time)."""
    n = 320
    w = rng.standard_normal((41, n)).astype(np.float32)
    for tokens in (1, 3):
        x = rng.standard_normal((tokens, n)).astype(np.float32)
        full = native.matmul(x, [QUANTIZERS[kind](w)])[0]
        for lo, hi in ((1, 41), (2, 9), (5, 6), (3, 20), (7, 40), (16, 33)):
            part = native.matmul(x, [QUANTIZERS[kind](w[lo:hi])])[0]
            np.testing.assert_array_equal(part, full[:, lo:hi])


def test_mixed_types_in_one_call(native):
    """A GGUF model mixes types (Q4_0 beside Q8_0 blocks, fp32); one call takes them all, and at most two
    group sizes."""
    ws = [rng.standard_normal((m, 128)).astype(np.float32) for m in (40, 24, 16, 8)]
    mats = [quantize_q4_0(ws[0]), quantize_q8_0(ws[1]), ws[2], quantize_q80(ws[3], 64)]
    x = rng.standard_normal((5, 128)).astype(np.float32)
    for got, m in zip(native.matmul(x, mats), mats, strict=True):
        ref = x @ m.T if isinstance(m, np.ndarray) else matmul_quantized(x, m)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ValueError, match="two quantization group sizes"):
        native.matmul(x, [quantize_q80(ws[0], 64), quantize_q80(ws[1], 16), quantize_q4_0(ws[2])])


def _backends() -> list[Kernels]:
    """Every backend this machine can run: NumPy, the plain reference, numba where installed, native builds."""
    found: list[Kernels] = [NumpyKernels(), PlainKernels()]
    try:
        from babyllama.kernels_numba import NumbaKernels
    except ImportError:
        pass
    else:
        found.append(NumbaKernels(f32_min_elements=0))
    return found + [k for k in (kernels_native.load(a) for a in ARCHES) if k is not None]


@pytest.mark.parametrize("rows", [3, 20])  # a decode-sized product, and a prompt's (dequantize + sgemm)
def test_every_backend_takes_quantized_and_dense_matrices_in_one_call(rows):
    """A GGUF model may hold one layer's wq, wk, wv in different types (a quantized file with attn_v kept in
    F16): every backend multiplies each by its own arithmetic, whichever comes first."""
    ws = [rng.standard_normal((m, 128)).astype(np.float32) for m in (24, 16, 8)]
    x = rng.standard_normal((rows, 128)).astype(np.float32)
    for mats in ([quantize_q4_0(ws[0]), ws[1].astype(np.float16), quantize_q80(ws[2], 64)],
                 [ws[0], quantize_q8_0(ws[1]), formats.to_bf16(ws[2])]):
        for k in _backends():
            for got, m in zip(k.matmul_many(x, mats), mats, strict=True):
                ref = matmul_quantized(x, m) if formats.is_quantized(m) else x @ formats.dense(m).T
                np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=k.name)


def test_extreme_integer_weights(native):
    """int8 -128 and +-127 (files from other quantizers may hold -128) and Q4_0's 0 and 15 (-8 and +7): the
    byte multiply-adds' |w| and sums must neither wrap nor saturate."""
    n = 128
    q8 = np.tile(np.array([-128, 127, -127, -128], dtype=np.int8), (5, n // 4))
    blocks = np.zeros((5, n // 32, 34), dtype=np.uint8)
    blocks[:, :, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    blocks[:, :, 2:] = q8.reshape(5, n // 32, 32).view(np.uint8)
    q4 = np.zeros((5, n // 32, 18), dtype=np.uint8)
    q4[:, :, :2] = np.array([0.01], dtype=np.float16).view(np.uint8)
    q4[:, :, 2:] = np.tile(np.array([0x0F, 0xF0, 0x00, 0xFF], dtype=np.uint8), 4)
    mats = [QTensor(q8, np.full((5, n // 64), 0.01, dtype=np.float32), 64),
            BlockTensor("q8_0", blocks.reshape(5, -1), n), BlockTensor("q4_0", q4.reshape(5, -1), n)]
    x = np.tile(np.array([1.0, -1.0, 1.0, 1.0], dtype=np.float32), (8, n // 4))  # quantizes to +-127
    for m in mats:
        ref = matmul_quantized(x, m)
        np.testing.assert_allclose(native.matmul(x, [m])[0], ref, rtol=1e-6)
        assert np.all(ref != 0)


@pytest.mark.parametrize("n", [5, 96, 101, 256, 2055])  # not multiples of the vector widths too
def test_fp32_products_match_blas(native, n):
    w = rng.standard_normal((33, n)).astype(np.float32)
    for rows in (1, 2, 3, 4, 8):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        np.testing.assert_allclose(native.matmul(x, [w])[0], x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["fp32", *QUANTIZERS])
def test_a_row_alone_or_in_a_batch_is_identical(native, kind):
    """The exactness rule, per product: each token's result does not depend on how many tokens share the call."""
    n = 2055 if kind == "fp32" else 256
    w = rng.standard_normal((40, n)).astype(np.float32)
    m = w if kind == "fp32" else QUANTIZERS[kind](w)
    x = rng.standard_normal((12, n)).astype(np.float32)
    alone = np.concatenate([native.matmul(x[i:i + 1], [m])[0] for i in range(12)])
    for batch in (2, 3, 8, 12):
        together = np.concatenate([native.matmul(x[i:i + batch], [m])[0] for i in range(0, 12, batch)])
        np.testing.assert_array_equal(together, alone)


def _rows(m, lo: int, hi: int):
    """Rows [lo, hi) of a weight matrix of any kind, as a matrix of its own (a regrouped row is permuted within
    itself, so its rows slice like any other's)."""
    if isinstance(m, np.ndarray):
        return m[lo:hi]
    if isinstance(m, QTensor):
        return dataclasses.replace(m, q=m.q[lo:hi], s=m.s[lo:hi], packed=None if m.packed is None else m.packed[lo:hi])
    return dataclasses.replace(m, data=m.data[lo:hi])


# regrouped rows of 576 values: a group of 16 blocks, two alone; of 128: one group of 4 (Q4_0 rows in pairs on
# AVX2, in fours on AVX-512 VBMI); of 288: a group of 8, one alone; of 480: groups of 8 and 4, three alone, and of
# 992: 16, 8, 4 and three alone (Q4_0 rows in pairs on AVX2; Q4_0 rows' blocks alone go eight rows at a time on
# AVX2, sixteen on AVX-512 VBMI)
REGROUPED_ROW_KINDS = {f"{kind} regrouped{groups}": n for kind in ("q4_0", "q8_0") for groups, n in
                       (("", 576), (", a group of 4", 128), (", 8 + 1", 288), (", 8 + 4 + 3", 480),
                        (", 16 + 8 + 4 + 3", 992))}
# runq.c's groups packed (W_Q8R): groups of 64 on rows of 1088 (16 + 16 blocks and a pair left), of 32 on 992
PACKED_ROW_KINDS = {"q8_0 gs64 packed": (64, 1088), "q8_0 gs32 packed": (32, 992)}


@pytest.mark.parametrize("kind", ["fp32", *QUANTIZERS, *REGROUPED_ROW_KINDS, *PACKED_ROW_KINDS])
def test_a_row_gives_the_same_result_whatever_rows_share_the_call(native, kind):
    """The exactness rule across a product's rows: the kernels take rows several at a time where they can (a
    thread's chunk, eight or sixteen one-token rows side by side, the groups of 4 Q4_0 blocks of two or four
    rows in one vector, the last blocks of eight or sixteen Q4_0 rows in one vector), and a row's result does not
    depend on which rows share its pass, so on where a chunk starts or ends either."""
    gen = np.random.default_rng(45)  # its own draws: the module's rng feeds the tests after it unchanged
    n = REGROUPED_ROW_KINDS.get(kind) or PACKED_ROW_KINDS.get(kind, (0, 576))[1]
    w = gen.standard_normal((45, n)).astype(np.float32)
    if kind == "fp32":
        m = w
    elif kind in REGROUPED_ROW_KINDS:
        m = _regrouped(native, BLOCK_QUANTIZERS[kind[:4]](w))
    elif kind in PACKED_ROW_KINDS:
        m = _packed(native, quantize_q80(w, PACKED_ROW_KINDS[kind][0]))
    else:
        m = QUANTIZERS[kind](w)
    for tokens in (1, 2, 8):
        x = gen.standard_normal((tokens, n)).astype(np.float32)
        whole = native.matmul(x, [m])[0]
        for lo, hi in ((0, 1), (1, 9), (3, 45), (5, 21), (37, 45)):
            np.testing.assert_array_equal(native.matmul(x, [_rows(m, lo, hi)])[0], whole[:, lo:hi])


@pytest.mark.parametrize("kind", ["q8_0 blocks", "q4_0"])
def test_dequantize_is_exact(native, kind):
    q = QUANTIZERS[kind](rng.standard_normal((24, 128)).astype(np.float32))
    np.testing.assert_array_equal(native.dequantize(q), q.dequantize())


def _regrouped(native, q: BlockTensor):
    """q regrouped for native's Q4_0R or Q8_0R kernels, or a skip where the build has none (every build with
    AVX2 has them; a CPU without AVX2 runs the scalar build)."""
    r = native.regroup(q)
    if r is None:
        pytest.skip(f"the {native.isa()} build has no regrouped kernels")
    return r


# blocks: 1 and 3 alone, a group of 4 (+ 3 alone), 8 + 1, 8 + 4 + 3, 16, 16 + 4, 16 + 8 (dim 768), 16 + 8 + 1,
# 16 + 8 + 4 + 3, 16 x 4 + 1
@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
@pytest.mark.parametrize("n", [32, 96, 128, 224, 288, 480, 512, 640, 768, 800, 992, 2080])
def test_regrouped_products_match_the_blocks(native, kind, n):
    """Decode steps read Q4_0 and Q8_0 matrices regrouped (kernels.c's W_Q4_0R, W_Q8_0R: 16, 8 or 4 blocks per
    group, the last 0-3 blocks as they are): the same integer sums per block, added in another order, so within
    float rounding of the blocks' kernel and of the reference, for every grouping of a row and token count."""
    q = BLOCK_QUANTIZERS[kind](rng.standard_normal((37, n)).astype(np.float32))
    r = _regrouped(native, q)
    assert r.data.shape == q.data.shape and not np.array_equal(r.data, q.data) or n < 128
    for tokens in (1, 2, 3, 8, 11):
        x = rng.standard_normal((tokens, n)).astype(np.float32)
        got, blocks, ref = native.matmul(x, [r])[0], native.matmul(x, [q])[0], matmul_quantized(x, q)
        np.testing.assert_allclose(got, blocks, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
@pytest.mark.parametrize("n", [800, 128])  # 16 + 8 + 1 blocks; one group of 4 (Q4_0 rows in pairs or fours)
def test_regrouped_rows_alone_or_in_a_batch_are_identical(native, kind, n):
    q = BLOCK_QUANTIZERS[kind](rng.standard_normal((40, n)).astype(np.float32))
    r = _regrouped(native, q)
    x = rng.standard_normal((12, n)).astype(np.float32)
    alone = np.concatenate([native.matmul(x[i:i + 1], [r])[0] for i in range(12)])
    for batch in (2, 3, 8, 12):
        together = np.concatenate([native.matmul(x[i:i + batch], [r])[0] for i in range(0, 12, batch)])
        np.testing.assert_array_equal(together, alone)
    part = native.matmul(x[:3], [_regrouped(native, BlockTensor(kind, q.data[5:23], n))])[0]
    np.testing.assert_array_equal(part, alone[:3, 5:23])


@pytest.fixture(scope="module")
def amx():
    """The native kernels with AMX's int8 tiles for prompts, or a skip where the CPU or the OS has none."""
    native = native_build("native")
    if not native.use_amx(True):
        pytest.skip("no AMX int8 tiles here (a Sapphire Rapids-class Xeon or later, whose OS grants them)")
    yield native
    native.use_amx(kernels_native.amx_allowed())


# Q8_0 and Q4_0 regrouped (rows of 96: 2 + 1 blocks; 128: 4; 288: 8 + 1; 480: 8 + 4 + 3; 512: 16; 768: 16 + 8;
# 992: 16 + 8 + 4 + 3; 2080: 4 x 16 + 1) and runq.c's groups packed (64 on 1088 and 2048, 32 on 992)
AMX_KINDS = [(kind, n) for kind in ("q8_0", "q4_0") for n in (96, 128, 288, 480, 512, 768, 992, 2080)]
AMX_KINDS += [(64, 1088), (64, 2048), (32, 992)]


@pytest.mark.parametrize("kind, n", AMX_KINDS)
def test_amx_prompts_give_the_avx512_rows_numbers_bit_for_bit(amx, kind, n):
    """Prompts of 32 tokens or more run Q8_0 and Q4_0 products on AMX's int8 tiles where the CPU has them: each
    block's exact int32 sums, then the AVX-512 rows' own multiply-adds, lanes and tree, so every output is the
    number the AVX-512 rows give, and the number decoding its token alone gives (for every grouping of a row's
    blocks, token counts past a tile of 16, and rows past a band of 16)."""
    gen = np.random.default_rng(n)
    w = gen.standard_normal((45, n)).astype(np.float32)
    if kind in BLOCK_QUANTIZERS:
        m = _regrouped(amx, BLOCK_QUANTIZERS[kind](w))
    else:
        m = _packed(amx, quantize_q80(w, kind))
    for tokens in (32, 33, 47, 80):
        x = gen.standard_normal((tokens, n)).astype(np.float32)
        amx.use_amx(False)
        rows = amx.matmul(x, [m])[0]
        amx.use_amx(True)
        tiles = amx.matmul(x, [m])[0]
        alone = np.concatenate([amx.matmul(x[t:t + 1], [m])[0] for t in range(tokens)])
        np.testing.assert_array_equal(tiles, rows)
        np.testing.assert_array_equal(tiles, alone)
        np.testing.assert_array_equal(amx.matmul(x, [_rows(m, 5, 40)])[0], tiles[:, 5:40])


@pytest.mark.parametrize("kind, tokens", [("q8_0", 40), ("q4_0", 40)])
def test_amx_prompt_of_a_model_equals_its_tokens_decoded_alone(amx, kind, tokens):
    """A whole model (Q8_0: runq.c's groups, packed for the kernels by its first decode step; Q4_0 regrouped): a
    prompt's logits, its products on the tiles, are those of the same prompt with the tiles off, and of its
    tokens decoded one at a time, bit for bit."""
    engine = Engine(tiny_model(kind, max_seq_len=128))
    engine.forward([1], [0], engine.new_cache())  # the first step packs the matrices
    prompt = np.random.default_rng(3).integers(1, 320, tokens)
    logits = {}
    for on in (False, True):
        amx.use_amx(on)
        logits[on] = engine.forward(prompt, np.arange(tokens), engine.new_cache())
    cache = engine.new_cache()
    alone = np.concatenate([engine.forward(prompt[t:t + 1], [t], cache) for t in range(tokens)])
    np.testing.assert_array_equal(logits[True], logits[False])
    np.testing.assert_array_equal(logits[True], alone)


def test_babyllama_amx_takes_0_or_1(monkeypatch):
    from babyllama.errors import BabyLlamaError

    for value, allowed in (("", True), ("1", True), (" 0 ", False)):
        monkeypatch.setenv("BABYLLAMA_AMX", value)
        assert kernels_native.amx_allowed() is allowed
    for value in ("no", "2", "off"):
        monkeypatch.setenv("BABYLLAMA_AMX", value)
        with pytest.raises(BabyLlamaError, match=r"BABYLLAMA_AMX=.* must be 0 \(prompts never use AMX's tiles\) or 1"):
            kernels_native.amx_allowed()


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
@pytest.mark.parametrize("n", [32, 96, 128, 224, 288, 768, 800, 2080])
def test_regrouped_rows_dequantize_to_the_same_weights(native, kind, n):
    """A prompt's products dequantize regrouped rows straight from their groups: every kind of group gives back
    exactly the blocks' weights."""
    q = BLOCK_QUANTIZERS[kind](rng.standard_normal((24, n)).astype(np.float32))
    np.testing.assert_array_equal(native.dequantize(_regrouped(native, q)), q.dequantize())


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
@pytest.mark.parametrize("n", [32, 96, 128, 224, 288, 768, 800, 2080])
def test_regrouped_bytes_read_back_as_the_blocks(native, kind, n):
    """NumPy reads a regrouped matrix (quant.regrouped_blocks) as the blocks it came from, byte for byte, for
    every kind of group: files written from it, the plain path and embedding rows see the same weights."""
    q = BLOCK_QUANTIZERS[kind](rng.standard_normal((24, n)).astype(np.float32))
    r = _regrouped(native, q)
    assert r.regrouped and r.data.shape == q.data.shape
    np.testing.assert_array_equal(r.block_bytes(), q.data)
    np.testing.assert_array_equal(r.values(), q.values())
    np.testing.assert_array_equal(r.dequantize(np.array([3, 0, 23])), q.dequantize(np.array([3, 0, 23])))


def _packed(native, q: QTensor) -> QTensor:
    """q with its copy for native's Q8R kernels, or a skip where the build has none (every build with AVX2)."""
    packed = native.pack_q8(q)
    if packed is None:
        pytest.skip(f"the {native.isa()} build has no kernels for runq.c's groups packed")
    return dataclasses.replace(q, packed=packed)


# blocks of 32 on a row: groups of 64: 2 (a pair left), 4, 6 (4 + a pair), 8, 12 (8 + 4), 16, 24 (16 + 8; dim
# 768), 34 (16 + 16 + a pair), 64; groups of 32: 1, 3, 4 + 3, 7, 9 (8 + 1; dim 288), 15, 24, 25, 31 (16 + 8 + 4 + 3)
PACKED_ROWS = [(64, n) for n in (64, 128, 192, 256, 384, 512, 768, 1088, 2048)] + \
              [(32, n) for n in (32, 96, 224, 288, 480, 768, 800, 992)]


@pytest.mark.parametrize("gs, n", PACKED_ROWS)
def test_packed_q8_products_match_runq_layout(native, gs, n):
    """Decode steps read runq.c's Q8 matrices (groups of 32 or 64) packed (kernels.c's W_Q8R: the values grouped
    as Q8_0R's, each group's fp32 scales after them): the same integer sums per block of 32, scaled and added in
    another order, so within float rounding of runq.c's layout and of the reference, for every grouping of a row
    and token count; the packed bytes hold the same values and scales, and dequantize to the same weights."""
    q = quantize_q80(rng.standard_normal((37, n)).astype(np.float32), gs)
    p = _packed(native, q)
    assert p.packed.shape == (37, n + 4 * (n // gs)) and p.packed.dtype == np.uint8
    assert not np.array_equal(p.packed[:, :n].view(np.int8), q.q) or n < 128  # fewer than 4 blocks: as they are
    for tokens in (1, 2, 3, 8, 11):
        x = rng.standard_normal((tokens, n)).astype(np.float32)
        got, plain, ref = native.matmul(x, [p])[0], native.matmul(x, [q])[0], matmul_quantized(x, q)
        np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(native.dequantize(p), q.dequantize())
    np.testing.assert_array_equal(native.embed(p, np.array([3, 0, 36])), q.dequantize()[[3, 0, 36]])
    values, scales = unpacked_q8(p.packed, n, gs)  # NumPy reads the packed bytes back as runq.c's
    np.testing.assert_array_equal(values, q.q)
    np.testing.assert_array_equal(scales, q.s)


def test_q8_arrays_c_cannot_read_are_neither_packed_nor_run(native):
    """Values or scales that are not C-contiguous int8/float32 are not packed (pack_q8: None) and a product with
    them is refused in one line, as is a packed copy that is not C-contiguous uint8."""
    q = quantize_q80(rng.standard_normal((16, 128)).astype(np.float32), 64)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    odd = dataclasses.replace(q, q=np.asfortranarray(q.q))
    assert native.pack_q8(odd) is None
    with pytest.raises(ValueError, match="C-contiguous int8 values"):
        native.matmul(x, [odd])
    p = _packed(native, q)
    with pytest.raises(ValueError, match="packed Q8_0 weights must be C-contiguous"):
        native.matmul(x, [dataclasses.replace(p, packed=np.asfortranarray(p.packed))])


@pytest.mark.parametrize("gs, n", [(64, 768), (32, 288)])
def test_packed_q8_rows_alone_or_in_a_batch_are_identical(native, gs, n):
    p = _packed(native, quantize_q80(rng.standard_normal((40, n)).astype(np.float32), gs))
    x = rng.standard_normal((12, n)).astype(np.float32)
    alone = np.concatenate([native.matmul(x[i:i + 1], [p])[0] for i in range(12)])
    for batch in (2, 3, 8, 12):
        together = np.concatenate([native.matmul(x[i:i + batch], [p])[0] for i in range(0, 12, batch)])
        np.testing.assert_array_equal(together, alone)


def q8_pairs(native, on: int = -1) -> int:
    """kernels.c's kernel_q8_pairs: whether one token's Q8_0R/Q8R rows go in pairs (two streams a thread), after
    setting it to `on` (0 or 1) where the build has pairs."""
    native.lib.kernel_q8_pairs.argtypes = [ctypes.c_int]
    return native.lib.kernel_q8_pairs(on)


def test_q8_rows_go_in_pairs_on_intels_avx2_builds(native):
    """A single token's Q8_0R and Q8R rows read two streams a thread (rows in pairs) where the int8 rows are 256
    bits wide (the AVX2 builds, and AVX-512 ones without the 512-bit rows, which need VNNI and VBMI) on Intel's
    CPUs, where that was measured faster; the 512-bit rows (as fast in one stream) and the scalar build never."""
    vendor = cpu_vendor()
    if vendor is None:
        pytest.skip("no /proc/cpuinfo: the CPU's vendor is not known here")
    chosen = q8_pairs(native)
    try:
        can_pair = q8_pairs(native, 1) == 1
    finally:
        q8_pairs(native, chosen)
    if native.isa() in ("avx2", "avx2-vnni", "scalar"):
        assert can_pair == (native.isa() != "scalar")
    assert chosen == (can_pair and vendor == "GenuineIntel")


Q8_PAIR_CASES = [(kind, n) for kind in ("q8_0", 32, 64) for n in (96, 288, 768, 800, 2048, 2080)
                 if kind == "q8_0" or n % kind == 0]


def _pairs_or_skip(native) -> int:
    """The build's choice of Q8 rows in pairs, or a skip where it has none to choose."""
    chosen = q8_pairs(native)
    if q8_pairs(native, 1) == 0:
        pytest.skip(f"the {native.isa()} build reads its Q8 rows one stream a thread (512-bit rows, or no AVX2)")
    q8_pairs(native, chosen)
    return chosen


# Q8_0 regrouped and runq.c's groups packed: rows without a group of 16, which go alone (96: 2 + 1 blocks; 288:
# 8 + 1), and with them: 16 + 8 (768), 16 + 8 + 1 (800), 4 x 16 (2048), 4 x 16 + 1 (2080)
@pytest.mark.parametrize("kind, n", Q8_PAIR_CASES)
def test_q8_rows_in_pairs_give_each_row_its_numbers_alone(native, kind, n):
    """Rows read in pairs (a chunk's first half beside its second) give each row the bits it gets read alone, for
    every row count a chunk can have (an odd one leaves its last row alone), on one thread and on several."""
    chosen = _pairs_or_skip(native)
    try:
        for rows in (1, 2, 3, 7, 16, 41):
            w = rng.standard_normal((rows, n)).astype(np.float32)
            q = quantize_q8_0(w) if kind == "q8_0" else quantize_q80(w, kind)
            r = _regrouped(native, q) if kind == "q8_0" else _packed(native, q)
            x = rng.standard_normal((1, n)).astype(np.float32)
            alone = None
            for threads in (1, 2, 3):
                native.configure_threads(threads)
                q8_pairs(native, 0)
                one = native.matmul(x, [r])[0]
                alone = one if alone is None else alone
                q8_pairs(native, 1)
                np.testing.assert_array_equal(native.matmul(x, [r])[0], alone)
                np.testing.assert_array_equal(one, alone)
            ref = matmul_quantized(x, q)
            np.testing.assert_allclose(alone, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    finally:
        native.configure_threads()
        q8_pairs(native, chosen)


def test_a_model_decodes_the_same_logits_with_q8_rows_in_pairs(native):
    """A decode step's products (each layer's, the residual adds of wo and w2 into its input, the classifier) give
    the same logits with the rows in pairs as alone."""
    chosen = _pairs_or_skip(native)
    w = random_weights(tiny_args(dim=512, hidden_dim=800, n_heads=8, n_kv_heads=4, vocab_size=320), scale=0.2)
    engine = Engine(w.quantize(32), kernels=native)
    tokens = rng.integers(3, w.args.vocab_size, 6).tolist()
    logits = {}
    try:
        for on in (0, 1):
            q8_pairs(native, on)
            cache = engine.new_cache(1)
            logits[on] = np.concatenate([engine.forward([t], [p], cache) for p, t in enumerate(tokens)])
    finally:
        q8_pairs(native, chosen)
    assert np.isfinite(logits[0]).all()
    np.testing.assert_array_equal(logits[1], logits[0])


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
def test_the_native_quantizer_writes_the_reference_blocks(native, kind):
    """kernels.c's quantize_blocks (`--quantize q4_0`, export to version 3 or GGUF) writes quant.py's blocks
    byte for byte, on every thread: random rows and blocks that test the rules (all zeros, -0.0 first, the
    largest magnitude twice with both signs, values whose scale overflows fp16, a subnormal scale, exact
    halves)."""
    w = rng.standard_normal((301, 96)).astype(np.float32)
    w[0, :32] = 0.0
    w[1, :32] = 0.0
    w[1, 0] = -0.0
    w[2, 5], w[2, 9] = -3.0, 3.0
    w[3, 9], w[3, 5] = -3.0, 3.0
    w[4, :32] *= 1e9
    w[5, :32] *= 1e-9
    w[6, :32] = np.concatenate([[127.0], np.arange(31) - 15.5])  # a Q8_0 scale of 1: values at halves
    native.configure_threads(2)
    try:
        got = native.quantize_blocks(w, kind)
    finally:
        native.configure_threads()
    with np.errstate(over="ignore"):  # the scale of row 4's first block is infinite in fp16
        want = BLOCK_QUANTIZERS[kind](w)
    np.testing.assert_array_equal(got.data, want.data)
    with pytest.raises(ValueError):
        native.quantize_blocks(w[:, :40], kind)


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
def test_a_build_without_avx2_keeps_the_blocks_and_reads_regrouped_ones(kind):
    """The plain C build has no regrouped kernels, so it makes no copies; handed a matrix another build
    regrouped, it gathers each block back and gets its sums bit for bit as from the blocks."""
    plain = native_build("x86-64")
    q = BLOCK_QUANTIZERS[kind](rng.standard_normal((21, 800)).astype(np.float32))
    assert plain.regroup(q) is None
    plain._regroup([q])
    assert not q.regrouped
    if not cpu_has("avx2"):
        pytest.skip("no build on this CPU regroups")
    r = native_build("avx2").regroup(q)
    x = rng.standard_normal((11, 800)).astype(np.float32)
    np.testing.assert_array_equal(plain.matmul(x, [r])[0], plain.matmul(x, [q])[0])
    np.testing.assert_array_equal(plain.dequantize(r), q.dequantize())


@pytest.mark.parametrize("gs, n", [(64, 1088), (32, 992), (64, 768), (32, 288)])
def test_a_build_without_avx2_reads_q8_packed_by_another(gs, n):
    """The plain C build has no kernels for runq.c's groups packed (W_Q8R), so it packs nothing; handed a matrix
    another build packed (a model's weights shared by engines on two builds), it gathers each group back and gets
    its sums bit for bit as from runq.c's layout (it read them as zeros and garbage: NaN logits)."""
    plain = native_build("x86-64")
    q = quantize_q80(rng.standard_normal((21, n)).astype(np.float32), gs)
    assert plain.pack_q8(q) is None
    if not cpu_has("avx2"):
        pytest.skip("no build on this CPU packs")
    p = _packed(native_build("avx2"), q)
    for tokens in (1, 3, 11):
        x = rng.standard_normal((tokens, n)).astype(np.float32)
        np.testing.assert_array_equal(plain.matmul(x, [p])[0], plain.matmul(x, [q])[0])
    np.testing.assert_array_equal(plain.dequantize(p), q.dequantize())


def _wide_model(kind: str = "q4_0"):
    """Rows of 8 + 1 blocks (dim 288) and 16 + 8 (hidden 768): every kind of regrouped group in a decode step, in
    Q4_0 or in llama.cpp's Q8_0 blocks (what a GGUF file's Q8_0 tensors are)."""
    w = random_weights(tiny_args(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=3, vocab_size=320), scale=0.1)
    if kind == "q4_0":
        return w.quantize_q4()
    emb = quantize_q8_0(w.tok_embeddings)
    wcls = emb if w.args.shared_classifier else quantize_q8_0(w.wcls)
    return formats.Weights(w.args, emb, w.rms_att, w.rms_ffn, w.rms_final, wcls=wcls,
                           **{name: [quantize_q8_0(m) for m in stack] for name, stack in w.layer_matrices().items()})


@pytest.mark.parametrize("kind", BLOCK_QUANTIZERS)
def test_a_models_block_matrices_are_regrouped_once_for_every_reader(native, monkeypatch, kind):
    """A model's first call puts the layers' and the classifier's Q4_0 or Q8_0 blocks in the kernels' order, in
    one buffer of their size (each matrix on a cache line), and lets the blocks go (quantized on load: freed); a
    second engine on the same weights reads them as they are. Its logits agree with the blocks' kernel's within
    float rounding (4e-7 of the largest logit), amplified where an activation lands on the other side of a
    quantization step in a later layer (as in test_quantized_engine_matches_plain: seen here at 0.1% of the mean
    logit; allowed 1%, 5% of the largest); the blocks stay when the copy would take more than a quarter of the
    free memory. The prompt comes from its own generator: how far a flip carries depends on the draw (over 30
    draws the mean difference ran 0-0.9% of the mean logit), so a draw that moved with the tests before this one
    made the bound a lottery."""
    w = _wide_model(kind)
    if native.regroup(w.wq[0]) is None:
        pytest.skip(f"the {native.isa()} build has no regrouped kernels")
    q4 = [m for ms in w.layer_matrices().values() for m in ms] + [w.wcls]
    blocks_before = [weakref.ref(m.data.base if m.data.base is not None else m.data) for m in q4]
    tokens = np.random.default_rng(0).integers(0, w.args.vocab_size, 6).tolist()
    regrouped = Engine(w, kernels=native)
    a = regrouped.forward(tokens, range(6), regrouped.new_cache())
    assert all(m.regrouped for m in q4) and len({m.data.base.ctypes.data for m in q4}) == 1  # one buffer
    # each matrix on a cache line (LINE), the buffer their size up to that padding
    assert all(m.data.ctypes.data % kernels_native.LINE == 0 for m in q4)
    assert 0 <= q4[0].data.base.nbytes - sum(m.nbytes for m in q4) < kernels_native.LINE * (len(q4) + 1)
    gc.collect()
    assert all(ref() is None for ref in blocks_before)  # held once
    data = [m.data for m in q4]
    again = Engine(w, kernels=native)
    again.forward(tokens[:1], [0], again.new_cache())
    assert all(m.data is d for m, d in zip(q4, data, strict=True))
    monkeypatch.setattr(kernels_native.memory, "read_by_default", lambda nbytes: False)
    w_blocks = _wide_model(kind)  # the same weights, not regrouped
    blocks = Engine(w_blocks, kernels=native)
    b = blocks.forward(tokens, range(6), blocks.new_cache())
    assert not any(m.regrouped for ms in w_blocks.layer_matrices().values() for m in ms)
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-2 * np.abs(b).max())
    assert np.abs(a - b).mean() < 1e-2 * np.abs(b).mean()


@pytest.mark.parametrize("kind", ["fp32", "q8_0", "q4_0", "q4_0 wide", "q8_0 blocks wide"])
def test_decoded_alone_or_in_a_batch_gives_identical_logits(native, kind):
    """The exactness rule, whole steps: a sequence's logits are the same whether it is decoded alone, with 2
    others, or in a batch of 12 (more than one pass of 8 tokens), and on 1 thread or 3."""
    w = _wide_model(kind[:4]) if kind.endswith("wide") else tiny_model(kind)
    engine = Engine(w, kernels=native)
    prompts = [rng.integers(3, w.args.vocab_size, 4).tolist() for _ in range(12)]

    def decode(batch: list[int], threads: int) -> list[np.ndarray]:
        native.configure_threads(threads)
        cache = engine.new_cache(len(batch))
        out = []
        for pos in range(4):
            logits = engine.forward([prompts[i][pos] for i in batch], [pos] * len(batch), cache,
                                    slots=list(range(len(batch))))
            out.append(logits)
        return out

    try:
        alone = decode([0], 1)
        for batch, threads in (([0, 5, 7], 2), (list(range(12)), 3), (list(range(12)), 1)):
            together = decode(batch, threads)
            for a, b in zip(alone, together, strict=True):
                np.testing.assert_array_equal(b[0], a[0])
    finally:
        native.configure_threads()


@pytest.mark.parametrize("kind", ["fp32", "q8_0"])
def test_prompt_products_do_not_depend_on_the_thread_count(native, kind):
    """Prompts go through sgemm in blocks of rows: stacked matrices whose row counts are not multiples of the
    block (w1/w3 of 100 rows here) must be cut the same way on 1 thread and on several, or a row's sum rounds
    differently from run to run."""
    w = random_weights(tiny_args(dim=64, hidden_dim=100, n_heads=4, n_kv_heads=2, vocab_size=320), scale=0.2)
    w = w.quantize() if kind == "q8_0" else w
    x = rng.standard_normal((60, w.args.dim)).astype(np.float32)
    mats = [w.w1[0], w.w3[0]]
    engine = Engine(w, kernels=native)
    prompt = rng.integers(3, w.args.vocab_size, 60).tolist()
    results = []
    try:
        for threads in (1, 2, 3):
            native.configure_threads(threads)
            products = native.matmul_many(x, mats)
            logits = engine.forward(prompt, range(len(prompt)), engine.new_cache(1))
            results.append((products, logits))
    finally:
        native.configure_threads()
    for products, logits in results[1:]:
        for a, b in zip(results[0][0], products, strict=True):
            np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(logits, results[0][1])


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_engine_matches_plain(native, kind):
    """Whole forward passes against the plain path. Not bit for bit: RMSNorm, attention and SwiGLU round
    differently in C and NumPy, and now and then an activation then lands on the other side of a quantization
    step in a later layer, which moves later rows' logits (measured over seeds and models: up to 2% of the
    largest logit, 1% on average); a wrong product would move them by their own size. Greedy decoding agrees up
    to the first near-tie."""
    w = tiny_model(kind)
    fast, plain = Engine(w, kernels=native), Engine(w, plain=True)
    tokens = np.random.default_rng(5).integers(0, w.args.vocab_size, 60).tolist()
    for n in (60, 20, 3):  # 60 rows: the prompt's dequantize + sgemm path; 20 and 3: the int8 kernels
        a = fast.forward(tokens[:n], range(n), fast.new_cache())
        b = plain.forward(tokens[:n], range(n), plain.new_cache())
        np.testing.assert_allclose(a, b, atol=5e-2 * np.abs(b).max(), rtol=0)
        assert np.abs(a - b).mean() < 2e-2 * np.abs(b).mean()
    prompt = [1, 7, 9]
    streams = [list(generate(e, prompt, 40, Sampler(0.0))) for e in (plain, fast)]

    def logits_at(i: int) -> np.ndarray:
        seq = prompt + streams[0][:i]
        return plain.forward(seq, range(len(seq)), plain.new_cache(), logits="last")[0]

    assert_greedy_agree(streams[0], streams[1], logits_at, max_margin=0.1, min_same=10)


@pytest.mark.parametrize("kind", ["fp32", "q8_0", "q4_0"])
def test_native_builds_agree_within_tolerance(kind):
    """The native build against the forced AVX2 one: different arithmetic (AVX-512 sums in other orders, and
    for another -march the compiler vectorizes RMSNorm's reduction differently), so logits agree closely, not
    bit for bit. With fp32 weights only the order of the sums differs: within 1e-4 of the largest logit. With
    quantized weights each product's input is rounded to int8 first, and now and then a last-bit difference
    lands one activation on the other side of a rounding step, which moves that row's logits (measured over
    200 prompts on the Q4_0 model: up to 0.85% of the largest logit); a wrong product would move them by their
    own size. Greedy decoding agrees up to the first near-tie."""
    builds = [kernels_native.load(a) for a in ("native", "avx2")]
    if None in builds or not cpu_has("avx2"):
        pytest.skip("both builds are needed")
    w = tiny_model(kind)
    engines = [Engine(w, kernels=k) for k in builds]
    tolerance = 1e-4 if kind == "fp32" else 2e-2
    prompts = np.random.default_rng(3).integers(0, w.args.vocab_size, (4, 8)).tolist()
    prompts.append([128, 289, 225, 190, 223, 313, 63, 49])  # its last row crosses a Q4_0 step on a Zen 3
    for tokens in prompts:
        a, b = (e.forward(tokens, range(8), e.new_cache()) for e in engines)
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * np.abs(b).max())
    prompt = [1, 7, 9]
    streams = [list(generate(e, prompt, 40, Sampler(0.0))) for e in engines]

    def logits_at(i: int) -> np.ndarray:
        seq = prompt + streams[0][:i]
        return engines[0].forward(seq, range(len(seq)), engines[0].new_cache(), logits="last")[0]

    assert_greedy_agree(streams[0], streams[1], logits_at, max_margin=0.1, min_same=10)


def test_many_threads_and_concurrent_callers(native):
    """More pool threads than cores, and products called from several Python threads at once (one runs on the
    pool, the others inline): every result is the one-thread result, bit for bit."""
    w = quantize_q4_0(rng.standard_normal((4096, 256)).astype(np.float32))
    xs = [rng.standard_normal((2, 256)).astype(np.float32) for _ in range(6)]
    native.configure_threads(1)
    want = [native.matmul(x, [w])[0] for x in xs]
    try:
        native.configure_threads(7)
        got: list = [None] * len(xs)

        def work(i: int) -> None:
            for _ in range(20):
                got[i] = native.matmul(xs[i], [w])[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g, e in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, e)
    finally:
        native.configure_threads()


def test_the_bandwidth_probe_reads_every_byte_once_as_any_number_of_streams(native):
    """bench's memory probe reads each 64 KiB as 1 to 16 interleaved streams (fewer pages at the end, and on one
    thread the whole buffer in one job): each way, on one thread and on several, its checksum is the sum of the
    buffer's 64-bit words, so no byte is skipped or read twice; other stream counts are refused."""
    buf = rng.integers(0, 256, size=37 * 4096, dtype=np.uint8)  # 2 chunks of 16 pages and 5 pages
    want = int(buf.view(np.uint64).sum(dtype=np.uint64))
    try:
        for threads in (1, 2, 3):
            native.configure_threads(threads)
            for streams in (1, 2, 4, 8, 16):
                assert native.read_memory(buf, streams) == want, (threads, streams)
    finally:
        native.configure_threads()
    for streams in (0, 3, 32, 1.0, True):
        with pytest.raises(ValueError, match="1, 2, 4, 8 or 16 streams"):
            native.read_memory(buf, streams)
    with pytest.raises(ValueError, match="whole 4 KiB pages"):
        native.read_memory(buf[:5000])


def run_with_default_threads(script: str, skip_why: str) -> str:
    """stdout of `script` run in a fresh process with the pool's default threads (no OMP_NUM_THREADS or
    BABYLLAMA_SPIN_US); skipped with `skip_why` where there is one CPU."""
    native_build("native")
    if usable_cpus() < 2:
        pytest.skip(f"one CPU: {skip_why}")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "BABYLLAMA_SPIN_US")}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          check=True).stdout


FIRST_PROMPT = """
import numpy as np
from babyllama import kernels_native
k = kernels_native.load()
w, x = np.ones((512, 256), np.float32), np.ones((64, 256), np.float32)
before = k.lib.pool_split_jobs()
k.matmul_many(x, [w])  # a prompt's sgemm
k.matmul(x[:4], [w])  # a decode-sized product, one the pool measures
print(k.threads(), k.lib.pool_split_jobs() - before)
"""


def test_a_first_prompt_runs_on_every_thread():
    """In a fresh process nothing has been measured yet: a prompt's sgemm (not one of the products the pool
    measures) and the first products run on every thread, not on the caller's alone, where they took twice as
    long."""
    out = run_with_default_threads(FIRST_PROMPT, "there is no second thread to split a prompt onto")
    threads, split = map(int, out.split())
    assert threads >= 2 and split == 2


STEPS_WITH_GAPS = """
import glob
import time
import numpy as np
from babyllama import kernels_native
k = kernels_native.load()
w, x = np.ones((2048, 256), np.float32), np.ones((1, 256), np.float32)
k.matmul(x, [w])  # starts the threads


def preemptions():  # the times the OS took a CPU from this process's threads (Linux; 0 elsewhere)
    total = 0
    for status in glob.glob("/proc/self/task/*/status"):
        with open(status) as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches"))
    return total


def sleeps(threads, explicit, spin_us, gap):
    k.lib.pool_configure(threads, explicit, spin_us)
    before = k.lib.pool_sleeps(), k.lib.pool_split_jobs()
    for _ in range(20):
        k.matmul(x, [w])
        end = time.perf_counter() + gap
        while time.perf_counter() < end:  # the Python between two decode steps
            pass
    assert k.lib.pool_split_jobs() - before[1] == 20  # every product ran on the threads
    return k.lib.pool_sleeps() - before[0]


# sleeps in gaps shorter than the spin, less those a preemption explains (a spinning thread descheduled, or
# the gap stretched, past its spin sleeps once): the fewest over three tries
def unexplained_sleeps(threads, explicit, spin_us, gap):
    def one():
        before = preemptions()
        n = sleeps(threads, explicit, spin_us, gap)
        return max(0, n - (preemptions() - before))
    return min(one() for _ in range(3))


# first the default: a process's first phase of the adaptation uses every thread for these products
spins = [k.lib.pool_spin_us()]
adaptive = unexplained_sleeps(2, 0, -1, 200e-6)
explicit = sleeps(2, 1, -1, 1e-3)
spins.append(k.lib.pool_spin_us())
set_short = sleeps(2, 0, 50, 1e-3)
spins.append(k.lib.pool_spin_us())
set_long = unexplained_sleeps(2, 1, 1000, 200e-6)
spins.append(k.lib.pool_spin_us())
print(*spins, adaptive, explicit, set_short, set_long)
"""


def test_threads_stay_awake_between_steps_where_every_thread_is_used():
    """Between two decode steps Python runs for 50-200 us. Where every thread is used (by the adaptation, or an
    explicit thread count), idle threads spin through such a gap instead of going to sleep and waking late for the
    next step's first products; but not through gaps longer than their spin. BABYLLAMA_SPIN_US (pool_configure's
    spin) sets the spin in either case."""
    out = run_with_default_threads(STEPS_WITH_GAPS, "no second thread")
    *spins, adaptive, explicit, set_short, set_long = map(int, out.split())
    assert spins == [500, 500, 50, 1000]  # default (every thread), explicit threads, BABYLLAMA_SPIN_US, both
    # gaps of 1 ms: a sleep each after a 500 or 50 us spin, but for wake-ups that come too late to see a job or
    # a gap at all (12-21 of 20 measured on a Zen 3 VM with 50 us)
    assert explicit >= 8 and set_short >= 8
    # gaps of 200 us, within the spin: no sleeps but those that preemptions explain (a busy machine, e.g. a
    # compiler on both cores, took 7 of 20 in the fewest of three tries)
    assert adaptive <= 2 and set_long <= 2


# a fresh process with a pool of two explicit threads: `worker` is its worker thread's id, started and asleep
NEW_WORKER = """
import os, time
import numpy as np
from babyllama import kernels_native


def wait_until_asleep(tid):  # a worker sleeps once it has started and found no job
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with open(f"/proc/self/task/{tid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "S":
                return
        time.sleep(0.001)
    raise SystemExit("the worker never slept")


k = kernels_native.load()
k.lib.pool_configure(2, 1, -1)  # two explicit threads: every product splits
w, x = np.ones((2048, 256), np.float32), np.ones((1, 256), np.float32)
before = set(os.listdir("/proc/self/task"))
k.matmul(x, [w])  # starts the worker
(worker,) = {int(t) for t in set(os.listdir("/proc/self/task")) - before}
wait_until_asleep(worker)  # past its start, where it notes the CPUs it may use
"""

# products given from `cpu` `times` times, a pause after each in which the worker gets the CPU
PRODUCTS_FROM_ONE_CPU = """
def products_from(cpu, times=50):
    os.sched_setaffinity(0, {cpu})  # this thread, the caller
    for _ in range(times):
        k.matmul(x, [w])
        time.sleep(0.001)
"""

WORKER_ON_THE_CALLERS_CPU = NEW_WORKER + PRODUCTS_FROM_ONE_CPU + """
import threading
cpu = min(os.sched_getaffinity(0))
os.sched_setaffinity(worker, {cpu})  # where the OS may put a woken worker
caller = threading.Thread(target=products_from, args=(cpu,))  # the main thread keeps the process's CPUs
caller.start()
caller.join()
print(cpu, *sorted(os.sched_getaffinity(worker)))
"""

WORKER_IN_A_NARROWED_PROCESS = NEW_WORKER + PRODUCTS_FROM_ONE_CPU + """
cpu = min(os.sched_getaffinity(0))
for thread in os.listdir("/proc/self/task"):  # the whole process on one CPU, as `taskset -a -p` puts it
    os.sched_setaffinity(int(thread), {cpu})
products_from(cpu)
print(cpu, *sorted(os.sched_getaffinity(worker)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is set on Linux only")
def test_a_worker_leaves_the_callers_cpu():
    """A worker that finds itself on the CPU of the thread that gave it the job moves to the process's other CPUs:
    there the two would take turns on one core while another runs a co-runner. The test puts the worker on the
    caller's CPU; after some products it may run anywhere but there."""
    out = run_with_default_threads(WORKER_ON_THE_CALLERS_CPU, "no other CPU to move a worker to")
    cpu, *worker_cpus = map(int, out.split())
    assert worker_cpus and cpu not in worker_cpus


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU affinity is set on Linux only")
def test_a_worker_stays_within_the_cpus_the_process_is_narrowed_to():
    """A worker leaves the caller's CPU only for CPUs the process still has: put on one CPU after the worker started
    (every thread, as `taskset -a -p` does), the process keeps its worker there, beside the caller."""
    out = run_with_default_threads(WORKER_IN_A_NARROWED_PROCESS, "no other CPU the worker could wrongly go to")
    cpu, *worker_cpus = map(int, out.split())
    assert worker_cpus == [cpu]


WORKER_BESIDE_A_CO_RUNNER = NEW_WORKER + """
import subprocess, sys
mine, theirs = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, {mine})
os.sched_setaffinity(worker, {theirs})
spin = "import os\\nos.sched_setaffinity(0, {%d})\\nwhile True: pass" % theirs
co_runner = subprocess.Popen([sys.executable, "-c", spin])
try:
    time.sleep(0.2)
    idle = k.lib.pool_shared_looks()
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        burst = time.perf_counter() + 0.01
        while time.perf_counter() < burst:  # products back to back: the worker stays runnable beside the co-runner
            k.matmul(x, [w])
        time.sleep(0.001)  # a gap past its spin: it looks at its preemptions and sleeps
finally:
    co_runner.kill()
print(idle, k.lib.pool_shared_looks())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preemption count is read on Linux only")
def test_a_worker_beside_a_co_runner_finds_its_cpu_shared():
    """A worker that the OS keeps preempting for milliseconds (a co-runner on its CPU) takes its CPU for shared, and
    then spins short (spin_limit): here a spinning process shares the worker's CPU for a second of products."""
    out = run_with_default_threads(WORKER_BESIDE_A_CO_RUNNER, "no second CPU to give the worker")
    idle, shared = map(int, out.split())
    assert shared > idle


ADAPTATION = """
import ctypes, json, sys
from babyllama import kernels_native
lib = kernels_native.load().lib
lib.adapt_test_record.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
state = (ctypes.c_int64 * 6)()

def now():
    lib.adapt_test_state(state)
    return {"phase": state[0], "choice": state[1], "streak": state[2], "opening": state[3], "multi": state[4],
            "multi_streak": state[5]}

def job(rate_all, rate_one=10.0, ns=100_000):
    # one decode step's worth of products in one job, 100 us each, bytes per ns by how the state runs it
    multi = now()["multi"]
    lib.adapt_test_record(multi, 1, int(ns * (rate_all if multi else rate_one)), ns, 1)

def until_phase_changes(rate_all, limit=100_000):
    phase, n = now()["phase"], 0
    while now()["phase"] == phase and n < limit:
        job(rate_all)
        n += 1
    return n

def cycle(probe_rate, exploit_rate):
    # the two measuring phases (every thread at probe_rate), then the running phase: its choice at the start and
    # after 20 ms of jobs, and its length in jobs
    until_phase_changes(probe_rate)
    until_phase_changes(probe_rate)
    chosen = now()["choice"]
    for _ in range(200):
        job(exploit_rate)
    later = now()["choice"]
    return chosen, later, 200 + until_phase_changes(exploit_rate), now()["streak"], now()["multi_streak"]

until_phase_changes(13.0)  # the opening phase, on every thread
print(json.dumps({
    # every thread probes faster and runs as fast: kept (an idle machine)
    "kept": cycle(13.0, 13.0),
    # every thread probes faster, then runs at 0.7x one thread: the guard goes back to the caller's thread
    "guarded": cycle(13.0, 7.0),
    # every thread probes slower three times and more: each phase on one thread twice as long, up to 8x
    "slower": [cycle(7.0, 7.0) for _ in range(5)],
    # and faster again, by a clear margin five times: twice as long each time, up to 8x
    "faster": [cycle(13.0, 13.0) for _ in range(5)],
    # the guard fires in a backed-off phase: it ends as an unbacked one would
    "guarded_late": cycle(13.0, 7.0),
    # every thread wins by less than the clear margin: no back-off
    "narrow": [cycle(10.5, 10.5) for _ in range(3)],
}))
"""


def test_the_adaptation_leaves_every_thread_that_runs_slower_than_one_and_backs_off_on_a_busy_machine():
    """The pool's adaptation (kernels.c, adapt_record) driven with made-up job times: a choice of every thread
    that then moves fewer bytes per second than 0.85x the caller's thread alone did is undone within 16 ms of
    jobs (the guard); an idle machine's faster threads keep it; phases that end on one thread back off (2,048
    jobs, then twice as many each time in a row, up to 8x), and a probe won by every thread ends the back-off.
    Phases on every thread after probes won by 1.1x or more back off alike (fewer probes, each a step on one
    thread), until the guard fires or a probe is won narrowly."""
    out = json.loads(run_with_default_threads(ADAPTATION, "the adaptation is not used"))
    assert out["kept"] == [1, 1, 2048, 0, 1]
    # a guarded phase counts as one on the caller's thread, and it is not backed off though the one before was
    assert out["guarded"] == [1, 0, 2048, 1, 0]
    assert [c[:2] for c in out["slower"]] == [[0, 0]] * 5
    assert [c[2:] for c in out["slower"]] == [[4096, 2, 0], [8192, 3, 0], [16384, 4, 0], [16384, 5, 0],
                                              [16384, 6, 0]]
    assert [c[:2] for c in out["faster"]] == [[1, 1]] * 5
    assert [c[2:] for c in out["faster"]] == [[2048, 0, 1], [4096, 0, 2], [8192, 0, 3], [16384, 0, 4],
                                              [16384, 0, 5]]
    assert out["guarded_late"] == [1, 0, 2048, 1, 0]
    assert out["narrow"] == [[1, 1, 2048, 0, 0]] * 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_runs_products_without_the_parents_threads(native):
    w = rng.standard_normal((4096, 256)).astype(np.float32)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    native.configure_threads(2)
    try:
        want = native.matmul(x, [w])[0]
        pid = os.fork()
        if pid == 0:  # the child: its pool has no workers; the caller must take every chunk itself
            ok = np.array_equal(native.matmul(x, [w])[0], want)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        native.configure_threads()


def test_read_memory_reads_every_byte(native):
    buf = np.arange(4096 * 40 // 8, dtype=np.uint64)
    assert native.read_memory(buf) == int(buf.sum()) % 2**64


# ------------------------------------------------------------------------------------------ the build cache


FAKE_LIBRARY = b"\x7fELF" + bytes(4092)


def fake_compiler(monkeypatch, refuses=lambda cmd: False) -> list[list[str]]:
    """The build's compiler runs recorded instead of run (the list returned): each writes FAKE_LIBRARY, or
    fails where `refuses(cmd)`. The real compiler's identity (cached) is asked first, as builds ask it."""
    if kernels_native.compiler() is None:
        pytest.skip("no C compiler")
    calls = []

    def run(cmd):
        calls.append(cmd)
        if not refuses(cmd):
            with open(cmd[cmd.index("-o") + 1], "wb") as f:
                f.write(FAKE_LIBRARY)
        return subprocess.CompletedProcess(cmd, 1 if refuses(cmd) else 0, "", "")

    kernels_native._compiler_identity(kernels_native.compiler())
    monkeypatch.setattr(kernels_native, "_run_compiler", run)
    return calls


def test_a_built_library_has_the_mode_of_a_program(tmp_path, monkeypatch):
    """The library is compiled into a mkstemp file (0600, to which the linker adds x: 0711) and renamed into the
    cache: users sharing a cache (BABYLLAMA_CACHE) could not load one another's build. It gets the mode a program
    gets under the umask."""
    from babyllama.safeio import current_umask

    fake_compiler(monkeypatch)
    lib = kernels_native.build(tmp_path, "native")
    assert lib is not None and (lib.stat().st_mode & 0o777) == 0o777 & ~current_umask()


def test_a_compiler_that_exits_0_without_a_library_is_a_failed_build(tmp_path, monkeypatch, capsys):
    """CC=true: exit status 0 and no library written. The empty temporary file was cached as the library, for
    good (every run then failed to load it, blaming a noexec folder); now it is a failed build, with a marker."""
    if kernels_native.compiler() is None:
        pytest.skip("no C compiler")
    kernels_native._compiler_identity(kernels_native.compiler())
    monkeypatch.setattr(kernels_native, "_run_compiler", lambda cmd: subprocess.CompletedProcess(cmd, 0, "", ""))
    assert kernels_native.build(tmp_path, "native") is None
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))
    markers = list(tmp_path.glob("kernels-*.failed"))
    assert markers and all("exited 0 but wrote no shared library" in m.read_text() for m in markers)
    assert "did not compile" in capsys.readouterr().err


def test_a_temporary_library_a_killed_build_left_is_swept(tmp_path, monkeypatch):
    """A build killed outright (SIGKILL) cannot remove its temporary library: its name holds the pid, and the
    next build removes it once that process is gone (it stayed in the cache for good)."""
    import time

    calls = fake_compiler(monkeypatch)
    lib = kernels_native.build(tmp_path, "native")
    assert lib is not None and calls
    stale = tmp_path / f"{lib.name}.999999999.abcd1234.tmp"  # a pid no process has
    stale.write_bytes(b"\x7fELF")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    lib.unlink()  # the next build compiles again
    assert kernels_native.build(tmp_path, "native") == lib and not stale.exists()


def test_a_build_that_failed_in_an_earlier_run_says_so_and_how_to_retry(tmp_path, monkeypatch, capsys):
    """Failed attempts leave markers so that later runs do not compile again for nothing; those runs still say,
    in one line, that they run without the kernels and how to try again (a failure may have passed: a full
    disk), not silently several times slower."""
    calls = fake_compiler(monkeypatch, refuses=lambda cmd: True)
    assert kernels_native.build(tmp_path, "native") is None and calls
    first = capsys.readouterr().err
    assert "did not compile" in first and "earlier run" not in first
    calls.clear()
    monkeypatch.setattr(kernels_native, "_said", set())  # a later process
    assert kernels_native.build(tmp_path, "native") is None and not calls
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in an earlier run" in err
    assert f"remove {tmp_path / 'kernels-*.failed'} to try again" in err


def test_cc_naming_no_command_is_said_once_with_the_compiler_taken_instead(monkeypatch, capsys):
    """CC naming a missing command (a typo, an uninstalled compiler) is not followed silently by cc: one line
    says which compiler builds the kernels instead, once a process; a CC that exists is taken quietly."""
    import shutil

    monkeypatch.setattr(kernels_native, "_said", set())
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("cc", "gcc") else None)
    monkeypatch.setenv("CC", "gcc-99")
    assert kernels_native.compiler() == kernels_native.compiler() == "cc"
    err = capsys.readouterr().err.strip()
    assert err == "babyllama: CC='gcc-99' names no command on PATH; the C kernels are built with cc instead"
    monkeypatch.setenv("CC", "gcc")
    assert kernels_native.compiler() == "gcc" and capsys.readouterr().err == ""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CC", "tcc")
    assert kernels_native.compiler() is None
    assert "CC='tcc' names no command on PATH; no other C compiler either" in capsys.readouterr().err


def test_cc_of_several_words_is_run_as_a_command_line(tmp_path, monkeypatch, capsys):
    """CC="ccache gcc" or "gcc -m64" (make's way: a launcher, or options) is run as those words, not passed over
    as naming no command; a build with other words is another library than the plain compiler's."""
    calls = fake_compiler(monkeypatch)
    real = kernels_native.compiler()
    plain = kernels_native.build(tmp_path, "native")
    monkeypatch.setattr(kernels_native, "_said", set())
    monkeypatch.setenv("CC", f"env {real}")
    assert kernels_native.compiler() == f"env {real}" and kernels_native.cc_command(f"env {real}") == ["env", real]
    calls.clear()
    assert kernels_native.build(tmp_path, "native") not in (None, plain)
    assert calls and calls[0][:2] == ["env", real] and capsys.readouterr().err == ""


@pytest.mark.parametrize("arch", ["native", "avx2", "x86-64"])
def test_the_kernels_compile_with_clang(tmp_path, arch):
    """GCC builds the kernels here, but clang (macOS's compiler, and many Linux machines') must too: C that GCC
    accepts and clang refuses (an initializer that is no compile-time constant) would leave its users on NumPy,
    or, for the native build, on its plainest fallback flags. Each instruction set's first flag set, as `build`
    tries it first (AVX2's 256-bit rows, and the CPU's own: AVX-512's 512-bit ones where it has them)."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is not installed here (.ci/run installs it)")
    flags = kernels_native.flag_sets(arch)[0] if arch in kernels_native.ARCHES else ["-O3", f"-march={arch}"]
    done = subprocess.run([clang, *flags, "-shared", "-fPIC", str(kernels_native.SOURCE), "-o",
                           str(tmp_path / "kernels.so"), "-lm"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("stderr, code", [
    ("cc: internal compiler error: File size limit exceeded signal terminated program cc1\n", 4),
    ("/usr/bin/ld: final link failed: No space left on device\ncollect2: error: ld returned 1 exit status\n", 1),
    ("cc: fatal error: Killed signal terminated program cc1\n", 1),
    ("", -9),
], ids=["file-size-limit", "full-disk", "out-of-memory", "killed"])
def test_a_compile_the_machine_failed_leaves_no_marker(tmp_path, monkeypatch, capsys, stderr, code):
    """A full disk or memory is no compiler's fault and may pass: such a failure was marked like a broken compiler,
    and every later run went without the kernels (several times slower) until the marker was removed by hand. It
    leaves no marker and tries no other flags; the next run compiles."""
    calls = fake_compiler(monkeypatch)
    real = kernels_native._run_compiler

    def machine_fails(cmd):
        real(cmd)
        return subprocess.CompletedProcess(cmd, code, "", stderr)

    monkeypatch.setattr(kernels_native, "_run_compiler", machine_fails)
    monkeypatch.setattr(kernels_native, "usable_cpus", lambda: 1)  # one attempt per flag set
    assert kernels_native.build(tmp_path, "native") is None and len(calls) == 1
    err = capsys.readouterr().err.strip()
    assert "could not be compiled now" in err and "the next run tries again" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.failed"))
    monkeypatch.setattr(kernels_native, "_run_compiler", real)
    assert kernels_native.build(tmp_path, "native") is not None


def test_a_forced_instruction_set_that_does_not_compile_is_named(tmp_path, monkeypatch, capsys):
    """BABYLLAMA_NATIVE_ARCH takes any -march value: one the compiler refuses (a typo) is named in the line that
    says the kernels are not used, not taken for a broken compiler."""
    fake_compiler(monkeypatch, refuses=lambda cmd: "-march=haswel" in cmd)
    assert kernels_native.build(tmp_path, "haswel") is None
    err = capsys.readouterr().err
    assert "for the instruction set 'haswel' (BABYLLAMA_NATIVE_ARCH)" in err and len(err.splitlines()) == 1
    assert kernels_native.build(tmp_path, "native") is not None
    assert "instruction set" not in capsys.readouterr().err


def test_the_build_cache_is_keyed_on_compiler_flags_and_cpu(tmp_path, monkeypatch):
    """A library built for one CPU (or by another compiler, or with other flags) is never loaded on another:
    each gets its own file."""
    calls = fake_compiler(monkeypatch)
    native = kernels_native.build(tmp_path, "native")
    assert kernels_native.build(tmp_path, "native") == native and len(calls) == 1  # cached
    forced = kernels_native.build(tmp_path, "avx2")
    assert forced != native and "-march=x86-64-v3" in calls[-1]
    monkeypatch.setattr(kernels_native, "cpu_signature", lambda: "flags: sse2")  # another CPU
    other_cpu = kernels_native.build(tmp_path, "native")
    monkeypatch.setattr(kernels_native, "_compiler_identity", lambda cc: "another compiler")
    other_cc = kernels_native.build(tmp_path, "native")
    assert len({native, forced, other_cpu, other_cc}) == 4 and len(calls) == 4


def test_the_build_compiles_on_every_cpu_and_falls_back_to_one_job(tmp_path, monkeypatch):
    """With more than one CPU the library is compiled as GCC's parallel link-time optimization (-flto=N); a
    compiler that refuses it (clang) compiles without it, into the same cached file (the job count is not part
    of the key), and no attempt is marked failed. With one CPU there is no -flto attempt."""
    calls = fake_compiler(monkeypatch, refuses=lambda cmd: any(a.startswith("-flto") for a in cmd))
    monkeypatch.setattr(kernels_native, "usable_cpus", lambda: 2)
    lib = kernels_native.build(tmp_path / "two", "native")
    assert [a for a in calls[0] if a.startswith("-flto")] == ["-flto=2"]
    assert calls[1] == [a for a in calls[0] if a != "-flto=2"] and len(calls) == 2
    assert lib is not None and lib.exists() and not list((tmp_path / "two").glob("*.failed"))

    calls.clear()
    monkeypatch.setattr(kernels_native, "usable_cpus", lambda: 1)
    one = kernels_native.build(tmp_path / "one", "native")
    assert len(calls) == 1 and not any(a.startswith("-flto") for a in calls[0]) and one.name == lib.name


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    """A build records the library's size and SHA-256 beside it; a cached library that no longer matches them
    (truncated, a byte changed) or has no record (a cache older than the record) is compiled again before anything
    loads it, and an intact one is not."""
    calls = fake_compiler(monkeypatch)
    lib = kernels_native.build(tmp_path, "native")
    assert lib is not None and kernels_native.is_intact(lib) and len(calls) == 1
    assert kernels_native.fingerprint_path(lib).read_text().split()[0] == str(len(FAKE_LIBRARY))
    assert kernels_native.build(tmp_path, "native") == lib and len(calls) == 1  # intact: cached

    def damaged(change):
        change()
        assert not kernels_native.is_intact(lib)
        n = len(calls)
        assert kernels_native.build(tmp_path, "native") == lib and len(calls) == n + 1
        assert lib.read_bytes() == FAKE_LIBRARY and kernels_native.is_intact(lib)

    damaged(lambda: os.truncate(lib, 1000))
    damaged(lambda: lib.write_bytes(b"\x7fELF" + b"\x01" + bytes(4091)))
    damaged(lambda: kernels_native.fingerprint_path(lib).unlink())
    damaged(lambda: lib.unlink())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([lib.name, kernels_native.fingerprint_path(lib).name])


def copying_compiler(tmp_path, library) -> dict:
    """The environment of a run whose C compiler is a script that "compiles" by copying `library` (the real
    kernels, built for this CPU) to its output, with its own cache folder."""
    cc = tmp_path / "copycc"
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "copycc 1"; exit 0; }\n'
                  'while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done\n'
                  f'cp {library} "$out"\n')
    cc.chmod(0o755)
    return {"CC": str(cc), "BABYLLAMA_CACHE": str(tmp_path / "cache"), "BABYLLAMA_KERNELS": "native",
            "BABYLLAMA_NATIVE_ARCH": "native"}


def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A cached library cut short (here to half its size) still loads with ctypes, and the first call into its
    missing pages would kill every later run with SIGBUS: it is built again before it is loaded, and the run
    gives the same text."""
    from conftest import run_cli

    native = kernels.native_backend()
    if native is None:
        pytest.skip("the native kernels are not the backend here")
    env = copying_compiler(tmp_path, native.path)
    argv = ("run", "-t", "0", "-n", "24", "-i", "Once upon")
    first = run_cli(*argv, env=env)
    assert first.returncode == 0, first.stderr.decode()
    [lib] = (tmp_path / "cache" / "native").glob("*.so")
    os.truncate(lib, lib.stat().st_size // 2)
    again = run_cli(*argv, env=env)
    assert again.returncode == 0, (again.returncode, again.stderr.decode())
    assert again.stdout == first.stdout and len(first.stdout) > 24
    assert lib.read_bytes() == native.path.read_bytes()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes' states from /proc")
def test_an_interrupted_build_stops_the_compiler_and_leaves_no_library(tmp_path):
    """SIGINT to a process compiling the kernels: the compiler's whole process group is stopped (not only the
    driver, whose jobs would compile on for a minute) and the temporary library is removed."""
    import signal
    import time

    from conftest import ROOT, sigint_default

    pids = tmp_path / "pids"
    cc = tmp_path / "slowcc"  # a driver that leaves the work to a child of its own, as gcc leaves it to cc1
    # ... and leaves a scratch file in $TMPDIR, as GCC's LTO wrapper does when stopped while it links
    cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "slowcc 1"; exit 0; }\n'
                  'touch "${TMPDIR:-/tmp}/cc-left-behind.lto_wrapper_args"\n'
                  f'sleep 120 &\necho $$ $! > {pids}.tmp && mv {pids}.tmp {pids}\nwait\n')
    temp = tmp_path / "tmp"  # the process's temporary folder, where the compiler's scratch files went
    temp.mkdir()
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    script = "import sys; from pathlib import Path; from babyllama import kernels_native; " \
             "kernels_native.build(Path(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", script, str(cache)], stderr=subprocess.PIPE,
                            env={**os.environ, "CC": str(cc), "PYTHONPATH": str(ROOT), "TMPDIR": str(temp)},
                            preexec_fn=sigint_default)
    deadline = time.monotonic() + 60
    while not pids.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert pids.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no compile started"
    driver, job = map(int, pids.read_text().split())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and b"KeyboardInterrupt" in err
    deadline = time.monotonic() + 5  # the signals are delivered, the processes' ends follow
    while (alive(driver) or alive(job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(driver) and not alive(job)
    assert list(cache.glob("*.so")) == [] and list(cache.glob("*.tmp")) == [] and list(cache.glob("*.sha256")) == []
    assert list(temp.iterdir()) == []  # the compile's own $TMPDIR, with what the compiler left in it, is gone


def test_forced_avx2_is_not_loaded_on_a_cpu_without_it(monkeypatch, capsys):
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: {"sse2", "avx"})
    assert kernels_native.load("avx2") is None
    assert "this CPU lacks avx2, bmi1, bmi2, f16c, fma, movbe, which the C kernels' instruction set 'avx2'" in (
        capsys.readouterr().err)


def test_the_native_kernels_asked_for_by_name_load_under_native_0_or_say_why_not(monkeypatch, capsys):
    """BABYLLAMA_NATIVE=0 keeps the C kernels out of the default choice only: named, they load; and named where
    they cannot run, one line says so (they were replaced without a word)."""
    if kernels_native.load() is None:
        pytest.skip("the C kernels do not build here")
    previous = kernels.backend()
    try:
        monkeypatch.setenv("BABYLLAMA_NATIVE", "0")
        assert kernels.use_backend() != "native"  # the default choice leaves them out
        assert kernels.use_backend("native") == "native"
        monkeypatch.setattr(kernels_native, "load", lambda **kw: None)
        capsys.readouterr()
        other = kernels.use_backend("native")
        assert other != "native" and capsys.readouterr().err.startswith(
            "babyllama: the C kernels asked for cannot run here (no C compiler, or the line above says why); "
            "running on ")
    finally:
        kernels._backend = previous


def test_numba_installed_but_unusable_falls_back_to_numpy_in_one_line():
    """numba refuses to import where it has no folder to cache compiled functions in (a read-only install and
    home: a container run as another user) or under its own bad settings (NUMBA_NUM_THREADS=0): the run goes on
    on NumPy with one note (it was a traceback and exit 1)."""
    pytest.importorskip("numba")
    from conftest import run_cli

    r = run_cli("run", "-n", "12", "-t", "0", env={"BABYLLAMA_KERNELS": "numba", "NUMBA_NUM_THREADS": "0"})
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "babyllama: note: the numba kernels cannot load (Number of threads specified must be > 0.)" in err
    assert "Traceback" not in err and r.stdout.startswith(b"Once upon a time")


def test_a_fingerprint_of_other_bytes_means_a_library_to_build_again(tmp_path):
    """A cached library's fingerprint file that is not ASCII (damaged) is no fingerprint: the library is not
    intact (every later run died of a UnicodeDecodeError until the file was removed by hand)."""
    lib = tmp_path / "kernels-x.so"
    lib.write_bytes(b"\x7fELF")
    kernels_native.fingerprint_path(lib).write_bytes(b"\xff\xfe")
    assert not kernels_native.is_intact(lib)
    kernels_native.fingerprint_path(lib).write_text(kernels_native.fingerprint(lib))
    assert kernels_native.is_intact(lib)


def test_a_forced_march_value_whose_instructions_the_cpu_lacks_is_not_built(monkeypatch, capsys):
    """Any -march value may be forced: the extensions the compiler switches on for it are checked against the
    CPU's flags, where a library built with them died of SIGILL at its first call (exit 132, no word)."""
    if kernels_native.compiler() is None:
        pytest.skip("no C compiler here")
    assert "avx512f" in kernels_native._march_flags("skylake-avx512")
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: set(kernels_native.AVX2_FLAGS))
    monkeypatch.setattr(kernels_native, "build", lambda **kw: pytest.fail("built for a CPU that lacks it"))
    assert kernels_native.load("skylake-avx512") is None
    assert "this CPU lacks avx512bw, avx512cd, avx512dq, avx512f, avx512vl, which the C kernels' instruction set " \
           "'skylake-avx512'" in capsys.readouterr().err
    assert kernels_native.missing_instructions("haswell") == []
    # AMD's own extensions too: -march=bdver4 built XOP instructions into the library, and every run on a CPU
    # without them (Zen, Intel) died of SIGILL while the check found nothing missing
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: set(kernels_native.AVX2_FLAGS) | {"sse4a"})
    assert {"xop", "fma4", "tbm"} <= set(kernels_native.missing_instructions("bdver4"))
    assert "sse4a" in kernels_native._march_flags("znver3")


def test_babyllama_native_takes_0_or_1_and_another_value_is_one_line(monkeypatch):
    """BABYLLAMA_NATIVE=0 leaves the C kernels out of the default choice; "false", "off" or "no" were silently
    taken for "on" (only the exact string "0" counted), where an unknown BABYLLAMA_KERNELS is an error."""
    from conftest import one_line_error, run_cli

    from babyllama.errors import BabyLlamaError

    for value, off in (("0", True), (" 0 ", True), ("1", False), ("", False)):
        monkeypatch.setenv("BABYLLAMA_NATIVE", value)
        assert kernels_native.switched_off() is off
    monkeypatch.setenv("BABYLLAMA_NATIVE", "off")
    with pytest.raises(BabyLlamaError, match="BABYLLAMA_NATIVE='off' must be 0"):
        kernels_native.switched_off()
    if kernels_native.compiler() is not None:  # named (BABYLLAMA_KERNELS=native), the variable is not read
        assert kernels_native.load(forced=True) is not None
    one_line_error(run_cli("run", "-n", "8", env={"BABYLLAMA_NATIVE": "false"}),
                   "BABYLLAMA_NATIVE='false' must be 0 (leave the C kernels out of the default choice) or 1")


def test_babyllama_kernels_is_read_in_any_case_and_another_value_is_one_line(monkeypatch):
    """BABYLLAMA_KERNELS=NATIVE (or " NumPy ") picks that backend; a value that names none is one error line
    naming the variable and the choices, not a ValueError's traceback."""
    from conftest import one_line_error, run_cli

    from babyllama.errors import BabyLlamaError

    try:
        monkeypatch.setenv("BABYLLAMA_KERNELS", " NumPy ")
        assert kernels.use_backend() == "numpy" and kernels.backend().name == "numpy"
        monkeypatch.setenv("BABYLLAMA_KERNELS", "bogus")
        with pytest.raises(BabyLlamaError, match="BABYLLAMA_KERNELS='bogus' is not a kernel backend"):
            kernels.use_backend()
    finally:
        monkeypatch.undo()
        kernels.use_backend()
    r = run_cli("run", "-t", "0", "-n", "8", env={"BABYLLAMA_KERNELS": "NATIVE"})
    assert r.returncode == 0 and len(r.stdout) > 8, r.stderr.decode()
    one_line_error(run_cli("run", "-n", "8", env={"BABYLLAMA_KERNELS": "bogus"}),
                   "BABYLLAMA_KERNELS='bogus' is not a kernel backend (choose native, numba, numpy)")


def test_numba_asked_for_without_numba_says_it_runs_on_numpy():
    """BABYLLAMA_KERNELS=numba where numba is not installed falls back to NumPy, as the list goes, with one line
    that says so (it was silent: a user timing "numba" timed NumPy)."""
    code = ("import sys; sys.modules['numba'] = None\n"  # an import of numba fails as where it is not installed
            "from babyllama import kernels; print(kernels.use_backend('numba'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout == "numpy\n"
    assert r.stderr == "babyllama: numba is not installed (pip install 'babyllama[fast]'); running on NumPy\n"


# ------------------------------------------------------------------------------------ the backend protocol


class _Recording:
    """A Kernels that forwards the protocol's methods to another and records the calls; anything else raises,
    so the engine cannot reach around the protocol."""

    PROTOCOL = ("name", "threads", "matmul_many", "dequantize", "embed", "rmsnorm", "swiglu", "attention", "step_plan",
                "forward_step")

    def __init__(self, inner: Kernels):
        self._inner, self.calls = inner, []

    def __getattr__(self, attr):
        if attr not in self.PROTOCOL:
            raise AttributeError(f"engine.py used {attr!r}, which is not in the Kernels protocol")
        self.calls.append(attr)
        return getattr(self._inner, attr)


def test_first_above_is_the_cumsum_search(native):
    """Sampling's CDF search in C: the index np.cumsum + searchsorted give, ties and a coin past the end
    included (the same fp32 additions in the same order)."""
    r = np.random.default_rng(5)
    for trial in range(300):
        probs = Sampler(1.0, 1.0, 1).probs(r.standard_normal(int(r.integers(1, 40000))) * r.uniform(0.1, 10))
        cdf = np.cumsum(probs, dtype=np.float32)
        coins = [r.random(), cdf[r.integers(0, len(cdf))], cdf[-1], 0.0, 1.0]
        for coin in np.array(coins, dtype=np.float32):
            want = min(int(np.searchsorted(cdf, coin, side="right")), len(probs) - 1)
            assert native.first_above(probs, float(coin)) == want, (trial, coin)


def test_top_p_sampling_in_c_is_the_numpy_one(native):
    """run.c's top-p sampling in C picks the token sampler.nucleus and its search pick in NumPy: flat and peaked
    distributions, ties (a stable order: the lower id first), every kind of coin, nuclei of one token to
    thousands."""
    r = np.random.default_rng(6)
    for trial in range(400):
        n = int(r.choice([2, 3, 7, 512, 4096, 32000]))
        logits = r.standard_normal(n) * r.choice([0.01, 1.0, 5.0, 30.0])
        if trial % 3 == 0:  # ties: some values repeated
            logits = np.round(logits, 1)
        probs = Sampler(1.0, 1.0, 1).probs(logits)
        for topp in (0.01, 0.5, 0.9, 0.999):
            cand, cum = sampler.nucleus(probs, topp)
            for coin in np.array([0.0, r.random(), 0.999999, 1.0], dtype=np.float32):
                rr = np.float32(coin * cum[-1])
                want = int(cand[min(int(np.searchsorted(cum, rr, side="right")), len(cand) - 1)])
                got = native.sample_topp(probs, np.float32(topp), sampler._cutoff(n, topp), coin)
                assert got == want, (trial, n, topp, coin)


def _sampling_cases(r: np.random.Generator, trials: int):
    """(logits, temperature, topp) of every kind: flat and peaked, -inf entries, 2 to 32000 tokens, top-p on
    and off."""
    for trial in range(trials):
        n = int(r.choice([2, 7, 512, 4096, 32000]))
        logits = (r.standard_normal(n) * r.choice([0.01, 1.0, 5.0, 30.0])).astype(np.float32)
        if trial % 4 == 0:
            logits[r.integers(0, n, n // 3)] = -np.inf
            logits[0] = 0.0  # one finite at least
        yield logits, float(r.choice([1.0, 0.8, 1.7])), float(r.choice([0.0, 0.5, 0.9, 0.999, 1.0]))


def test_softmax_in_c_is_numpys_within_rounding(native):
    """The C sampler's probabilities: NumPy's softmax of logits / temperature to 1e-6 of each (another
    exponential, another order of the sum), the ones below e^-87 of the largest 0, -inf ones exactly 0."""
    r = np.random.default_rng(8)
    for logits, temperature, _ in _sampling_cases(r, 120):
        got, want = native.softmax_logits(logits, temperature), Sampler(temperature, 1.0, 1).probs(logits)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-37)
        assert np.all(got[np.isneginf(logits)] == 0)


def test_sampling_in_c_is_run_cs_search_on_its_probabilities(native, monkeypatch):
    """sample_logits picks exactly the token NumPy's search (top-p or the plain CDF) picks on the C softmax's
    probabilities, for every kind of distribution and coin."""
    monkeypatch.setattr(sampler, "_cdf_search", None)  # NumPy's own search: cumsum, sort
    monkeypatch.setattr(sampler, "_topp_sampler", None)
    r = np.random.default_rng(9)
    for logits, temperature, topp in _sampling_cases(r, 300):
        probs = native.softmax_logits(logits, temperature)
        for coin in np.array([0.0, r.random(), r.random(), 0.999999], dtype=np.float32):
            if 0.0 < topp < 1.0:
                want = sampler.sample_topp(probs, topp, coin)
            else:
                want = sampler.sample_mult(probs, coin)
            assert native.sample_logits(logits, temperature, topp, coin) == want, (len(logits), temperature, topp)


def _distance_to_a_boundary(probs: np.ndarray, topp: float, coin: np.float32) -> float:
    """How far NumPy's draw from probs lies from changing its answer: the scaled coin from the nearest edge of
    the running mass, and with top-p, the mass or the largest probability from topp."""
    if not 0.0 < topp < 1.0:
        return float(np.min(np.abs(np.cumsum(probs, dtype=np.float64) - coin)))
    _, cum = sampler.nucleus(probs, topp)
    return min(abs(float(probs.max()) - topp), float(np.min(np.abs(cum - topp))),
               float(np.min(np.abs(cum - coin * cum[-1]))))


def test_the_c_sampler_draws_numpys_tokens_but_at_near_ties(native, monkeypatch):
    """Sampler.sample through C (the default with the native kernels) and through NumPy, on one seed: the same
    token on every draw but where the coin lies within the two softmaxes' rounding (1e-6) of a boundary between
    two tokens, or the two tokens' probabilities are that close (their order in the nucleus is a tie). On
    distributions whose probabilities are not all within rounding of each other: over a near-flat one (logits
    within 0.01) rounding reorders thousands of candidates, which the two tests above cover."""
    assert sampler._logits_sampler is not None, "the native kernels lend Sampler their sampler"
    r = np.random.default_rng(10)
    differ = 0
    cases = ((x, t, p) for x, t, p in _sampling_cases(r, 600) if np.ptp(x[np.isfinite(x)]) > 1.0)
    for i, (logits, temperature, topp) in enumerate(cases):
        fast, slow = Sampler(temperature, topp, 100 + i), Sampler(temperature, topp, 100 + i)
        with monkeypatch.context() as m:
            m.setattr(sampler, "_logits_sampler", None)
            want = [slow.sample(logits) for _ in range(5)]
        got = [fast.sample(logits) for _ in range(5)]
        coins = Rng(100 + i)  # the coins both drew, in order
        for g, w in zip(got, want):
            coin = coins.f32()
            if g != w:
                differ += 1
                probs = slow.probs(logits)
                tie = abs(float(probs[g]) - float(probs[w])) <= 1e-6 * float(max(probs[g], probs[w]))
                assert tie or _distance_to_a_boundary(probs, topp, coin) < 1e-6, (i, g, w)
    assert differ <= 4


def test_every_backend_implements_the_protocol():
    backends = [NumpyKernels(), PlainKernels()]
    numba = pytest.importorskip("babyllama.kernels_numba")
    backends.append(numba.NumbaKernels())
    native = kernels_native.load()
    if native is not None:
        backends.append(native)
    for b in backends:
        assert isinstance(b, Kernels), b
    assert isinstance(kernels.backend(), Kernels)


@pytest.mark.parametrize("inner", ["numpy", "native"])
def test_the_engine_calls_kernels_only_through_the_protocol(inner):
    k = NumpyKernels() if inner == "numpy" else kernels_native.load()
    if k is None:
        pytest.skip("no C compiler")
    w = tiny_model("q4_0")
    rec = _Recording(k)
    e = Engine(w, kernels=rec)
    want = Engine(w, kernels=k)
    for n in (1, 20):  # a decode step (one call where the backend has it) and a prompt (operation by operation)
        tokens = list(range(3, 3 + n))
        np.testing.assert_array_equal(e.forward(tokens, range(n), e.new_cache()),
                                      want.forward(tokens, range(n), want.new_cache()))
    assert "matmul_many" in rec.calls and "attention" in rec.calls
    assert ("forward_step" in rec.calls) == (inner == "native")


@pytest.mark.parametrize("gs", [32, 64])
def test_prompt_activations_are_rounded_as_the_reference_rounds_them(native, gs):
    """A prompt's sgemm multiplies quantized weights by x quantized and dequantized per group (runq.c's
    rounding), in C: bit for bit NumPy's quantize_rows and dequantize_rows, ties (halves) and zero groups too."""
    x = rng.standard_normal((9, 256)).astype(np.float32)
    x[0, :gs] = 0.0
    x[1, :gs] = 127.0  # scale 1: every value below is exactly a half, rounded to even
    x[1, 1:gs] = np.arange(1, gs) % 7 - 3.5
    q, scales = quantize_rows(x, gs)
    want = dequantize_rows(q.reshape(x.shape), scales, gs)
    got = native.round_activations(x, gs)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))  # a value rounded to 0 is +0, as in int8


def _prompt_route_is(native, ws, on_int8: bool) -> np.ndarray:
    """Check a prompt's product with ws[0] (ws: the matrices of one call): on the int8 decode kernel each of its
    rows is bit for bit what decoding that token alone gives; on sgemm within float rounding of it, and not equal.
    Returns the prompt."""
    q = ws[0]
    x = rng.standard_normal((kernels_native.QUANT_NATIVE_GEMM_MIN_ROWS + 5, q.shape[1])).astype(np.float32)
    got = native.matmul_many(x, ws)[0]
    by_token = np.concatenate([native.matmul(x[i:i + 1], [q])[0] for i in range(len(x))])
    if on_int8:
        np.testing.assert_array_equal(got, by_token)
    else:
        np.testing.assert_allclose(got, by_token, rtol=1e-5, atol=1e-5 * np.abs(by_token).max())
        assert not np.array_equal(got, by_token)
    return x


@pytest.mark.parametrize("sgemm", [True, False])  # False: no sgemm was found, NumPy's products instead
def test_q4_prompts_take_the_int8_kernel_where_it_is_faster(native, sgemm, monkeypatch):
    """Where this build's int8 kernel outruns dequantize + sgemm on Q4_0 prompts (AVX-512 VNNI builds; AVX2 ones
    for rows of 256 values or more) a Q4_0 prompt's products run the decode kernel: each row of the prompt bit for
    bit what decoding its token alone gives; elsewhere sgemm, within float rounding of it (and not the same
    sums). A Q8_0 matrix beside it still goes to sgemm."""
    monkeypatch.setattr(native, "_gemm", native._gemm and sgemm)
    min_cols = kernels_native.INT8_Q4_PROMPT_MIN_COLS.get(native.isa())
    for cols in (128, 256):
        q = quantize_q4_0(rng.standard_normal((96, cols)).astype(np.float32))
        q8 = quantize_q8_0(rng.standard_normal((40, cols)).astype(np.float32))
        x = _prompt_route_is(native, [q, q8], min_cols is not None and cols >= min_cols)
        beside = native.matmul_many(x, [q, q8])[1]
        np.testing.assert_array_equal(beside, native.matmul_many(x, [q8])[0])
        want = quantized_gemm(x, [q8], lambda m: m.dequantize())[0]
        np.testing.assert_allclose(beside, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("sgemm", [True, False])
def test_q8_prompts_in_runq_layout_take_the_int8_kernel_where_it_is_faster(native, sgemm, monkeypatch):
    """runq.c-layout Q8_0 goes to the int8 kernel on AVX-512 VNNI builds (each row of the prompt bit for bit what
    decoding its token alone gives); every other build stays on sgemm, within float rounding of it."""
    monkeypatch.setattr(native, "_gemm", native._gemm and sgemm)
    min_cols = kernels_native.INT8_Q8_PROMPT_MIN_COLS.get(native.isa(), {})
    for gs, cols in ((32, 256), (32, 512), (64, 256)):
        q = quantize_q80(rng.standard_normal((80, cols)).astype(np.float32), gs)
        _prompt_route_is(native, [q], gs in min_cols and cols >= min_cols[gs])


@pytest.mark.parametrize("sgemm", [True, False])
def test_regrouped_q8_0_prompts_take_the_int8_kernel_where_it_is_faster(native, sgemm, monkeypatch):
    """llama.cpp's Q8_0 blocks, regrouped, go to the int8 kernel on AVX-512 VNNI builds and on AVX2 builds from
    rows of 512 (each row of the prompt bit for bit what decoding its token alone gives); shorter rows there,
    blocks not regrouped and every other build stay on sgemm, within float rounding of it."""
    monkeypatch.setattr(native, "_gemm", native._gemm and sgemm)
    min_cols = kernels_native.INT8_Q8R_PROMPT_MIN_COLS.get(native.isa())
    for cols, regroup in ((128, True), (288, True), (768, True), (768, False)):
        q = quantize_q8_0(rng.standard_normal((80, cols)).astype(np.float32))
        q = _regrouped(native, q) if regroup else q
        _prompt_route_is(native, [q], regroup and min_cols is not None and cols >= min_cols)


@pytest.mark.parametrize("sgemm", [True, False])
def test_packed_q8_prompts_take_the_regrouped_blocks_route(native, sgemm, monkeypatch):
    """runq.c's Q8 packed for the kernels (groups of 32 or 64) runs the regrouped blocks' kernels and takes
    their route table, INT8_Q8R_PROMPT_MIN_COLS: the int8 kernel on AVX-512 VNNI builds and on AVX2 builds from
    rows of 512 (each row of the prompt bit for bit what decoding its token alone gives), sgemm elsewhere."""
    monkeypatch.setattr(native, "_gemm", native._gemm and sgemm)
    min_cols = kernels_native.INT8_Q8R_PROMPT_MIN_COLS.get(native.isa())
    for gs, cols in ((32, 288), (64, 256), (64, 768)):
        q = _packed(native, quantize_q80(rng.standard_normal((80, cols)).astype(np.float32), gs))
        _prompt_route_is(native, [q], min_cols is not None and cols >= min_cols)


def test_a_product_of_several_tokens_splits_a_small_matrix_across_threads(native):
    """A 128 x 128 Q4_0 matrix is 9 KB: one chunk of a one-token product (~32 KB a chunk), so it runs on one
    thread. A prompt's product (8 passes of 8 tokens over those rows and more) and a batched decode step's (2-8
    tokens) cut its rows into chunks for every thread; a prompt's activations are also quantized and laid out
    on every thread first (a second split job)."""
    if usable_cpus() < 2:
        pytest.skip("one CPU: nothing to split across")
    w = quantize_q4_0(rng.standard_normal((128, 128)).astype(np.float32))
    x = rng.standard_normal((64, 128)).astype(np.float32)
    native.configure_threads(2)
    try:
        splits = []
        for tokens in (64, 4, 2, 1):
            before = native.lib.pool_split_jobs()
            native.matmul(x[:tokens], [w])
            splits.append(native.lib.pool_split_jobs() - before)
        assert splits == [2, 1, 1, 0]
    finally:
        native.configure_threads()


PROMPT_PRODUCTS = """
import numpy as np
from babyllama import kernels_native, quant
k = kernels_native.load()
w, x = quant.quantize_q4_0(np.ones((512, 256), np.float32)), np.ones((64, 256), np.float32)
before = k.lib.pool_split_jobs()
for _ in range(300):
    k.matmul(x, [w])  # a 64-token prompt's products on the int8 kernel, back to back
print(k.threads(), k.lib.pool_split_jobs() - before)
"""


def test_prompt_sized_products_do_not_start_a_measurement():
    """The adaptation measures decode-sized products only (and every product of a decode step): a prompt's
    products on the int8 kernel follow its last choice, as a prompt's sgemm does, instead of starting a
    measurement on their own token count whose one-thread phase then holds whole prompts (here, after the
    process's opening phase of 192 products, the rest would have run on the caller's thread alone). Each product
    is two split jobs: its activations prepared on every thread, then its rows."""
    out = run_with_default_threads(PROMPT_PRODUCTS, "there is no second thread to split a product onto")
    threads, split = map(int, out.split())
    assert threads >= 2 and split == 600


@pytest.mark.parametrize("fused", ["plain", "norm", "gate"])
def test_a_prompts_preparation_split_across_threads_gives_the_same_numbers(native, fused):
    """A prompt's input (its fused RMSNorm or SwiGLU rows), quantization and activation layouts are made in parts
    of 16 tokens on every thread: the products then equal those of one thread and those of each token alone, bit
    for bit, for matrices of two group sizes in one call (Q4_0 and Q8_0 blocks regrouped, runq.c's groups of 64)
    and a token count that leaves a part short."""
    if usable_cpus() < 2:
        pytest.skip("one CPU: nothing to split across")
    n, tokens = 768, 70
    local = np.random.default_rng(7)
    q4, q8 = (quantize(local.standard_normal((rows, n)).astype(np.float32))
              for quantize, rows in ((quantize_q4_0, 48), (quantize_q8_0, 40)))
    groups = quantize_q80(local.standard_normal((32, n)).astype(np.float32), 64)
    ws = [q4, native.regroup(q4), q8, native.regroup(q8), groups,
          dataclasses.replace(groups, packed=native.pack_q8(groups))]
    x = local.standard_normal((tokens, n)).astype(np.float32)
    kwargs = {"plain": {}, "norm": {"norm": (local.standard_normal(n).astype(np.float32), 1e-5)},
              "gate": {"gate": local.standard_normal((tokens, n)).astype(np.float32)}}[fused]
    try:
        results = {}
        for threads in (1, 2):
            native.configure_threads(threads)
            results[threads] = native.matmul(x, ws, **kwargs)
        alone = [native.matmul(x[t:t + 1], ws, **{k: (v[t:t + 1] if k == "gate" else v) for k, v in kwargs.items()})
                 for t in range(tokens)]
    finally:
        native.configure_threads()
    for j in range(len(ws)):
        np.testing.assert_array_equal(results[2][j], results[1][j])
        np.testing.assert_array_equal(results[2][j], np.concatenate([a[j] for a in alone]))


@pytest.mark.parametrize("kind", ["fp32", "q8_0 gs64", "q8_0 blocks", "q4_0"])
def test_prompt_products_run_blas_sgemm_on_the_pool(native, kind):
    """Many rows: NumPy's sgemm called from the pool's threads on chunks of weight rows (quantized rows
    dequantized a chunk at a time), the same sums as NumPy's own call on the dequantized weights (after runq.c's
    rounding of x for quantized weights)."""
    w = rng.standard_normal((300, 256)).astype(np.float32)
    m = w if kind == "fp32" else QUANTIZERS[kind](w)
    x = rng.standard_normal((kernels_native.QUANT_NATIVE_GEMM_MIN_ROWS + 2, 256)).astype(np.float32)
    want = x @ w.T if kind == "fp32" else quantized_gemm(x, [m], lambda q: q.dequantize())[0]
    try:
        for threads in (1, 3, None):  # 1: one thread takes every row (more than a chunk's scratch holds)
            native.configure_threads(threads)
            got = native.matmul_many(x, [m, m])
            for g in got:
                np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        # matrices that share x's rounding go to sgemm in one call: each result as it is alone, fp32 beside them
        mixed = native.matmul_many(x, [m, w, m])
        for g, alone in zip(mixed, [native.matmul_many(x, [v])[0] for v in (m, w, m)], strict=True):
            np.testing.assert_array_equal(g, alone)
    finally:
        native.configure_threads()


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads a mapping's resident size in /proc")
@pytest.mark.parametrize("fmt, kind", [("bin", "q4_0"), ("gguf", "q4_0"), ("gguf", "q8_0")])
def test_a_mapped_block_model_is_resident_once(native, tmp_path, fmt, kind, monkeypatch):
    """A mapped Q4_0 or Q8_0 file's matrices run from the kernels' regrouped copy: decode steps, a prompt's
    products and its embedding rows all read the copy, and the file's pages under the copied matrices are handed
    back, so memory holds the model once. Loading reads every page (the scales' finiteness check); after a
    prompt and a decode step only the matrices without a copy, and the pages at their edges, are resident. The
    pages go as each matrix is copied: the file and the copies made so far are never resident together."""
    from babyllama.interop.gguf import load_gguf, save_gguf
    from babyllama.interop.vocab import from_tokenizer

    if native.regroup(BLOCK_QUANTIZERS[kind](np.ones((1, 32), np.float32))) is None:
        pytest.skip(f"the {native.isa()} build has no regrouped kernels, so nothing stands in for the file")
    if fmt == "gguf":
        pytest.importorskip("gguf", reason="writing the GGUF file needs the gguf package (the interop extra)")
    args = tiny_args(dim=512, hidden_dim=1536, n_layers=2, n_heads=8, n_kv_heads=8, vocab_size=4096, max_seq_len=128)
    w = random_weights(args, scale=0.1)
    w = w.quantize_q4() if kind == "q4_0" else w
    path = tmp_path / f"m.{fmt}"
    if fmt == "bin":
        formats.save(w, path, version=3)
        loaded = formats.load(path, mmap=True)
    else:
        save_gguf(w, path, from_tokenizer(byte_tokenizer(4096)), kind)
        loaded = load_gguf(path, keep_quantized=True)[0]
    anchor, size = loaded.wq[0].data, path.stat().st_size
    assert resident_bytes(anchor) > 0.8 * size
    held, copies, regroup = [], [], native.regroup  # before each copy: the file's resident bytes + the copies

    def watched_copy(w, out=None):
        held.append(resident_bytes(anchor) + sum(copies))
        copies.append(w.nbytes)
        return regroup(w, out)

    monkeypatch.setattr(native, "regroup", watched_copy)
    engine = Engine(loaded, kernels=native)
    cache = engine.new_cache(seq_len=80)
    prompt = engine.forward(list(range(3, 4096, 64)), range(64), cache, logits="last")  # rows all over the table
    engine.forward([int(prompt.argmax())], [64], cache)
    mats = [loaded.tok_embeddings, loaded.wcls, *(m for ms in loaded.layer_matrices().values() for m in ms)]
    copied = {id(m): m.nbytes for m in mats if m.regrouped}
    assert sum(copied.values()) > 0.8 * size
    edges = 2 * mmap.PAGESIZE * len(copied) + 64 * 1024  # pages shared with a neighbour; the kernel's fault-around
    assert resident_bytes(anchor) <= size - sum(copied.values()) + edges
    assert len(held) == len(copied) and max(held) <= size + edges, (max(held), size)


def test_embedding_rows_are_the_tables_rows(native):
    """A prompt's embedding lookup in C (kernels.c's dequantize_rows) gives formats.table_rows' values for every
    table type, from a Q4_0 or Q8_0 table's regrouped copy too; an id outside the table is refused."""
    table = rng.standard_normal((96, 64)).astype(np.float32)
    tokens = np.array([5, 0, 95, 5, 17])
    q4, q8 = quantize_q4_0(table), quantize_q8_0(table)
    regroups = native.regroup(q4) is not None
    native._regroup([q4, q8])
    assert q4.regrouped == q8.regrouped == regroups
    for t in (table, quantize_q80(table, 32), quantize_q8_0(table), quantize_q4_0(table), q4, q8):
        np.testing.assert_array_equal(native.embed(t, tokens), table_rows(t, tokens))
    with pytest.raises(ValueError, match="token ids"):
        native.embed(q4, np.array([3, 96]))


def test_releasing_pages_leaves_memory_that_is_not_a_file_map_alone():
    """memory.release_mapped drops a read-only file map's pages only: the kernel would zero anonymous memory
    (a matrix read or computed) that it was asked to drop."""
    a = np.arange(4 * mmap.PAGESIZE, dtype=np.uint8)
    memory.release_mapped(a)
    np.testing.assert_array_equal(a, np.arange(4 * mmap.PAGESIZE, dtype=np.uint8))


def half_weights(kind: str, gen: np.random.Generator, rows: int, n: int) -> tuple[Matrix, np.ndarray]:
    """A (rows, n) matrix stored as `kind` ("f16": IEEE halves, "bf16": bfloat16 bits), and the fp32 values it
    stands for; row 0 starts with edge values: subnormals, the largest (fp16) or a huge one (bf16), -0."""
    w = (gen.standard_normal((rows, n)) * 0.1).astype(np.float32)
    if kind == "f16":
        w16 = w.astype(np.float16)
        w16[0, :6] = [6e-8, -6e-8, 3e-6, -5e-5, 65504, -0.0]
        return w16, w16.astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated: any bfloat16 values will do
    bits[0, :6] = [0x0001, 0x8001, 0x0080, 0x7149, 0x8000, 0x3F80]  # subnormals, the least normal, ~1e30, -0, 1
    return BF16Tensor(bits), bf16_to_f32(bits)


# rows of 100 (a tail of 4 past the vectors), 120, 200, 256 and 1030 (the AVX-512 batched blocks' long-row form)
@pytest.mark.parametrize("kind", ["f16", "bf16"])
@pytest.mark.parametrize("n", [100, 120, 200, 256, 1030])
def test_half_weights_give_exactly_the_products_of_their_fp32_values(native, n, kind):
    """F16 and BF16 matrices (an F16 or BF16 GGUF's, a Hugging Face checkpoint's bfloat16, run as stored): the
    fp32 kernels load each weight converted to fp32 and sum in their own order, so every path (one token,
    batched decode steps, fused forms, a prompt's sgemm, embedding rows, dequantizing) gives bit for bit what the
    fp32 matrix of the converted values gives."""
    gen = np.random.default_rng(n)
    w16, w32 = half_weights(kind, gen, 37, n)
    for tokens in (1, 2, 3, 5, 8, 11, 64):  # 64: matmul_many's dequantize + sgemm
        x = gen.standard_normal((tokens, n)).astype(np.float32)
        np.testing.assert_array_equal(native.matmul(x, [w16])[0], native.matmul(x, [w32])[0])
        np.testing.assert_array_equal(native.matmul_many(x, [w16])[0], native.matmul_many(x, [w32])[0])
    x, g = gen.standard_normal((2, n)).astype(np.float32), gen.standard_normal((2, n)).astype(np.float32)
    norm = (gen.standard_normal(n).astype(np.float32), 1e-5)
    for fused in ({"norm": norm}, {"gate": g}):
        np.testing.assert_array_equal(native.matmul(x, [w16], **fused)[0], native.matmul(x, [w32], **fused)[0])
    y = gen.standard_normal((2, 37)).astype(np.float32)
    into16, into32 = y.copy(), y.copy()
    native.matmul(x, [w16], into=into16)
    native.matmul(x, [w32], into=into32)
    np.testing.assert_array_equal(into16, into32)
    bounded = np.tanh(w32)  # a Q8_0 matrix beside them (whose fp16 scales the huge bf16 weight would overflow)
    mixed = [w16, quantize_q8_0(bounded[:, : n // 32 * 32]) if n % 32 else quantize_q8_0(bounded), w32]
    if n % 32 == 0:  # with quantized matrices in the same call
        got = native.matmul(x, mixed)
        np.testing.assert_array_equal(got[0], got[2])
        np.testing.assert_array_equal(got[0], native.matmul(x, [w32])[0])
    np.testing.assert_array_equal(native.dequantize(w16), w32)
    ids = np.array([0, 36, 5, 0])
    np.testing.assert_array_equal(native.embed(w16, ids), w32[ids])
    np.testing.assert_allclose(native.matmul(x, [w16])[0], x @ w32.T, rtol=1e-4, atol=1e-3)


def test_numba_widens_every_fp16_bit_pattern_exactly():
    """numba has no float16 on CPUs: its 16-bit product widens IEEE fp16 weights through a table of their fp32
    bits. The compiled product picks every finite one of the 65,536 patterns out exactly (x one-hot: a weight
    times 1 plus zeros), subnormals and the largest values included."""
    kn = pytest.importorskip("babyllama.kernels_numba")
    h = np.arange(1 << 16, dtype=np.uint16)
    finite = np.where(np.isfinite(h.view(np.float16)), h, 0).reshape(256, 256)  # 0 * inf would be NaN
    out = np.empty((256, 256), dtype=np.float32)
    kn._matmul1_16bit(np.eye(256, dtype=np.float32), finite, False, out, kn.F16_TO_F32_BITS)
    np.testing.assert_array_equal(out.T, finite.view(np.float16).astype(np.float32))


def test_numbas_16_bit_product_is_read_back_from_its_disk_cache(tmp_path):
    """Only the first process compiles it: a later one finds it in numba's cache (a default array argument
    made its cache key differ in every process, so each recompiled it, ~2 s, and left another file)."""
    pytest.importorskip("numba")
    script = ("import numpy as np\nfrom babyllama import kernels_numba as kn\n"
              "kn.matmul_dense_many(np.ones((1, 8), np.float32), [np.ones((4, 8), np.float16)])\n"
              "s = kn._matmul1_16bit.stats\nprint(sum(s.cache_hits.values()), sum(s.cache_misses.values()))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    first, second = (r.stdout.split() for r in runs)
    assert first[0] == "0" and second[0] != "0", (first, second)


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_numba_multiplies_16_bit_matrices_as_stored(kind, monkeypatch):
    """The numba backend's decode-sized products read fp16 and bf16 matrices at their own size, a row widened at
    a time, instead of converting the whole matrix at every product: the same values as the fp32 product of the
    converted weights, without converting them."""
    kn = pytest.importorskip("babyllama.kernels_numba")
    gen = np.random.default_rng(7)
    w16, w32 = half_weights(kind, gen, 300, 256)
    k = kn.NumbaKernels()
    for tokens in (1, 3, 8):
        x = gen.standard_normal((tokens, 256)).astype(np.float32)
        want = (x.astype(np.float64) @ w32.T.astype(np.float64)).astype(np.float32)
        with monkeypatch.context() as m:
            m.setattr(formats, "dense", None)  # NumbaKernels would convert through these
            m.setattr(kn, "dense", None)
            m.setattr(BF16Tensor, "dequantize", None)
            got = k.matmul_many(x, [w16, w32])
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-5)
    x = gen.standard_normal((20, 256)).astype(np.float32)  # a prompt: converted, then BLAS
    np.testing.assert_allclose(k.matmul_many(x, [w16])[0], x @ w32.T, rtol=1e-5, atol=1e-5)


def test_threads_that_load_the_kernels_together_compile_them_once(tmp_path, monkeypatch):
    """Python threads that reach their first generation at once all load the kernels: each compiled the library
    (8 threads: 8 compiles sharing the CPUs, ~3 minutes on two cores before any output). One compiles; the
    others wait for it and take its library."""
    calls = fake_compiler(monkeypatch)
    fake_run = kernels_native._run_compiler

    def slow_compile(cmd):
        time.sleep(0.3)  # long enough that the other threads arrive while it compiles
        return fake_run(cmd)

    monkeypatch.setattr(kernels_native, "_run_compiler", slow_compile)
    monkeypatch.setattr(kernels_native, "usable_cpus", lambda: 1)  # one compile per build
    monkeypatch.setattr(kernels_native, "_said", set())
    monkeypatch.setenv("BABYLLAMA_CACHE", str(tmp_path))
    threads = [threading.Thread(target=kernels_native.load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, calls  # the fake library does not load: each thread then falls back, quietly after one line


NUMBA_FORK_SCRIPT = """
import os, sys
import numpy as np
from babyllama import kernels_numba as kn
w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float16)
x = np.ones((1, 32), dtype=np.float32)
k = kn.NumbaKernels()
k.matmul_many(x, [w])  # numba's threads start here
import numba
from numba.np.ufunc import omppool
if numba.threading_layer() != "omp" or omppool.openmp_vendor != "GNU":
    print("no GNU OpenMP"); sys.exit(0)
pid = os.fork()
if pid == 0:
    out = k.matmul_many(x, [w])[0]
    os._exit(0 if np.allclose(out, x @ w.astype(np.float32).T, atol=1e-4) else 3)
print(os.waitpid(pid, 0)[1])
"""


def test_a_process_forked_after_numbas_openmp_threads_ran_still_multiplies():
    """On the numba backend (no C compiler), a child forked after the parent's products ran on GNU OpenMP's
    threads (a worker of a multiprocessing fork pool) was stopped by numba with SIGTERM at its first product, and
    the pool waited forever for the lost task. The child multiplies with NumPy instead, and says so once."""
    pytest.importorskip("babyllama.kernels_numba")
    r = subprocess.run([sys.executable, "-c", NUMBA_FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    if r.stdout.strip() == "no GNU OpenMP":
        pytest.skip("numba's threads are not GNU OpenMP's here (TBB or the workqueue survive a fork)")
    assert r.stdout.strip() == "0", (r.stdout, r.stderr)
    assert r.stderr.count("numba's OpenMP threads do not survive a fork") == 1, r.stderr


@pytest.mark.parametrize("quantize", [None, "q8_0", "q4_0"])
def test_a_dropped_model_is_not_kept_alive_by_the_native_kernels(quantize):
    """The native kernels keep the C description of a product's matrices for reuse while the same arrays come
    back. It held the arrays themselves, so a model dropped after a prompt of more than 8 tokens (its products an
    sgemm, or int8 products of quantized rows) stayed in memory, its file mapped, and every model loaded and
    dropped so added one (30 loads of a model: 30 copies). The descriptions hold weak references now."""
    k = native_build("native")
    w = random_weights(tiny_args(dim=64, hidden_dim=128))
    if quantize:
        w = w.quantize_as(quantize, kernels.q4_0_blocks)
    engine = Engine(w, kernels=k)
    tokens = np.arange(12)  # more than a fused step takes
    engine.forward(tokens, tokens, engine.new_cache(seq_len=16))
    k.matmul(np.ones((1, 64), dtype=np.float32), [w.wo[0]])  # a product's description, whatever the prompt took
    matrices = [weakref.ref(w.wo[0]), weakref.ref(w.wo if quantize is None else w.wo[1])]
    del engine, w
    gc.collect()
    assert [m() is None for m in matrices] == [True, True]


NUMBA_THREADS_SCRIPT = """
import threading
import numpy as np
from babyllama import kernels_numba as kn
w = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float16)
x = np.ones((1, 256), dtype=np.float32)
k = kn.NumbaKernels()
want = x @ w.astype(np.float32).T
results = []

def products():
    results.append(all(np.allclose(k.matmul_many(x, [w])[0], want, atol=1e-3) for _ in range(50)))

threads = [threading.Thread(target=products) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(results)
"""


def test_threads_sharing_a_model_on_numbas_workqueue_layer_take_turns():
    """Where neither TBB nor OpenMP loads (a slim container: no compiler, no libgomp, the numba backend's place),
    numba runs its parallel functions on its workqueue layer, which aborted the process (SIGABRT, "Concurrent
    access has been detected") when Python threads sharing a model launched products at once. They take turns."""
    pytest.importorskip("babyllama.kernels_numba")
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    r = subprocess.run([sys.executable, "-c", NUMBA_THREADS_SCRIPT], capture_output=True, text=True, timeout=120,
                       env=env)
    assert r.returncode == 0 and r.stdout.strip() == "[True, True, True, True]", (r.returncode, r.stderr[-500:])


def test_the_native_arch_is_read_in_any_case(monkeypatch):
    """BABYLLAMA_NATIVE_ARCH=AVX2 is the avx2 set (its -march flags, its instruction check), not -march=AVX2,
    which the compiler refuses and which then read as a failed build."""
    for value in ("AVX2", " avx2 ", "Avx2"):
        monkeypatch.setenv("BABYLLAMA_NATIVE_ARCH", value)
        assert kernels_native.arch_name() == "avx2"
        assert kernels_native.flag_sets(kernels_native.arch_name()) == kernels_native.flag_sets("avx2")
    monkeypatch.setenv("BABYLLAMA_NATIVE_ARCH", "  ")
    assert kernels_native.arch_name() == "native"
