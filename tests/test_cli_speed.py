"""End-to-end `babyllama run` speed flags on stories260K (run.c's goldens as the plain reference), and the
bench plumbing on a tiny model (no timing is asserted anywhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import byte_tokenizer, random_weights, run_cli, shared_file, tiny_args

from babyllama import bench, formats

GREEDY = ["-t", "0", "-n", "200"]


def golden(name: str) -> bytes:
    return shared_file(f"fixtures/golden/{name}").read_bytes()


def run(model: Path, tok: Path, *flags: str):
    proc = run_cli("run", str(model), "-z", str(tok), *flags)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_threads_and_draft_keep_run_c_output(stories260k, tok512):
    assert run(stories260k, tok512, *GREEDY, "--threads", "1").stdout == golden("s260k_t0_n200.txt")
    # the model as its own draft: greedy speculative output is the plain output, every draft accepted
    proc = run(stories260k, tok512, *GREEDY, "--draft", str(stories260k), "--draft-k", "3")
    assert proc.stdout == golden("s260k_t0_n200.txt")
    assert b"(100.0%)" in proc.stderr


def test_device_cpu_runs_the_pytorch_model(stories260k, tok512):
    pytest.importorskip("torch")
    assert run(stories260k, tok512, *GREEDY, "--device", "cpu").stdout == golden("s260k_t0_n200.txt")


def test_compile_without_the_pytorch_engine_is_one_line():
    proc = run_cli("run", "-n", "8", "--compile")
    assert proc.returncode == 1 and b"--compile works with the PyTorch engine only" in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_device_cuda_without_gpu_is_one_line(stories260k, tok512):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--device", "cuda")
    assert proc.returncode == 1 and b"no CUDA GPU is available" in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_quantize_on_load_fast_equals_plain(stories260k, tok512):
    flags = ["-t", "0", "-n", "60", "--quantize", "q8_0"]  # the plain Q8_0 path is slow: keep it short
    fast, plain = run(stories260k, tok512, *flags), run(stories260k, tok512, *flags, "--plain")
    assert fast.stdout == plain.stdout and len(fast.stdout) > 100


def test_batch_file_prints_each_sequence_like_a_single_run(stories260k, tok512, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\nOnce upon a time, a little dog\nThe sun\n", encoding="utf-8")
    proc = run(stories260k, tok512, "-t", "0", "-n", "120", "--batch-file", str(prompts))
    out = proc.stdout
    assert out.count(b"=== sequence ") == 3
    sections = out.split(b"=== sequence ")[1:]
    assert sections[1].startswith(b"2/3 (")
    body = sections[1].split(b"===\n", 1)[1]
    assert body == golden("s260k_t0_n120_dog.txt")  # the same text as a single run of that prompt
    assert b"aggregate over 3 sequences" in proc.stderr


def test_context_shift_goes_past_seq_len(tmp_path):
    # a random model (the story model ends its stories, with BOS, long before seq_len)
    model, tok = tmp_path / "m.bin", tmp_path / "tok.bin"
    formats.save(random_weights(tiny_args(max_seq_len=32), scale=0.3), model)
    byte_tokenizer().save(tok)
    plain = run(model, tok, "-t", "0", "-n", "0").stdout
    shifted = run(model, tok, "-t", "0", "-n", "100", "--context-shift", "--n-keep", "2").stdout
    # identical up to seq_len, then ~3x the positions (100 instead of 32) of text
    assert shifted.startswith(plain.rstrip(b"\n")) and len(shifted) > 2.5 * len(plain)
    rotated = run(model, tok, "-t", "0", "-n", "100", "--context-shift", "--n-keep", "2", "--rotate-keys").stdout
    assert rotated.startswith(plain.rstrip(b"\n")) and len(rotated) > 2.5 * len(plain)


@pytest.mark.parametrize("flags,message", [
    (["--batch-file", "/nonexistent/prompts.txt"], b"batch file not found"),
    (["--batch-file", "x", "--draft", "y"], b"cannot be combined"),
    (["--threads", "0"], b"--threads must be >= 1"),
    (["--draft-k", "0", "--draft", "x"], b"--draft-k must be >= 1"),
    (["-m", "chat", "--context-shift"], b"generate mode only"),
    (["--rotate-keys"], b"--rotate-keys works with --context-shift only"),
])
def test_bad_speed_flags(stories260k, tok512, flags, message):
    proc = run_cli("run", str(stories260k), "-z", str(tok512), *flags)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"babyllama: error: ") and message in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_draft_with_another_vocabulary_is_refused(stories260k, tok512, tmp_path):
    other = tmp_path / "other.bin"
    formats.save(random_weights(tiny_args()), other)
    proc = run_cli("run", str(stories260k), "-z", str(tok512), "--draft", str(other))
    assert proc.returncode == 1 and b"must share a tokenizer" in proc.stderr


def test_bench_rejects_unknown_shape():
    proc = run_cli("bench", "--shapes", "7B")
    assert proc.returncode == 1 and b"unknown shape(s) 7B" in proc.stderr


def test_bench_measures_a_model_and_renders_the_table(tmp_path):
    path = tmp_path / "tiny.bin"
    formats.save(random_weights(tiny_args()), path)
    rows = []
    for plain in (True, False):
        res = {fmt: bench.measure(path, plain, repeats=1, tokens=8, batch=2, prompt_len=16) for fmt in bench.FORMATS}
        rows.append({"shape": "tiny", "path": "plain" if plain else "fast", **res})
    for row in rows:
        for key in ("decode", "prefill", "batch", "ttft_ms", "rss_mib"):
            assert row["fp32"][key] > 0
    text = bench.table(rows, batch=2, prompt_len=16)
    assert text.count("| tiny |") == 2 and "plain NumPy" in text


def test_bench_on_the_pytorch_engine_measures_fp32_only(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32))
    rows = bench.run(["tiny"], repeats=1, tokens=8, batch=2, prompt_len=16, directory=tmp_path, device="cpu")
    assert [(r["path"], r["device"]) for r in rows] == [("fast", "cpu")] and "q8_0" not in rows[0]
    assert all(rows[0]["fp32"][key] > 0 for key in ("decode", "prefill", "batch", "ttft_ms"))
    line = [x for x in bench.table(rows, batch=2, prompt_len=16).splitlines() if x.startswith("| tiny |")][0]
    assert "babyllama --device cpu |" in line and line.count("| – |") == 3


def test_bench_builds_and_caches_models(tmp_path, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", dict(dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=16))
    first = bench.model_file("tiny", "q8_0", tmp_path)
    args, version, _, _ = formats.read_header(first)
    assert version == 2 and args.vocab_size == 32000 and args.dim == 32
    mtime = first.stat().st_mtime_ns
    assert bench.model_file("tiny", "q8_0", tmp_path).stat().st_mtime_ns == mtime  # cached, not rebuilt


def test_importing_babyllama_shortens_thread_spin_waits_unless_set():
    """The pools' spin-wait settings are read when NumPy/the kernels load: `import babyllama` must set them
    first, and leave a user's own values alone."""
    import os
    import subprocess
    import sys

    from babyllama.threads import WAIT_DEFAULTS

    show = "import babyllama, os, sys; print(os.environ['GOMP_SPINCOUNT'], os.environ['OPENBLAS_THREAD_TIMEOUT'], " \
           "'numpy' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in WAIT_DEFAULTS}
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [WAIT_DEFAULTS["GOMP_SPINCOUNT"], WAIT_DEFAULTS["OPENBLAS_THREAD_TIMEOUT"], "False"]
    env["GOMP_SPINCOUNT"] = "123"
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "123"


def test_q4_on_load_equals_the_version_3_file_and_the_plain_path(tmp_path):
    """The built-in model (dim 128, hidden 352: whole Q4_0 blocks): `--quantize q4_0` in memory, the same model
    exported as a version-3 file, and the plain reference path print the same greedy text."""
    flags = ["-t", "0", "-n", "60", "-i", "Once upon a time"]
    in_memory = run_cli("run", *flags, "--quantize", "q4_0")
    assert in_memory.returncode == 0, in_memory.stderr.decode()
    out, builtin = tmp_path / "q4.bin", Path(bench.__file__).parent / "assets" / "model.bin"
    exported = run_cli("export", str(out), "--model", str(builtin), "--version", "3")
    assert exported.returncode == 0, exported.stderr.decode()
    assert formats.read_header(out)[1] == 3 and out.stat().st_size < 0.15 * builtin.stat().st_size
    from_file = run_cli("run", str(out), *flags)
    plain = run_cli("run", *flags, "--quantize", "q4_0", "--plain")
    assert from_file.returncode == plain.returncode == 0
    assert in_memory.stdout == from_file.stdout == plain.stdout and len(in_memory.stdout) > 100
