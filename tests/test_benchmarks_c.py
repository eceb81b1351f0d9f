"""The C benchmarks (benchmarks/kernel_rates.c, benchmarks/decode_rates.c) declare what they call in
csrc/kernels.c themselves (benchmarks/kernels_c_api.h): they are built against today's kernels.c and run on
small sizes, so that a change of a signature or of the Mat layout shows here, not when someone next measures."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import cpu_has

from babyllama import kernels_native

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Build a benchmark (its name without .c) and return its executable's path."""
    cc = kernels_native.compiler()
    if cc is None:
        pytest.skip("no C compiler: the C benchmarks cannot be built here")
    out = tmp_path_factory.mktemp("benchmarks")
    kernels = kernels_native.build()  # the library babyllama runs (cached), rather than compiling kernels.c again
    if kernels is None:
        pytest.skip("the native kernels do not build here")

    def make(name: str) -> Path:
        exe = out / name
        subprocess.run([cc, "-O2", "-march=native", str(BENCHMARKS / f"{name}.c"), str(kernels), "-o", str(exe),
                        "-lm"], check=True)
        return exe

    return make


def _run(exe: Path, *args: str) -> str:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, check=True, timeout=120).stdout


def test_kernel_rates_measures_every_weight_type(build):
    out = _run(build("kernel_rates"), "64", "256", "1", "012345", "3")
    rates = re.findall(r"^  (.+?)\s+([18]) token\(s\):\s+([\d.]+) us\s+([\d.]+) GB/s", out, re.M)
    types = ["fp32", "Q8_0 (runq.c, gs 64)", "Q8_0 (llama.cpp blocks)", "Q4_0"]
    types += ["Q4_0 regrouped", "Q8_0 regrouped"] if cpu_has("avx2") else []  # none without AVX2
    assert [(name.strip(), int(t)) for name, t, _, _ in rates] == [(name, t) for name in types for t in (1, 8)]
    assert all(float(us) > 0 and float(gbs) > 0 for _, _, us, gbs in rates)


def test_decode_rates_runs_a_decode_tokens_products(build):
    out = _run(build("decode_rates"), "15M", "1", "1")
    steps = re.findall(r"^  (.+?)\s+1 thread\(s\) 1 token\(s\):\s+([\d.]+) ms\s+([\d.]+) GB/s", out, re.M)
    names = ["Q8 (runq.c)", "Q8_0 blocks", "Q4_0", "Q4_0 regrouped", "Q8_0 regrouped", "Q8 packed"]
    assert [name.strip() for name, _, _ in steps] == names
    assert all(float(ms) > 0 and float(gbs) > 0 for _, ms, gbs in steps)


def test_kernel_rates_takes_runq_c_group_size_and_refuses_partial_rows(build):
    """Rows of 288 (the 15M shape) are groups of 32 in runq.c; N off the blocks' 32 would time part of a row."""
    exe = build("kernel_rates")
    assert "Q8_0 (runq.c, gs 32)" in _run(exe, "64", "288", "1", "1", "3")
    out = subprocess.run([str(exe), "64", "100", "1", "1", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "N a positive multiple of 32" in out.stderr and not out.stdout


def test_kernel_rates_times_only_the_types_asked_for(build):
    """TYPES picks weight types; a digit outside 0-5 (which timed nothing) or no digit at all is refused."""
    exe = build("kernel_rates")
    assert re.findall(r"^  (.+?)\s+1 token", _run(exe, "64", "256", "1", "03", "3"), re.M) == ["fp32", "Q4_0"]
    for bad in ("06", "9", "x", ""):
        res = subprocess.run([str(exe), "64", "256", "1", bad, "3"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "TYPES must be digits 0-5" in res.stderr and not res.stdout


def test_decode_rates_refuses_a_shape_it_does_not_know(build):
    out = subprocess.run([str(build("decode_rates")), "7B", "1", "1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown shape 7B" in out.stderr and not out.stdout


def test_decode_rates_times_only_the_types_asked_for(build):
    """TYPES picks weight types (the 1B shape's six take ~5 GB); anything but digits 1-6 is refused."""
    exe = build("decode_rates")
    out = _run(exe, "15M", "1", "1", "16", "45")
    assert re.findall(r"^  (.+?)\s+1 thread", out, re.M) == ["Q4_0 regrouped", "Q8_0 regrouped"]
    for bad in ("47", "x", ""):
        res = subprocess.run([str(exe), "15M", "1", "1", "16", bad], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "TYPES must be digits 1-6" in res.stderr and not res.stdout


def test_memory_windows_pairs_the_probe_with_a_decode_steps_rates():
    """benchmarks/memory_windows.sh reads decode_rates' lines: each of its lines has the probe's GB/s and every
    weight type's (a change of decode_rates' output shows here)."""
    import os
    import shutil
    import sys

    if shutil.which("cc") is None:
        pytest.skip("no cc: the script builds decode_rates with it")
    def windows(*args: str) -> list[str]:
        proc = subprocess.run(["bash", str(BENCHMARKS / "memory_windows.sh"), "1", "15M", *args],
                              capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines and all(re.fullmatch(r"\d\d:\d\d:\d\d probe [\d.]+ \| (\S+ [\d.]+  )+", line) for line in lines)
        return lines[0].split("| ")[1].split()[::2]

    assert windows() == ["Q8_(runq.c)", "Q8_0_blocks", "Q4_0", "Q4_0_regrouped", "Q8_0_regrouped", "Q8_packed"]
    assert windows("45") == ["Q4_0_regrouped", "Q8_0_regrouped"]  # TYPES: decode_rates' own
