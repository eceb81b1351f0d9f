"""Model files: write/read round trips for versions 0-3 (fp32, Q8_0, Q4_0), memory-mapped or read, quantizing to
Q8_0, Q4_0, f16 and bf16 on load, and the header checks."""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np
import pytest
from conftest import random_weights, resident_bytes, run_memory_script, tiny_args

from babyllama import formats
from babyllama.errors import BabyLlamaError

MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def assert_same_weights(a: formats.Weights, b: formats.Weights) -> None:
    assert a.args == b.args
    for name in ("tok_embeddings", "rms_att", "rms_ffn", "rms_final", "wcls", *MATRICES):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_fp32_round_trip_is_exact(tmp_path, version, shared):
    w = random_weights(tiny_args(shared_classifier=shared))
    path = tmp_path / "m.bin"
    formats.save(w, path, version=version)
    back = formats.load(path)
    assert back.version == version and not back.quantized
    assert_same_weights(w, back)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_no_mmap_load_reads_the_same_read_only_weights(tmp_path, version):
    w = random_weights(tiny_args(dim=64, hidden_dim=128))
    path = tmp_path / "m.bin"
    formats.save(w, path, version=version)
    mapped, read = formats.load(path, mmap=True), formats.load(path, mmap=False)
    for name in ("tok_embeddings", "rms_att", "rms_ffn", "rms_final", "wcls", *MATRICES):
        a, b = getattr(mapped, name), getattr(read, name)
        if read.quantized:  # QTensors (or lists of them): compare their int8 values and scales
            a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
            a = [x for t in a for x in ((t.q, t.s) if hasattr(t, "q") else (t,))]
            b = [x for t in b for x in ((t.q, t.s) if hasattr(t, "q") else (t,))]
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=name)
    def owner(a):  # what holds the bytes behind a view
        return owner(a.base) if isinstance(a, np.ndarray) else a.obj if isinstance(a, memoryview) else a

    m, q = (w.wq[0].q if w.quantized else w.wq for w in (mapped, read))
    assert isinstance(owner(m), mmap.mmap) and not m.flags.writeable  # a view of the file, not a copy
    assert not isinstance(owner(q), mmap.mmap) and not q.flags.writeable


def _owner(a):  # what holds the bytes behind a view
    return _owner(a.base) if isinstance(a, np.ndarray) else a.obj if isinstance(a, memoryview) else a


@pytest.mark.parametrize("free, mapped", [(None, True), (2**20, True), (2**30, False)],
                         ids=["unknown-free-memory", "file-over-a-quarter", "file-under-a-quarter"])
def test_default_load_reads_files_that_fit_easily_and_maps_the_rest(tmp_path, monkeypatch, free, mapped):
    """Without mmap=..., a file of at most a quarter of the free memory is read into memory, a larger one (or
    one whose fit cannot be told) mapped."""
    from babyllama import memory

    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(dim=64, hidden_dim=128)), path, version=1)
    assert 2**18 < path.stat().st_size <= 2**28  # over a quarter of 1 MiB, under a quarter of 1 GiB
    monkeypatch.setattr(memory, "memory_free", lambda: free)
    assert isinstance(_owner(formats.load(path).wq), mmap.mmap) == mapped


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads a mapping's resident size in /proc")
@pytest.mark.parametrize("version", [0, 3])
def test_a_mapped_embedding_table_apart_from_the_classifier_is_not_held(tmp_path, version):
    """Loading checks every weight for NaN/Inf (fp32 values, Q4_0 blocks' scales), which reads the whole map
    of these versions; an embedding table that is not also the classifier is then handed back (a row per token
    is all decode reads of it), the matrices stay resident."""
    args = tiny_args(dim=256, hidden_dim=512, n_layers=2, vocab_size=4096, shared_classifier=False)
    path = tmp_path / "m.bin"
    formats.save(random_weights(args), path, version=version)
    w = formats.load(path, mmap=True)
    table = sum(a.nbytes for a in formats.matrix_arrays(w.tok_embeddings))
    layers = sum(sum(a.nbytes for a in formats.matrix_arrays(m)) for ms in w.layer_matrices().values() for m in ms)
    assert table > path.stat().st_size / 4 and layers > path.stat().st_size / 4
    held = resident_bytes(formats.matrix_arrays(w.wq[0])[0])
    assert layers <= held <= path.stat().st_size - table + 8 * mmap.PAGESIZE + 64 * 1024


def test_default_load_maps_q4_0_files(tmp_path, monkeypatch):
    """Version 3 (Q4_0) files are mapped by default, however much memory is free: decode reads the native
    kernels' regrouped copy of their matrices, and a read copy would be a second one."""
    from babyllama import memory

    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(dim=64, hidden_dim=128)).quantize_q4(), path, version=3)
    monkeypatch.setattr(memory, "memory_free", lambda: 2**30)
    assert isinstance(_owner(formats.load(path).wq[0].data), mmap.mmap)
    assert not isinstance(_owner(formats.load(path, mmap=False).wq[0].data), mmap.mmap)


@pytest.mark.parametrize("gs, mapped", [(64, True), (32, True), (16, False)])
def test_default_load_maps_version_2_files_the_kernels_pack(tmp_path, monkeypatch, gs, mapped):
    """Version 2 files with groups of 32 or 64 are mapped by default too (the native kernels pack their
    matrices, QTensor.packed); other group sizes run as they are stored and are read while they fit."""
    from babyllama import memory

    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(dim=64, hidden_dim=128)), path, version=2, group_size=gs)
    monkeypatch.setattr(memory, "memory_free", lambda: 2**30)
    assert formats.load(path).wq[0].group_size == gs
    assert isinstance(_owner(formats.load(path).wq[0].q), mmap.mmap) == mapped
    assert not isinstance(_owner(formats.load(path, mmap=False).wq[0].q), mmap.mmap)


def test_memory_free_reads_the_kernels_estimate():
    free = __import__("babyllama.memory", fromlist=["memory_free"]).memory_free()
    if not os.path.exists("/proc/meminfo"):
        assert free is None
    else:
        assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@pytest.mark.parametrize("shared", [True, False])
def test_q8_round_trip_within_quantization_error(tmp_path, shared):
    args = tiny_args(shared_classifier=shared)
    w = random_weights(args)
    path = tmp_path / "m.bin"
    formats.save(w, path, version=2, group_size=32)
    back = formats.load(path)
    assert back.version == 2 and back.group_size == 32 and back.args == args
    dense = back.to_fp32()
    for name in ("tok_embeddings", "wcls", *MATRICES):
        orig, deq = np.asarray(getattr(w, name)), np.asarray(getattr(dense, name))
        # per group the error is at most half a quantization step: max|w| / 127 / 2
        groups = orig.reshape(-1, 32)
        bound = np.abs(groups).max(axis=1, keepdims=True) / 127 / 2 + 1e-7
        assert (np.abs(deq.reshape(-1, 32) - groups) <= bound).all(), name
    for name in ("rms_att", "rms_ffn", "rms_final"):
        np.testing.assert_array_equal(getattr(w, name), getattr(back, name))
    # writing the read-back v2 model again gives the same bytes (no drift through re-quantization)
    again = tmp_path / "again.bin"
    formats.save(back, again, version=2)
    assert again.read_bytes() == path.read_bytes()


def test_q8_quantize_matches_reference_and_zero_groups():
    w = np.array([[0.0, 0.0, 0.0, 0.0, 1.0, -0.5, 0.25, 0.127]], dtype=np.float32)
    t = formats.quantize_q80(w, 4)
    assert t.s[0, 0] == 0 and (t.q[0, :4] == 0).all()
    np.testing.assert_allclose(t.s[0, 1], 1.0 / 127)
    np.testing.assert_array_equal(t.q[0, 4:], [127, -64, 32, 16])


def test_header_extension_carries_theta_and_eps(tmp_path):
    args = tiny_args(rope_theta=500000.0, norm_eps=1e-6)
    w = random_weights(args)
    for version in (1, 2):
        formats.save(w, tmp_path / "m.bin", version=version, group_size=32)
        back = formats.load(tmp_path / "m.bin")
        assert back.args.rope_theta == 500000.0 and back.args.norm_eps == 1e-6
    with pytest.raises(BabyLlamaError, match="version 0 files cannot carry rope_theta"):
        formats.save(w, tmp_path / "v0.bin", version=0)


def test_llama2c_v1_header_without_extension_means_defaults(tmp_path):
    w = random_weights(tiny_args())
    path = tmp_path / "m.bin"
    formats.save(w, path, version=1)
    raw = bytearray(path.read_bytes())
    raw[formats.EXT_OFFSET:formats.EXT_OFFSET + 16] = bytes(16)  # what llama2.c's export.py writes
    path.write_bytes(raw)
    back = formats.load(path)
    assert back.args.rope_theta == 10000.0 and back.args.norm_eps == 1e-5


def test_stories260k_reads_and_rewrites_identically(tmp_path, stories260k):
    w = formats.load(stories260k)
    assert (w.args.dim, w.args.hidden_dim, w.args.n_layers, w.args.n_heads, w.args.n_kv_heads) == (64, 172, 5, 8, 4)
    # a small file is read into memory by default: each tensor into a read-only array of its own; mapped, the
    # tensors are read-only views of the file's bytes, not copies
    for arr in (w.tok_embeddings, w.wq, w.w2, w.rms_final):
        assert arr.flags.owndata and not arr.flags.writeable
    mapped = formats.load(stories260k, mmap=True)
    for arr in (mapped.tok_embeddings, mapped.wq, mapped.w2, mapped.rms_final):
        assert not arr.flags.owndata and not arr.flags.writeable
    assert_same_weights(w, mapped)
    out = tmp_path / "copy.bin"
    formats.save(w, out, version=0)
    # the legacy RoPE tables are recomputed, so compare everything but them
    assert_same_weights(w, formats.load(out))


def test_default_group_size_divides_dim_and_hidden():
    assert formats.default_group_size(tiny_args(dim=288, hidden_dim=768, n_heads=6)) == 32
    assert formats.default_group_size(tiny_args(dim=64, hidden_dim=172, n_heads=8)) == 4
    assert formats.default_group_size(tiny_args(dim=768, hidden_dim=2048, n_heads=12)) == 64


def test_group_size_for_odd_hidden_dim_and_note_where_small(tmp_path, capsys):
    # halving 64 reaches 1 on a hidden_dim with odd factors only; 9 divides both
    assert formats.default_group_size(tiny_args(dim=288, hidden_dim=171, n_heads=6)) == 9
    w = random_weights(tiny_args(dim=32, hidden_dim=45))
    assert w.quantize().group_size == 1  # gcd 1: 5 bytes a weight, said in one line
    assert capsys.readouterr().err.count("babyllama: note: Q8_0 in groups of 1") == 1
    formats.save(w, tmp_path / "q.bin", version=2)
    assert "more than f16's 2" in capsys.readouterr().err
    w.quantize(1)  # asked for: no note
    random_weights(tiny_args(dim=32, hidden_dim=48)).quantize()  # groups of 16: no note either
    w.quantize_q4()  # w2's rows of 45 fall back to Q8_0 in groups of 1: said too, and that Q4_0 is not theirs
    err = capsys.readouterr().err
    assert err.count("babyllama: note: Q8_0 in groups of 1") == 1
    assert err.count("babyllama: note: Q4_0 needs rows made of blocks of 32: the matrices whose rows are of "
                     "hidden_dim 45 are Q8_0 instead, in groups of 1") == 1
    random_weights(tiny_args(dim=32, hidden_dim=96)).quantize_q4()  # rows of 32s: no Q8_0, no note
    assert capsys.readouterr().err == ""
    # halving's size stays where it is 4 or more (llama2.c's export's choice), though 48 would divide both
    assert formats.default_group_size(tiny_args(dim=48, hidden_dim=144, n_heads=6)) == 16
    assert capsys.readouterr().err == ""


def _llama2c_version2(w: formats.Weights, path, gs: int = 64) -> list[np.ndarray]:
    """`w` written as llama2.c's export.py --version 2 writes it: the group size halved only until it divides
    dim, each tensor's groups over the whole flattened tensor (quantize_q80's w.reshape(-1, group_size)).
    Returns the weights each matrix then stands for, in file order."""
    import struct

    a = w.args
    while a.dim % gs:
        gs //= 2
    head = struct.pack("<Ii7iBi", formats.MAGIC, 2, a.dim, a.hidden_dim, a.n_layers, a.n_heads, a.n_kv_heads,
                       a.vocab_size, a.max_seq_len, int(a.shared_classifier), gs)
    body = [head.ljust(256, b"\0"), w.rms_att.tobytes(), w.rms_ffn.tobytes(), w.rms_final.tobytes()]
    mats = [w.tok_embeddings, *(m for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for m in getattr(w, name))]
    stands_for = []
    for m in mats + ([] if a.shared_classifier else [w.wcls]):
        groups = np.asarray(m, dtype=np.float32).reshape(-1, gs)
        scale = (np.abs(groups).max(axis=1) / 127.0).astype(np.float32)
        q = np.round(groups / scale[:, None]).astype(np.int8)
        body += [q.tobytes(), scale.tobytes()]
        stands_for.append((q * scale[:, None]).reshape(m.shape))
    path.write_bytes(b"".join(body))
    return stands_for


@pytest.mark.parametrize("shared", [True, False])
def test_llama2c_version2_files_with_groups_across_rows_read_as_the_weights_they_hold(tmp_path, capsys, shared):
    """llama2.c's export.py quantizes hidden_dim 96 (dim 64) in groups of 64 over each flattened tensor, so
    w2's groups run across its rows of 96: such a file is read, each weight its group's int8 value times the
    group's scale, in fp32 (with a note), rather than refused as a corrupt header."""
    w = random_weights(tiny_args(dim=64, hidden_dim=96, n_heads=4, shared_classifier=shared))
    stands_for = _llama2c_version2(w, tmp_path / "l2c.bin")
    got = formats.load(tmp_path / "l2c.bin")
    err = capsys.readouterr().err
    assert "groups of 64 run across the rows of w2 (hidden_dim 96" in err
    assert "(run, chat, eval and serve's --quantize q8_0 quantizes" in err  # the commands that have the flag
    mats = [got.tok_embeddings, *(m for name in ("wq", "wk", "wv", "wo", "w1", "w2", "w3") for m in getattr(got, name))]
    for want, m in zip(stands_for, mats + ([] if shared else [got.wcls]), strict=True):
        np.testing.assert_array_equal(np.asarray(m), want)
    assert got.kinds() == "fp32" and (got.wcls is got.tok_embeddings) == shared
    # dim 64 and hidden_dim 128: the groups lie within rows, so the file runs in Q8_0 as stored
    _llama2c_version2(random_weights(tiny_args(dim=64, hidden_dim=128, n_heads=4)), tmp_path / "even.bin")
    even = formats.load(tmp_path / "even.bin")
    assert even.group_size == 64 and even.quantized and capsys.readouterr().err == ""


@pytest.mark.parametrize("shared", [True, False])
def test_quantize_in_memory_equals_v2_file(tmp_path, shared):
    w = random_weights(tiny_args(shared_classifier=shared))
    formats.save(w, tmp_path / "q.bin", version=2, group_size=16)
    from_file, in_memory = formats.load(tmp_path / "q.bin"), w.quantize(16)
    for emb in (from_file.tok_embeddings, in_memory.tok_embeddings):
        assert isinstance(emb, formats.QTensor)  # kept quantized: rows are dequantized as tokens are embedded
    np.testing.assert_array_equal(from_file.tok_embeddings.q, in_memory.tok_embeddings.q)
    np.testing.assert_array_equal(from_file.tok_embeddings.s, in_memory.tok_embeddings.s)
    np.testing.assert_array_equal(from_file.wcls.q, in_memory.wcls.q)
    tokens = np.array([5, 0, 5, w.args.vocab_size - 1])
    table = from_file.tok_embeddings
    np.testing.assert_array_equal(formats.table_rows(table, tokens), table.dequantize()[tokens])


# ------------------------------------------------------------------------------ version 3 (Q4_0 blocks)


@pytest.mark.parametrize("shared", [True, False])
def test_q4_round_trip_keeps_the_blocks_and_maps_them(tmp_path, shared):
    """Version 3: every matrix (the embedding table and classifier too) in llama.cpp's Q4_0 blocks, read back
    byte for byte as views of the mapped file; a Q4_0 model written again is copied, not re-quantized."""
    from babyllama.quant import BlockTensor, quantize_q4_0

    w = random_weights(tiny_args(dim=64, hidden_dim=96, shared_classifier=shared))
    path = tmp_path / "m.bin"
    formats.save(w, path, version=3)
    args, version, block, _ = formats.read_header(path)
    assert (version, block, args) == (3, 32, w.args)
    back = formats.load(path)
    assert back.version == 3 and back.quantized and back.kinds() == "q4_0"
    for name in MATRICES:
        for mine, theirs in zip(getattr(back, name), getattr(w, name), strict=True):
            assert isinstance(mine, BlockTensor) and not mine.data.flags.writeable
            np.testing.assert_array_equal(mine.data, quantize_q4_0(theirs).data, err_msg=name)
    np.testing.assert_array_equal(back.tok_embeddings.data, quantize_q4_0(w.tok_embeddings).data)
    assert (back.wcls is back.tok_embeddings) == shared
    ids = np.array([3, 0, 7])
    np.testing.assert_array_equal(formats.table_rows(back.tok_embeddings, ids), back.tok_embeddings.dequantize()[ids])
    again = tmp_path / "again.bin"
    formats.save(back, again, version=3)
    assert again.read_bytes() == path.read_bytes()
    # and back to fp32 / Q8_0: through the dequantized values
    formats.save(back, tmp_path / "v1.bin", version=1)
    np.testing.assert_array_equal(formats.load(tmp_path / "v1.bin").wq, back.to_fp32().wq)


def test_q4_file_size_is_checked(tmp_path):
    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args()), path, version=3)
    path.write_bytes(path.read_bytes()[:-18])  # one block short
    with pytest.raises(BabyLlamaError, match="truncated"):
        formats.load(path)


@pytest.mark.parametrize("when, mmap", [("after its header was checked", False), ("after its header was checked", True),
                                        ("while it is read", False)])  # a map has the file's size when made
def test_a_file_cut_short_while_it_loads_is_one_line(tmp_path, monkeypatch, when, mmap):
    """A model rewritten in place (cp over it) as it loads: fewer bytes than its header implies are refused in one
    line, never a NumPy ValueError, and never read as weights with uninitialized memory for the missing tail."""
    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args()), path)
    real_fstat = os.fstat

    def cut_short() -> None:
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)

    if when == "after its header was checked":
        real_header = formats.read_header
        monkeypatch.setattr(formats, "read_header", lambda p: (real_header(p), cut_short())[0])
    else:  # the size is taken, then the file shrinks before its bytes are read
        def fstat(fd):
            st = real_fstat(fd)
            if sys._getframe(1).f_code.co_name == "_open_cursor":
                cut_short()
            return st

        monkeypatch.setattr(formats.os, "fstat", fstat)
    with pytest.raises(BabyLlamaError, match="the file changed while it was read"):
        formats.load(path, mmap=mmap)


def test_q4_needs_rows_of_whole_blocks(tmp_path):
    """stories260K's hidden_dim 172 does not split into blocks of 32: version 3 refuses it, while quantizing in
    memory gives those matrices runq.c's Q8_0 instead."""
    w = random_weights(tiny_args(dim=64, hidden_dim=172, n_heads=8))
    with pytest.raises(BabyLlamaError) as refused:
        formats.save(w, tmp_path / "m.bin", version=3)
    assert str(refused.value) == (f"cannot write {tmp_path / 'm.bin'}: version 3 (Q4_0) needs blocks of 32 dividing "
                                  "dim 64 and hidden_dim 172 (version 2, Q8_0, takes any shape)")
    q = w.quantize_as("q4_0")
    assert q.kinds() == "q4_0, q8_0 gs 4"
    assert all(m.group_size == 4 for m in q.w2) and all(m.kind == "q4_0" for m in q.w1)
    with pytest.raises(BabyLlamaError, match="unknown quantization"):
        w.quantize_as("q3")


def test_q4_quantizer_matches_llama_cpp():
    """Our Q4_0 and Q8_0 blocks are bit for bit those of llama.cpp's reference quantizers (as the gguf package
    implements them)."""
    gguf = pytest.importorskip("gguf")
    from babyllama.quant import quantize_q4_0, quantize_q8_0

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((40, 256)) * rng.uniform(1e-3, 3, (40, 1))).astype(np.float32)
    w[0, :32], w[1, :32], w[2, :32] = 0, 1.0, np.arange(32) - 16.0  # zero blocks, ties, exact halves
    types = gguf.GGMLQuantizationType
    for ours, qtype in ((quantize_q4_0, types.Q4_0), (quantize_q8_0, types.Q8_0)):
        q = ours(w)
        np.testing.assert_array_equal(q.data, gguf.quants.quantize(w, qtype))
        np.testing.assert_array_equal(q.dequantize(), gguf.quants.dequantize(q.data, qtype))


def test_a_q4_0_model_saves_the_same_bytes_after_it_ran(tmp_path):
    """Running a Q4_0 model puts its matrices in the native kernels' byte order; a file written from it after
    holds llama.cpp's blocks all the same."""
    from babyllama.engine import Engine

    w = random_weights(tiny_args(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=3, vocab_size=320)).quantize_q4()
    formats.save(w, tmp_path / "before.bin", version=3)
    engine = Engine(w)
    engine.forward([1, 2], range(2), engine.new_cache())
    if not w.wq[0].regrouped:
        pytest.skip("the kernels here keep Q4_0 blocks as they are (no native build with AVX2)")
    formats.save(w, tmp_path / "after.bin", version=3)
    assert (tmp_path / "after.bin").read_bytes() == (tmp_path / "before.bin").read_bytes()


@pytest.mark.parametrize("mmap", [None, False])
def test_a_runq_q8_model_runs_packed_and_saves_the_same_bytes(tmp_path, mmap):
    """Running a .bin version 2 model gives its matrices the native kernels' packed copy (groups of 32 here:
    dim 288's). runq.c's values and scales stay where they are a file's pages (mapped: the default) and are let
    go where they were read into memory, rebuilt from the copy when read: either way a file written after holds
    the same bytes, and the step's logits agree with the plain NumPy path's within float rounding."""
    from babyllama.engine import Engine

    args = tiny_args(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=3, vocab_size=320)
    formats.save(random_weights(args), tmp_path / "m.bin", version=2)
    w = formats.load(tmp_path / "m.bin", mmap=mmap)
    engine = Engine(w)
    logits = engine.forward([1, 2, 3], range(3), engine.new_cache())
    if w.wq[0].packed is None:
        pytest.skip("the kernels here keep runq.c's layout as it is (no native build with AVX2)")
    assert w.wq[0].group_size == 32 and all(m.packed is not None for m in (*w.w1, *w.w2, w.wcls))
    assert all(m.plain_kept == (mmap is None) for m in (*w.w1, *w.w2, w.wcls))
    formats.save(w, tmp_path / "after.bin", version=2)
    assert (tmp_path / "after.bin").read_bytes() == (tmp_path / "m.bin").read_bytes()
    plain = Engine(formats.load(tmp_path / "m.bin"), plain=True)
    expected = plain.forward([1, 2, 3], range(3), plain.new_cache())
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_q8_model_quantized_on_load_is_held_once_after_it_ran():
    """runq.c's values and scales made on load (`--quantize q8_0`) are let go once the native kernels packed
    them: memory holds each matrix once, and whatever reads q and s after gets the same values back."""
    import gc
    import weakref

    from babyllama.engine import Engine

    fp32 = random_weights(tiny_args(dim=128, hidden_dim=384, vocab_size=320))
    w = fp32.quantize_as("q8_0")
    before = [(m.q.copy(), m.s.copy()) for m in w.w2]
    made = weakref.ref(w.w2[0].q)
    engine = Engine(w)
    engine.forward([1, 2], range(2), engine.new_cache())
    if w.w2[0].packed is None:
        pytest.skip("the kernels here keep runq.c's layout as it is (no native build with AVX2)")
    gc.collect()
    assert made() is None and not w.w2[0].plain_kept
    assert formats.matrix_arrays(w.w2[0]) == [w.w2[0].packed] and w.w2[0].shape == before[0][0].shape
    for m, (q, s) in zip(w.w2, before):
        np.testing.assert_array_equal(m.q, q)
        np.testing.assert_array_equal(m.s, s)
    np.testing.assert_array_equal(w.w2[0].dequantize(), formats.QTensor(*before[0], w.w2[0].group_size).dequantize())


@pytest.mark.parametrize("version", [2, 3])
def test_a_quantized_file_read_into_memory_is_let_go_once_the_kernels_copied_it(tmp_path, version):
    """--no-mmap on a version-2 (groups of 32) or version-3 file: each tensor is read into a read-only array of
    its own, so once the native kernels have their copy of a matrix (packed, regrouped) its read bytes go, and
    memory holds the model once."""
    import gc
    import weakref

    from babyllama.engine import Engine

    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args(dim=288, hidden_dim=768, n_heads=6, n_kv_heads=3, vocab_size=320)),
                 path, version=version)
    w = formats.load(path, mmap=False)
    mats = {id(m): m for m in (w.tok_embeddings, w.wcls, *(m for ms in w.layer_matrices().values() for m in ms))}
    read = [a for m in mats.values() for a in formats.matrix_arrays(m)]
    assert all(a.base is None and not a.flags.writeable for a in read)  # no buffer shared with other tensors
    assert not any(a.flags.writeable for a in (w.rms_att, w.rms_ffn, w.rms_final))
    assert sum(a.nbytes for a in read) + sum(a.nbytes for a in (w.rms_att, w.rms_ffn, w.rms_final)) \
        == path.stat().st_size - formats.read_header(path)[3]  # the whole body, once
    refs = [weakref.ref(a) for a in read]
    del read
    engine = Engine(w)
    logits = engine.forward([1, 2], range(2), engine.new_cache())
    if not (w.wq[0].packed is not None if version == 2 else w.wq[0].regrouped):
        pytest.skip("the kernels here keep the file's layout as it is (no native build with AVX2)")
    gc.collect()
    assert all(r() is None for r in refs)
    again = Engine(formats.load(path, mmap=True))
    np.testing.assert_array_equal(logits, again.forward([1, 2], range(2), again.new_cache()))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantizing_on_load_lets_the_file_read_into_memory_go(tmp_path, kind):
    """`--quantize` on a file read into memory keeps nothing of it: the norms are copied, so no array read from
    the fp32 file stays alive beside the quantized model."""
    import gc
    import weakref

    path = tmp_path / "m.bin"
    formats.save(random_weights(tiny_args()), path)
    w = formats.load(path, mmap=False)
    owner = w.rms_att
    while isinstance(owner.base, np.ndarray):
        owner = owner.base
    read = weakref.ref(owner)
    q = w.quantize_as(kind)
    del w, owner
    gc.collect()
    assert read() is None and q.rms_att.shape == (2, 32)


READ_ONCE_PEAK = """
import sys
from babyllama import api, export, loading
from babyllama.memory import keep_freed_memory

keep_freed_memory()  # as the babyllama command runs

path, job = sys.argv[1], sys.argv[2]
before = peak_from_here()
if job.startswith("load"):
    api.load(path, quantize=job.split()[1], mmap=None if job.split()[2] == "default" else True)
else:
    export.export(loading.load_source(model=path), sys.argv[3], "bin", version=int(job.split()[1]))
print(status("VmHWM:") - before)
"""


def _matrix_bytes(w: formats.Weights) -> list[int]:
    mats = [w.tok_embeddings, w.wcls, *(m for ms in w.layer_matrices().values() for m in ms)]
    return [sum(a.nbytes for a in formats.matrix_arrays(m)) for m in mats]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="resets the peak RSS through /proc")
@pytest.mark.parametrize("job", ["load q8_0 default", "load q4_0 default", "load q4_0 mapped", "export 1",
                                 "export 2", "export 3"])
def test_quantizing_or_exporting_a_file_never_holds_all_of_it(tmp_path, job):
    """A model quantized on load (`--quantize`; a file this size is read into memory by default) or exported
    is read once: its file is mapped and each fp32 tensor's pages handed back once it is checked, quantized or
    written, so the peak is the quantized copy and about one fp32 matrix (before: the whole file beside the
    copy, and the Q8_0 quantizer's temporaries each the size of the matrix)."""
    args = tiny_args(dim=1024, hidden_dim=4096, n_layers=1, n_heads=8, n_kv_heads=8, vocab_size=512,
                     shared_classifier=False)
    path = tmp_path / "m.bin"
    formats.save(random_weights(args), path, version=1)
    fp32 = formats.load(path)
    kind = {"export 1": None, "export 2": "q8_0", "export 3": "q4_0"}.get(job, job.split()[-2])
    kept = sum(_matrix_bytes(fp32.quantize_as(kind))) if kind else 0
    [peak], size = run_memory_script(READ_ONCE_PEAK, str(path), job, str(tmp_path / "out.bin")), path.stat().st_size
    assert size > 60e6 and peak < kept + max(_matrix_bytes(fp32)) + 16 * 2**20, (peak, kept, size)


def test_q8_quantizer_gives_the_same_values_a_few_rows_at_a_time(monkeypatch):
    """quantize_q80 goes through a matrix a few MiB of rows at a time: the same values and scales as in one go,
    a partial last chunk included."""
    w = np.random.default_rng(5).standard_normal((37, 256)).astype(np.float32)
    w[3, 64:128] = 0  # an all-zero group
    whole = formats.quantize_q80(w, 64)
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK_BYTES", 5 * 4 * 256)  # five rows a chunk: eight chunks
    chunked = formats.quantize_q80(w, 64)
    np.testing.assert_array_equal(chunked.q, whole.q)
    np.testing.assert_array_equal(chunked.s, whole.s)
    assert whole.s[3, 1] == 0 and chunked.q.dtype == np.int8 and chunked.s.dtype == np.float32


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_16_bit_weights_are_checked_for_nan_and_inf_on_their_bits(kind, monkeypatch):
    """all_finite reads fp16 and bf16 matrices' bits a chunk at a time: Inf and NaN of either sign are found
    anywhere (the last chunk included, and in a strided view), the largest finite values, subnormals and -0
    pass."""
    monkeypatch.setattr(formats, "QUANTIZE_CHUNK_BYTES", 64)  # chunks of 32 values: 7 for 200
    bits = {"f16": {"inf": 0x7C00, "nan": 0x7E00, "max": 0x7BFF}, "bf16": {"inf": 0x7F80, "nan": 0x7FC0, "max": 0x7F7F}}

    def matrix(values: np.ndarray):
        u = values.reshape(10, 20)
        return u.view(np.float16) if kind == "f16" else formats.BF16Tensor(u)

    base = np.full(200, 0x3C00 if kind == "f16" else 0x3F80, dtype=np.uint16)  # 1.0
    base[[3, 4, 5]] = [0x0001, 0x8000, bits[kind]["max"] | 0x8000]
    assert formats.all_finite(matrix(base))
    base[6] = bits[kind]["max"]
    assert formats.all_finite(matrix(base))
    for at in (0, 31, 32, 199):
        for bad in ("inf", "nan"):
            for sign in (0, 0x8000):
                m = base.copy()
                m[at] = bits[kind][bad] | sign
                assert not formats.all_finite(matrix(m)), (at, bad, sign)
    strided = base.copy()
    strided[42] = bits[kind]["inf"]  # row 4, column 2 of (20, 10): among the even columns
    view = strided.reshape(20, 10)[:, ::2]
    assert not formats.all_finite(view.view(np.float16) if kind == "f16" else formats.BF16Tensor(view))


def test_rounding_to_bf16_is_pytorchs():
    """to_bf16 rounds as PyTorch does: to nearest, ties to even (both ways), the largest values to infinity, NaN
    and infinities kept, across the whole exponent range; a few rows at a time."""
    torch = pytest.importorskip("torch")
    gen = np.random.default_rng(3)
    x = (gen.standard_normal((300, 80)) * np.logspace(-44, 38, 80)).astype(np.float32)
    ties = (gen.integers(0, 0x7F7F, 80).astype(np.uint32) << 16) | 0x8000  # halfway: even and odd below
    x[1] = ties.view(np.float32)
    x[2] = (ties | 0x80000000).view(np.float32)
    x[0, :7] = [np.nan, -np.nan, np.inf, -np.inf, 3.4028235e38, -0.0, 1e-45]
    x[0, 7] = np.array([0x7F800001], np.uint32).view(np.float32)[0]  # a NaN whose rounding would carry
    ours = formats.to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    values = ~np.isnan(x)
    np.testing.assert_array_equal(ours.bits[values], theirs[values])
    assert np.isnan(formats.bf16_to_f32(ours.bits[0, [0, 1, 7]])).all()
    assert (formats.bf16_to_f32(ours.bits[1]) != x[1]).all()  # the ties did move


def test_quantize_f16_refuses_weights_beyond_its_range(tmp_path):
    """`--quantize f16` on weights fp16 cannot hold: one line that says to use bf16, exit 1; bf16 runs them."""
    from conftest import byte_tokenizer, run_cli

    w = random_weights(tiny_args(), seed=2)
    w.w2[1][3, 4] = 7e4
    formats.save(w, tmp_path / "m.bin")
    byte_tokenizer().save(tmp_path / "tokenizer.bin")
    argv = ("run", str(tmp_path / "m.bin"), "-n", "8", "-t", "0", "--quantize")
    r = run_cli(*argv, "f16")
    assert r.returncode == 1 and r.stderr.decode().strip().count("\n") == 0
    assert "beyond fp16's range" in r.stderr.decode() and "bf16" in r.stderr.decode()
    assert run_cli(*argv, "bf16").returncode == 0


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_quantize_to_16_bits_rounds_every_matrix(tmp_path, kind):
    """`--quantize f16|bf16` on an fp32 file: every matrix, the embedding table and the classifier rounded to
    nearest (NumPy's fp16 rounding; to_bf16, PyTorch's), norms kept in fp32; the native kernels then give
    exactly the logits of the fp32 model holding the rounded values."""
    from conftest import engine_logits

    from babyllama import kernels
    from babyllama.loading import open_model

    w = random_weights(tiny_args(shared_classifier=False), seed=4, scale=0.2)
    formats.save(w, tmp_path / "m.bin")
    got = open_model(tmp_path / "m.bin", quantize=kind).weights
    assert got.kinds() == kind and formats.quant_kind(got.tok_embeddings) == kind and not got.quantized

    def rounded(m: np.ndarray) -> np.ndarray:
        return m.astype(np.float16).astype(np.float32) if kind == "f16" else formats.to_bf16(m).dequantize()

    for name in formats.LAYER_MATRICES:
        for a, b in zip(getattr(got, name), getattr(w, name), strict=True):
            np.testing.assert_array_equal(formats.dense(a), rounded(b))
            assert not np.array_equal(formats.dense(a), b)
    np.testing.assert_array_equal(formats.dense(got.wcls), rounded(w.wcls))
    np.testing.assert_array_equal(got.rms_ffn, w.rms_ffn)
    if kernels.backend().name != "native":
        pytest.skip("the 16-bit = fp32 exactness is the native kernels'")
    tokens = list(range(1, 30))
    np.testing.assert_array_equal(engine_logits(got, tokens), engine_logits(got.to_fp32(), tokens))


def test_the_small_groups_note_is_given_once_and_only_where_q8_0_is_made(tmp_path):
    """A shape that leaves Q8_0 groups of 1 gets one note when Q8_0 is made from a Hugging Face folder, with
    --quantize q8_0 or q4_0 (w2's rows of 45 fall back to Q8_0): none for f16 or bf16, which make no Q8_0, and
    one for q4_0 (its matrices, quantized on load, were noted a second time)."""
    from conftest import byte_tokenizer, run_cli

    model, tok = tmp_path / "m.bin", tmp_path / "tokenizer.bin"
    formats.save(random_weights(tiny_args(dim=32, hidden_dim=45)), model)
    byte_tokenizer(300).save(tok)
    assert run_cli("export", str(tmp_path / "hf"), "--model", str(model), "-z", str(tok)).returncode == 0
    for kind, notes in (("f16", 0), ("bf16", 0), ("q8_0", 1), ("q4_0", 1)):
        proc = run_cli("run", str(tmp_path / "hf"), "--quantize", kind, "-t", "0", "-n", "3")
        err = proc.stderr.decode()
        assert proc.returncode == 0, err
        assert err.count("note: Q8_0 in groups of 1") == notes, (kind, err)
        assert notes == 0 or "more than f16's 2 and fp32's 4" in err
