"""benchmarks/llama2c_ref: our C re-implementation of llama2.c's run.c/runq.c, used as the speed baseline,
must compute what run.c computes: the same greedy tokens as babyllama (and run.c's golden text)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, assert_greedy_agree, random_weights, shared_file, tiny_args

from babyllama import formats
from babyllama.engine import Engine
from babyllama.generate import generate
from babyllama.sampler import Sampler
from babyllama.tokenizer import BOS, Tokenizer

SOURCE = ROOT / "benchmarks" / "llama2c_ref" / "llama2c_ref.c"


@pytest.fixture(scope="module")
def llama2c_ref(tmp_path_factory) -> Path:
    """The reference binary, built with run.c's recommended line (OpenMP dropped if the compiler lacks it)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) on PATH to build benchmarks/llama2c_ref")
    exe = tmp_path_factory.mktemp("llama2c_ref") / "llama2c_ref"
    for flags in (["-Ofast", "-march=native", "-fopenmp"], ["-Ofast", "-march=native"], ["-O3"]):
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(exe), "-lm"], capture_output=True, text=True)
        if proc.returncode == 0:
            return exe
    pytest.fail(f"llama2c_ref.c does not compile:\n{proc.stderr}")


def run_ref(exe: Path, model: Path, steps: int, prompt: list[int] = ()) -> list[int]:
    cmd = [str(exe), str(model), "-n", str(steps)]
    if prompt:
        cmd += ["-i", ",".join(map(str, prompt))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "achieved tok/s:" in proc.stderr
    return [int(t) for t in proc.stdout.split()]


def greedy(weights: formats.Weights, prompt: list[int], steps: int, plain: bool = False) -> list[int]:
    # an fp32 KV cache, as run.c and runq.c keep (the default for quantized weights is fp16, whose rounding
    # runq.c's exact comparisons would see)
    return list(generate(Engine(weights, plain=plain, kv_cache="f32"), prompt, steps, Sampler(0.0)))


def test_fp32_matches_babyllama_and_run_c_golden(llama2c_ref):
    model = shared_file("fixtures/stories260K.bin")
    tok = Tokenizer.load(shared_file("fixtures/tok512.bin"), 512)
    golden = shared_file("fixtures/golden/s260k_t0_n200.txt").read_bytes()
    ids = run_ref(llama2c_ref, model, 200)
    assert ids == greedy(formats.load(model), [BOS], 200)
    assert len(ids) == 200
    # run.c's stdout for the same run: each piece decoded after its predecessor, then "\n"
    seq = [BOS, *ids]
    assert b"".join(tok.decode_piece(a, b) for a, b in zip(seq, seq[1:])) + b"\n" == golden


def test_fp32_with_prompt(llama2c_ref):
    model = shared_file("fixtures/stories260K.bin")
    tok = Tokenizer.load(shared_file("fixtures/tok512.bin"), 512)
    prompt = tok.encode("Once upon a time, a little dog", bos=True)
    golden = shared_file("fixtures/golden/s260k_t0_n120_dog.txt").read_bytes()
    ids = run_ref(llama2c_ref, model, 120, prompt[1:])
    assert ids == greedy(formats.load(model), prompt, 120)
    seq = prompt + ids
    assert b"".join(tok.decode_piece(a, b) for a, b in zip(seq, seq[1:])) + b"\n" == golden


def test_q8_0_matches_babyllama_plain_path(llama2c_ref, tmp_path):
    """runq.c's integer arithmetic: the greedy ids equal babyllama's plain Q8_0 path up to the first near-tie.
    The int8 products are exact, but the float sums of the group products run in another order (and the
    compiler may vectorize them differently on AVX2 and AVX-512 CPUs), so a late divergence is allowed where
    the two best logits lie within 0.1 of each other (logits reach ~22 here; measured at the divergence seen
    on an AVX-512 CPU, token 195: 0.035)."""
    model = shared_file("fixtures/stories260K.bin")
    formats.save(formats.load(model), tmp_path / "q.bin", version=2, group_size=4)
    weights = formats.load(tmp_path / "q.bin")
    ids = run_ref(llama2c_ref, tmp_path / "q.bin", 200)
    ours = greedy(weights, [BOS], 200, plain=True)
    plain = Engine(weights, plain=True, kv_cache="f32")
    plain_logits = lambda i: plain.forward([BOS, *ours[:i]], range(i + 1), plain.new_cache(),  # noqa: E731
                                           logits="last")[-1]
    same = assert_greedy_agree(ids, ours, plain_logits, max_margin=0.1, min_same=50)
    print(f"llama2c_ref Q8_0 greedy ids equal babyllama's plain Q8_0 path for {same} of {len(ours)} tokens")


@pytest.mark.parametrize("version", [1, 2])
def test_header_extension_and_unshared_classifier(llama2c_ref, tmp_path, version):
    """Versions 1/2 with an unshared classifier, grouped-query attention and non-default rope_theta and
    norm_eps (the babyllama header extension): same greedy ids; zeroing either field changes them."""
    args = tiny_args(shared_classifier=False, rope_theta=500000.0, norm_eps=1e-3)
    path = tmp_path / "m.bin"
    formats.save(random_weights(args, seed=1, scale=0.2), path, version=version, group_size=8)
    prompt = [BOS, 5, 70, 200]
    ids = run_ref(llama2c_ref, path, 64, prompt[1:])
    assert ids == greedy(formats.load(path), prompt, 64, plain=True)
    assert len(ids) == 64 - len(prompt) + 1
    data = path.read_bytes()
    for offset in (48, 56):
        patched = bytearray(data)
        struct.pack_into("<d", patched, offset, 0.0)
        (tmp_path / "patched.bin").write_bytes(patched)
        assert run_ref(llama2c_ref, tmp_path / "patched.bin", 64, prompt[1:]) != ids


def test_version0_unshared_classifier(llama2c_ref, tmp_path):
    """run.c's legacy layout with a negative vocab_size (unshared classifier after the RoPE tables)."""
    args = tiny_args(shared_classifier=False)
    path = tmp_path / "m.bin"
    formats.save(random_weights(args, seed=2, scale=0.2), path, version=0)
    prompt = [BOS, 9, 40]
    assert run_ref(llama2c_ref, path, 64, prompt[1:]) == greedy(formats.load(path), prompt, 64, plain=True)


def test_bench_reference_rows_and_ratios(llama2c_ref, tmp_path, monkeypatch):
    """`babyllama bench --reference RUN --reference-q RUNQ` times the C program with run.c's command line on
    version-0 and version-2 files of the same models and prints its rows and the babyllama / C ratios
    (plumbing only: no speed is asserted)."""
    from babyllama import bench

    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_seq_len=32))
    plan = bench.Plan(["tiny"], ("fp32", "q8_0"), rounds=1, tokens=16, batch=2, prompt_len=8, paths=("fast",),
                      references={"run.c": str(llama2c_ref), "runq.c": str(llama2c_ref)}, bandwidth_mib=8)
    rows, bandwidth = bench.run(plan, tmp_path, log=lambda m: None)
    refs = [r for r in rows if r.engine in ("run.c", "runq.c")]
    assert [(r.engine, r.fmt) for r in refs] == [("run.c", "fp32"), ("runq.c", "q8_0")]
    assert all(r.error is None and r.result["decode"] > 0 for r in refs)
    if bench.cpu_ticks() is not None:  # Linux: each row's rounds say the CPU time stolen while they ran
        assert all(len(r.result["steals"]) == 1 and 0 <= r.result["steals"][0] <= 1 for r in refs)
    assert formats.read_header(tmp_path / "random-tiny-fp32-v0.bin")[1] == 0  # what run.c reads
    text = bench.table(rows, 2, 8, bandwidth)
    assert "| tiny | fp32 | run.c |" in text and "| tiny | Q8_0 | babyllama |" in text
    assert "decode speed of babyllama / reference: tiny fp32 vs run.c " in text and "tiny Q8_0 vs runq.c" in text
