"""`babyllama run --raw-bytes` must print exactly what llama2.c's run.c prints (../shared/fixtures/golden); the
default output differs only where run.c drops bytes (characters sent as byte tokens), so on these ASCII
stories it is the same."""

from __future__ import annotations

import pytest
from conftest import run_cli, shared_file

GOLDEN = [
    ("s260k_t0_n200.txt", ["-t", "0", "-n", "200"]),
    ("s260k_t0_n120_dog.txt", ["-t", "0", "-n", "120", "-i", "Once upon a time, a little dog"]),
    ("s260k_t1_s42_n200.txt", ["-t", "1.0", "-s", "42", "-n", "200"]),
    ("s260k_t0.8_p0.9_s7_n256.txt", ["-t", "0.8", "-p", "0.9", "-s", "7", "-n", "256"]),
]


@pytest.mark.parametrize("output", ["--raw-bytes", "default"])
@pytest.mark.parametrize("name,flags", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_run_matches_run_c_byte_for_byte(name, flags, output):
    model = shared_file("fixtures/stories260K.bin")
    tok = shared_file("fixtures/tok512.bin")
    expected = shared_file(f"fixtures/golden/{name}").read_bytes()
    proc = run_cli("run", str(model), "-z", str(tok), *flags, *([output] if output != "default" else []))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == expected
    assert b"achieved tok/s:" in proc.stderr


def test_no_mmap_and_numpy_kernels_print_the_same_golden_text():
    """The same run.c output when the weights are read into memory and with the NumPy kernel backend."""
    model = shared_file("fixtures/stories260K.bin")
    tok = shared_file("fixtures/tok512.bin")
    expected = shared_file("fixtures/golden/s260k_t0_n200.txt").read_bytes()
    proc = run_cli("run", str(model), "-z", str(tok), "-t", "0", "-n", "200", "--no-mmap", "--raw-bytes",
                   env={"BABYLLAMA_KERNELS": "numpy"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == expected


def test_a_negative_seed_is_read_as_run_c_reads_it():
    """run.c keeps `atoi(-s)` in an unsigned 64-bit seed and replaces only 0 by the time: -s -5 is the seed
    2**64 - 5, the same story every time. Its output here, from llama2.c's run.c built from source (gcc -O3, and
    -Ofast -march=native -fopenmp alike): `./run stories260K.bin -z tok512.bin -s -5 -n 40`."""
    model, tok = shared_file("fixtures/stories260K.bin"), shared_file("fixtures/tok512.bin")
    proc = run_cli("run", str(model), "-z", str(tok), "-s", "-5", "-n", "40", "--raw-bytes")
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == (b"Once upon a time, there was a little boy named Tim. He liked to play with his toy cars "
                           b"and run around. One day, he w\n")
