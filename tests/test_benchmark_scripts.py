"""The Python measuring scripts beside bench (benchmarks/gguf_files.py, benchmarks/quality.py): their flags'
mistakes are one line each, said before any model is built or loaded, and their files are named like bench's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from babyllama import bench

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
    assert path.name == f"{bench.model_stem(bench.BUILTIN)}-Q4_K_M.gguf" and path.name.startswith("builtin-")
    assert gguf_files.quantized_file(Path("/cache"), "15M", "Q6_K").name == "random-15M-Q6_K.gguf"
    row = gguf_files.failed_row("15M", "Q6_K", "it broke")
    assert row.count("|") == gguf_files.HEADER.count("|") and "failed: it broke" in row


@pytest.mark.parametrize("flags, message", [
    (["--max-stories", "0"], "--max-stories must be >= 1"),
    (["--data", "missing.txt"], "--data missing.txt: no such file"),
    (["--model", "model.bin"], "no tokenizer"),
    (["--model", "absent.bin"], "--model absent.bin: no such file"),
])
def test_quality_refuses_bad_flags_in_one_line(tmp_path, flags, message):
    (tmp_path / "valid.txt").write_text("Once upon a time.\n")
    (tmp_path / "model.bin").write_bytes(b"")
    data = [] if "--data" in flags else ["--data", str(tmp_path / "valid.txt")]
    out = script("quality.py", *data, *flags, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr and out.stderr.count("\n") == 1
    assert not out.stdout  # no table begun
