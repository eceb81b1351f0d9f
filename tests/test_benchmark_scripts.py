"""The Python measuring scripts beside bench (benchmarks/gguf_files.py, quality.py, decode_windows.py,
speculative.py, finetune_memory.py, serve.py, prefetch_distances.py): their flags' mistakes are one line each
(argparse's usage and one), said before any model is built or loaded, and their files are named like bench's."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import crashing_program, require_llama_cpp

from babyllama import bench, kernels_native

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "BABYLLAMA_BENCH_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("flags, message", [
    (["--shape", "7B"], "unknown --shape 7B"),
    (["--tokens", "0"], "--tokens must be from 2"),
    (["--shape", "15M", "--tokens", "300"], "the 15M model's context (256)"),
    (["--dir", ""], "--dir is empty"),  # it fell back on the bench cache
    pytest.param(["--types", "Q4_0,q4_0"], "--types: unknown llama.cpp file type q4_0; choose from",
                 marks=pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                          reason="llama-cpp-python (the bench extra) is not installed: its file "
                                                 "types are what --types is checked against")),
])
def test_gguf_files_refuses_bad_flags_in_one_line(tmp_path, flags, message):
    out = script("gguf_files.py", *flags, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing built


def test_gguf_files_names_the_quantized_files_like_bench_does(monkeypatch):
    """The built-in model's files are keyed on its content, as bench's fp32 GGUF of it beside them is."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gguf_files

    path = gguf_files.quantized_file(Path("/cache"), bench.BUILTIN, "Q4_K_M")
    assert path.name == f"{bench.model_stem(bench.BUILTIN)}-llamacpp-Q4_K_M.gguf" and path.name.startswith("builtin-")
    assert gguf_files.quantized_file(Path("/cache"), "15M", "Q6_K").name == "random-15M-llamacpp-Q6_K.gguf"
    # bench's own (bench.gguf_file): random-15M-q4_0.gguf, not one file with llama.cpp's where names ignore case
    assert gguf_files.quantized_file(Path("/c"), "15M", "Q4_0").name.lower() != "random-15m-q4_0.gguf"
    row = gguf_files.failed_row("15M", "Q6_K", "it broke")
    assert row.count("|") == gguf_files.HEADER.count("|") and "failed: it broke" in row


@pytest.mark.parametrize("flags, message", [
    (["--max-stories", "0"], "--max-stories must be >= 1"),
    (["--data", "missing.txt"], "--data missing.txt: no such file"),
    (["--model", "model.bin"], "no tokenizer"),
    (["--model", "absent.bin"], "--model absent.bin: no such file"),
    pytest.param(["--gguf-types", "Q4_K_M,Q9_X"], "--gguf-types: unknown llama.cpp file type Q9_X; choose from",
                 marks=pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                          reason="llama-cpp-python (the bench extra) is not installed: its file "
                                                 "types are what --gguf-types is checked against")),
])
def test_quality_refuses_bad_flags_in_one_line(tmp_path, flags, message):
    (tmp_path / "valid.txt").write_text("Once upon a time.\n")
    (tmp_path / "model.bin").write_bytes(b"")
    data = [] if "--data" in flags else ["--data", str(tmp_path / "valid.txt")]
    out = script("quality.py", *data, *flags, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr and out.stderr.count("\n") == 1
    assert not out.stdout  # no table begun


def test_quality_reads_each_models_tokenizer_before_evaluating_any(tmp_path):
    """A damaged --model tokenizer was found after the built-in model and stories260K had been evaluated."""
    from conftest import random_weights, tiny_args

    from babyllama import formats

    (tmp_path / "valid.txt").write_text("Once upon a time.\n")
    formats.save(random_weights(tiny_args()), tmp_path / "m.bin")
    (tmp_path / "tok.bin").write_bytes(b"garbage!")
    out = script("quality.py", "--data", str(tmp_path / "valid.txt"), "--gguf-types", "", "--model",
                 f"{tmp_path / 'm.bin'}:{tmp_path / 'tok.bin'}", cwd=tmp_path)
    assert out.returncode == 1 and "tok.bin" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert not out.stdout  # no table begun


@pytest.mark.parametrize("name, flags, message", [
    ("speculative.py", ["t.bin", "d.bin", "-z", "tok.bin", "-k", "0"], "-n and -k must be >= 1"),
    ("speculative.py", ["t.bin", "d.bin", "-z", "tok.bin", "-n", "0"], "-n and -k must be >= 1"),
    ("speculative.py", ["absent.bin", "d.bin", "-z", "tok.bin"], "speculative.py: error: model file not found"),
    ("finetune_memory.py", ["--steps", "0"], "--steps must be >= 1"),
    ("serve.py", ["--shapes", "15m"], "--shapes takes 15M"),
    ("serve.py", ["--formats", "q5_0"], "--formats takes fp32, q8_0, q4_0, got q5_0"),
    ("serve.py", ["--tokens", "0"], "--tokens must be >= 1"),
    ("prefetch_distances.py", ["m.bin", "--distances", "0,x"], "expected comma-separated byte counts, got '0,x'"),
    ("prefetch_distances.py", ["m.bin", "--distances", "-1"], "distances lie in [0, 1048576] bytes"),
    ("prefetch_distances.py", ["m.bin", "--rounds", "0"], "--rounds must be from 1"),
    ("prefetch_distances.py", ["absent.bin"], "prefetch_distances.py: error: model file not found"),
    ("prefetch_distances.py", [str(ROOT / "babyllama" / "assets" / "model.bin"), "--tokens", "1000"],
     "--tokens 1000 is past the model's context (512)"),
])
def test_the_other_scripts_refuse_bad_flags_without_a_traceback(tmp_path, name, flags, message):
    """-k 0 printed an acceptance of 0/0 or divided by zero, -n 0 divided by zero, --steps 0 ran two 110M
    fine-tunes to report a peak of 0 MiB, serve.py's unknown names were KeyError tracebacks."""
    if name == "serve.py":
        pytest.importorskip("httpx")
    out = script(name, *flags, cwd=tmp_path)
    assert out.returncode in (1, 2) and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "cache").exists()  # nothing built


def test_prefetch_distances_decodes_the_model_at_each_distance_in_turn(tmp_path):
    """The script sets each distance through the kernels' hook between decodes of the one engine: a row per
    distance, with as many rounds as asked."""
    if kernels_native.load() is None:
        pytest.skip("no C kernels here (no C compiler): the script measures them alone")
    out = script("prefetch_distances.py", str(ROOT / "babyllama" / "assets" / "model.bin"), "--distances", "0,64",
                 "--rounds", "2", "--tokens", "8", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    head, *rows = out.stdout.splitlines()
    assert re.fullmatch(r"\S+: a decode step of this model prefetches \d+ bytes ahead by default \(for weights in the "
                        r"cache \d+, from memory \d+; last-level cache \d+ MiB(: not known here)?\)", head)
    assert [r.split()[0] for r in rows] == ["0", "64"]
    assert all(re.fullmatch(r" *\d+ bytes: +[\d.]+ tok/s \(rounds: [\d.]+ [\d.]+\)", r) for r in rows), rows


@pytest.mark.parametrize("flags, message", [
    (["--shape", "7B"], "unknown --shape 7B"),
    (["--formats", "q8_0,q5_0"], "unknown format 'q5_0' in --formats"),
    (["--formats", "q8_0.safetensors"], "unknown format 'q8_0.safetensors'"),
    (["--formats", "q8_0,llama.cpp:q8_0.gguf"], "unknown format 'llama.cpp:q8_0.gguf'"),
    (["--formats", "llama.cpp:q5_0"], "unknown format 'llama.cpp:q5_0'"),
    (["--shape", "15M", "--tokens", "255"], "--tokens must be from 2 to 254"),
    (["--steady", "0"], "--steady must lie between 0 and 1"),
])
def test_decode_windows_refuses_bad_flags_in_one_line(tmp_path, flags, message):
    out = script("decode_windows.py", *flags, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "cache").exists()  # nothing built


def test_decode_windows_compares_a_decode_only_with_steady_probes_of_its_own_phase(monkeypatch):
    """A decode counts against the mean of the probes just before and after it, and only where those agree (the
    memory did not change phase under it); the ratio of formats comes from rounds whose probes all agree."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import decode_windows

    rounds = [  # probe, then (format, tok/s, GB/s, probe after) per format
        [30.0, ("a", 100.0, 27.0, 30.0), ("b", 190.0, 30.0, 30.0)],  # slow, steady: 90%, 100%; b/a 1.9
        [60.0, ("a", 150.0, 45.0, 60.0), ("b", 240.0, 36.0, 60.0)],  # fast, steady: 75%, 60%; b/a 1.6
        [30.0, ("a", 120.0, 40.0, 60.0), ("b", 250.0, 50.0, 60.0)],  # a between 30 and 60: not counted
    ]
    lines = decode_windows.summary(rounds, ["a", "b"], steady=0.1, fast=45.0)
    assert lines[0] == "3 rounds, 9 probes: median 60.0 GB/s, 5 at or above 45.0 (fast phase)"
    assert "a fast: 1 decodes between steady probes, 75% of the probe (range 75-75%)" in lines
    assert "a slow: 1 decodes between steady probes, 90% of the probe (range 90-90%)" in lines
    assert "b fast: 2 decodes between steady probes, 72% of the probe (range 60-83%)" in lines
    assert "b slow: 1 decodes between steady probes, 100% of the probe (range 100-100%)" in lines
    assert "b / a tok/s, fast rounds with steady probes: median 1.60x over 1 (range 1.60-1.60)" in lines
    assert "b / a tok/s, slow rounds with steady probes: median 1.90x over 1 (range 1.90-1.90)" in lines
    assert decode_windows.summary(rounds, ["a", "b"], steady=0.1)[0] == (  # the line: between 30 and 60
        "3 rounds, 9 probes: median 60.0 GB/s, 5 at or above 45.0 (fast phase)")
    assert decode_windows.phase([30.0, 40.0], 0.1, 45.0) is None
    assert decode_windows.phase([44.0, 46.0], 0.1, 45.0) is None  # steady, but on both sides of the line


def test_decode_windows_runs_a_round_of_each_format(tmp_path):
    out = script("decode_windows.py", "--shape", "builtin", "--formats", "q8_0,q4_0.gguf", "--seconds", "0",
                 "--tokens", "16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rounds, summary = out.stdout.split("\n\n")
    assert re.fullmatch(r"\d\d:\d\d:\d\d  probe +[\d.]+ \| q8_0 +[\d.]+ tok/s +[\d.]+ GB/s \| probe +[\d.]+ \| "
                        r"q4_0.gguf +[\d.]+ tok/s +[\d.]+ GB/s \| probe +[\d.]+", rounds)
    assert summary.startswith("1 rounds, 3 probes: median ")


def test_decode_windows_times_llama_cpp_on_the_gguf_file_beside_ours(tmp_path):
    """llama.cpp:FMT decodes bench's FMT.gguf in llama.cpp, between the same probes as babyllama's rows."""
    require_llama_cpp()
    out = script("decode_windows.py", "--shape", "builtin", "--formats", "q8_0.gguf,llama.cpp:q8_0", "--seconds",
                 "0", "--tokens", "16", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rounds, summary = out.stdout.split("\n\n")
    assert re.fullmatch(r"\d\d:\d\d:\d\d  probe +[\d.]+ \| q8_0.gguf +[\d.]+ tok/s +[\d.]+ GB/s \| probe +[\d.]+ \| "
                        r"llama.cpp:q8_0 +[\d.]+ tok/s +[\d.]+ GB/s \| probe +[\d.]+", rounds)
    assert summary.startswith("1 rounds, 3 probes: median ")
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.suffix == ".gguf"] == [
        f"{bench.model_stem(bench.BUILTIN)}-q8_0.gguf"]  # one file, read by both


def test_decode_windows_says_in_one_line_that_llama_cpp_crashes_here(tmp_path, monkeypatch):
    """llama.cpp is tried in a child process before it decodes in the script's own: where it crashes (some
    llama-cpp-python builds do on some CPUs), the script ends with one line saying so, not with a segfault."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import decode_windows

    from babyllama import kernels_native

    monkeypatch.setattr(bench.sys, "executable", crashing_program(tmp_path / "crashing-python"))
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: {"avx2"})
    with pytest.raises(bench.BabyLlamaError, match=r"^llama\.cpp cannot decode .*-q8_0\.gguf on this machine: "
                                                   r"killed by SIGSEGV$"):
        decode_windows.open_format("llama.cpp:q8_0", bench.BUILTIN, 16, tmp_path)
    monkeypatch.setattr(kernels_native, "cpu_flags", lambda: {"avx2", "amx_int8"})  # the known cause, named
    with pytest.raises(bench.BabyLlamaError, match=r": killed by SIGSEGV; llama\.cpp's AMX products crash on some "
                                                   r"Xeons: build llama-cpp-python without them \(docs/speed\.md"):
        decode_windows.open_format("llama.cpp:q8_0", bench.BUILTIN, 16, tmp_path)
