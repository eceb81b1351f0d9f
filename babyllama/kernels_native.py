"""The C kernels (csrc/kernels.c), compiled on first use with the system C compiler and called through ctypes.

Why C: decode multiplies a few activation rows by every weight matrix, and the fastest way to do int8 products
on x86 is the byte multiply-add (VNNI's vpdpbusd, else AVX2's maddubs), which neither NumPy nor numba can emit;
fp32 decode needs the weights streamed at full memory bandwidth on every core; and a busy machine needs threads
that do not wait for each other at barriers (kernels.c's pool).

The shared library is built once per source version, compiler, flags and CPU (its feature flags and model:
a `-march=native` library built on one CPU is never loaded on another) and cached under
~/.cache/babyllama/native or $BABYLLAMA_CACHE/native, with its size and SHA-256 beside it: a library that does
not match them is built again rather than loaded. BABYLLAMA_NATIVE_ARCH picks the instruction set:
"native" (default: everything this CPU has, AVX-512 and VNNI included), "avx2" (x86-64-v3: the AVX2 paths,
also on an AVX-512 machine, which is how tests cover them), "avx2-vnni" (AVX2 with AVX-VNNI, as Intel's cores
without AVX-512 have it), "avx512" (x86-64-v4, no VNNI), "avx512-vnni" (no VBMI), or any other -march value.
Without a compiler, or with BABYLLAMA_NATIVE=0, `load()` returns None and kernels.py falls back to numba, then
NumPy; where the kernels were wanted, one line on stderr says why they are not used (no compiler: on the first run
only).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import numpy as np

from . import memory, sampler
from .errors import BabyLlamaError, first_line, say
from .formats import (
    PACKED_GROUP_SIZES,
    BF16Tensor,
    Matrix,
    QTensor,
    Weights,
    dense,
    is_fp32,
    is_quantized,
    matrix_arrays,
    table_rows,
)
from .kernels_base import check_step_lengths, kv_overflow, kv_q8_dtype, quantized_gemm
from .quant import BLOCK, BLOCK_BYTES, BlockTensor
from .safeio import cache_folder, current_umask, sweep_stale_temps
from .threads import explicit_threads, usable_cpus

SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
# The instruction sets a build can be forced to (BABYLLAMA_NATIVE_ARCH), each as the compiler flags to try in
# order (older compilers lack x86-64-v3) and the CPU features (as /proc/cpuinfo names them) it needs to run: AVX2
# alone; AVX2 with AVX-VNNI (Intel's cores without AVX-512 since Alder Lake); AVX-512 without VNNI (Skylake-X);
# AVX-512 with VNNI but without VBMI's byte permutes (Cascade Lake). Each
# has its own code paths (and, with those CPUs' tuning, its own compiler choices), so the tests run every one the
# CPU can.
AVX2_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe"}
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
ARCHES = {
    "native": ((["-march=native"],), set()),
    "avx2": ((["-march=x86-64-v3"], ["-march=haswell"]), AVX2_FLAGS),
    "avx2-vnni": ((["-march=x86-64-v3", "-mavxvnni"], ["-march=haswell", "-mavxvnni"]), AVX2_FLAGS | {"avx_vnni"}),
    "avx512": ((["-march=skylake-avx512"], ["-march=x86-64-v4"]), AVX512_FLAGS),
    "avx512-vnni": ((["-march=cascadelake"], ["-march=x86-64-v4", "-mavx512vnni"]), AVX512_FLAGS | {"avx512_vnni"}),
}

# Rows up to which an fp32 product uses the C kernel instead of BLAS: above, prompts are compute-bound and
# sgemm wins. (Decode steps of any size go through forward_step, which runs the kernel for every token.)
F32_KERNEL_MAX_ROWS = 8
# Rows at or above which a quantized product is dequantize + sgemm instead of the int8 kernel. The kernel
# reads each weight row once for 8 tokens at a time, so it keeps the lead up to ~32 tokens, and sgemm's
# arithmetic rate wins beyond (docs/speed.md, "Prompts").
QUANT_NATIVE_GEMM_MIN_ROWS = 48
# Builds whose int8 kernel outruns dequantize + sgemm on Q4_0 prompts, each with the shortest weight rows it
# takes them from. AVX-512 VNNI takes 64 multiply-adds an instruction, and a Q4_0 weight row is half the bytes
# of Q8_0, so every row length takes it. AVX2 reads the regrouped rows 8 blocks a step: it wins from rows of
# 256 values, and short rows (128) stay on sgemm. AVX2 with VNNI (avx2-vnni) wins on rows of every length (0.54-
# 0.87x sgemm's time, 128 to 2048 values). Measured in docs/speed.md ("Prompts").
INT8_Q4_PROMPT_MIN_COLS = {"avx512-vnni": 0, "avx2": 256, "avx2-vnni": 0}
# Builds whose int8 kernel outruns dequantize + sgemm on Q8_0 prompts in runq.c's layout: per group size, the
# shortest weight rows it takes them from. A model whose every product takes it computes a prompt's rows as
# decoding each token alone does, so prefilling in chunks (--chunk, a prefix from a server slot's cache) gives
# the numbers of one whole prefill. AVX-512 VNNI wins for groups of 64 and 32 on rows of every length. Other
# group sizes (16, 8, 4: models of odd widths) have only the scalar int8 rows, far slower than sgemm: they stay
# on sgemm. AVX2 builds (`maddubs`) do not beat sgemm on whole prompts: they stay on sgemm. Matrices of groups
# of 32 or 64 are packed for the kernels on their first decode step (W_Q8R) and then take
# INT8_Q8R_PROMPT_MIN_COLS, whose kernels they run. Measured in docs/speed.md ("Prompts").
INT8_Q8_PROMPT_MIN_COLS = {"avx512-vnni": {64: 0, 32: 0}}
# Builds whose int8 kernel outruns dequantize + sgemm on llama.cpp's Q8_0 blocks regrouped (W_Q8_0R), with the
# shortest rows it takes them from. AVX-512 VNNI wins on rows of every length; AVX2 (`maddubs`), with less
# arithmetic per instruction, only from rows of 512 values: on shorter rows it gains nothing. AVX2 with VNNI
# (avx2-vnni) takes 0.56-0.93x sgemm's time per matrix on rows of 128 to 2048 values, but the built-in model's
# prompts, rows of 128 included, ran 0.95x: from rows of 256. Blocks not regrouped
# (their values gathered out of 34-byte blocks first) lose to sgemm: they stay there. runq.c's Q8 packed
# (W_Q8R) runs the same kernels and takes the same table. Measured in docs/speed.md ("Prompts").
INT8_Q8R_PROMPT_MIN_COLS: dict[str, int] = {"avx512-vnni": 0, "avx2": 512, "avx2-vnni": 256}

W_F32, W_Q8, W_Q8_0, W_Q4_0, W_Q4_0R, W_Q8_0R, W_F16, W_BF16, W_Q8R = range(9)
DENSE_TYPES = {np.dtype(np.float32): W_F32, np.dtype(np.float16): W_F16}  # fp32, and fp16 read as fp32
BLOCK_TYPES = {"q8_0": W_Q8_0, "q4_0": W_Q4_0}
REGROUPED_TYPES = {"q8_0": W_Q8_0R, "q4_0": W_Q4_0R}
LINE = 64  # bytes in a cache line: where regrouped matrices start
KV_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1}  # kernels.c's KV_F32, KV_F16
KV_Q8 = 2  # kernels.c's KV_Q8: rows of kernels_base.kv_q8_dtype


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("rows", ctypes.c_int64), ("row0", ctypes.c_int64),
                ("type", ctypes.c_int32), ("gs", ctypes.c_int32)]


class _Fusion(ctypes.Structure):
    _fields_ = [("norm_w", ctypes.c_void_p), ("eps", ctypes.c_float), ("gate", ctypes.c_void_p),
                ("accumulate", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat * 3), ("wo", _Mat), ("w13", _Mat * 2), ("w2", _Mat), ("rms_att", ctypes.c_void_p),
                ("rms_ffn", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [*[(name, ctypes.c_int64) for name in
                  ("n_layers", "dim", "hidden_dim", "n_heads", "kv_heads", "head_size")],
                ("eps", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("embeddings", _Mat),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("n_positions", ctypes.c_int64),
                ("cls", _Mat), ("rms_final", ctypes.c_void_p)]


class ModelPlan:
    """A model described to C once (see `NativeKernels.step_plan`); holds the arrays behind its pointers so
    that they stay valid."""

    def __init__(self, weights: Weights, rope: tuple[np.ndarray, np.ndarray], struct: _Model, layers: ctypes.Array,
                 arrays: list[np.ndarray]):
        self.weights, self.rope, self.struct, self.layers = weights, rope, struct, layers
        self.arrays = arrays  # every matrix's bytes the struct points at (a matrix may be regrouped later)
        self.ref, self.vocab_size = ctypes.byref(struct), weights.args.vocab_size  # what each step passes


# forward_step's return codes: which of its index arrays held a value outside its table
KV_OVERFLOW = 5  # forward_step's code after a step that wrote an fp16 infinity into the cache
STEP_ERRORS = {1: "token ids must lie in [0, vocab_size)", 2: "positions must lie in [0, seq_len)",
               3: "slots must lie in [0, the cache's slots)", 4: "rows must index the step's tokens"}


def cache_root() -> Path:
    return cache_folder("native")


_said: set[str] = set()


def _fall_back(reason: str, topic: str | None = None) -> None:
    """One line on stderr, once a process for each `topic` (default: the reason itself): why the kernels are not
    used. The fallback is several times slower, which a user would otherwise take for the speed of babyllama."""
    _say_once(f"{reason}; running without them, several times slower", topic or reason)


def _say_once(line: str, topic: str) -> None:
    """`line` on stderr after "babyllama: ", once a process for each `topic`."""
    if topic not in _said:
        _said.add(topic)
        say(f"babyllama: {line}")


def _no_compiler(directory: Path | None) -> None:
    """Say that no C compiler was found, on the first run only: a marker in the cache keeps later runs quiet
    (where the cache cannot be written, every run says it)."""
    try:
        marker = (directory or cache_root()) / "no-compiler"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("no C compiler was found (cc, gcc or clang on PATH, or $CC); said once\n")
    except OSError:
        pass
    _fall_back("no C compiler (cc, gcc or clang on PATH, or $CC) to build the C kernels with")


def compiler() -> str | None:
    """$CC, else the first of cc, gcc and clang on PATH. A $CC that names no command is said once a process: the
    kernels are then built (and cached) with another compiler than the one asked for."""
    wanted = os.environ.get("CC")
    if wanted and shutil.which(cc_command(wanted)[0]):
        return wanted
    found = next((name for name in ("cc", "gcc", "clang") if shutil.which(name)), None)
    if wanted:
        instead = f"the C kernels are built with {found} instead" if found else "no other C compiler either"
        _say_once(f"CC={wanted!r} names no command on PATH; {instead}", f"CC {wanted}")
    return found


def cc_command(cc: str) -> list[str]:
    """A compiler setting as the words of a command: a path to a compiler as it is (spaces and all), else split
    as a shell would (CC="ccache gcc" or "gcc -m64", as make takes it)."""
    if shutil.which(cc):
        return [cc]
    try:
        return shlex.split(cc) or [cc]
    except ValueError:  # an unclosed quote: no command either way
        return [cc]


def compiler_version(cc: str) -> str:
    """The first line of `cc --version` (a compiler setting of several words run as those words), or "" where it
    does not run."""
    try:
        version = subprocess.run([*cc_command(cc), "--version"], capture_output=True, text=True, errors="replace",
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return version.splitlines()[0] if version else ""


@cache
def _compiler_identity(cc: str) -> str:
    """The compiler's resolved path (and its other words: CC="gcc -m64"), and version line: a different compiler
    under the same name, or other options, rebuilds."""
    words = cc_command(cc)
    return " ".join([str(shutil.which(words[0])), *words[1:], compiler_version(cc)])


@cache
def cpu_signature() -> str:
    """What identifies this CPU for -march=native: its model and feature flags (Linux), else what the platform
    module knows."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("vendor_id", "cpu family", "model", "model name", "flags", "Features", "CPU part"):
                    fields.setdefault(key, value.strip())
                if not line.strip() and fields:
                    break  # the first processor's block describes them all
    except OSError:
        pass
    if not fields:
        fields = {"machine": platform.machine(), "processor": platform.processor()}
    return "\n".join(f"{k}: {v}" for k, v in sorted(fields.items()))


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (/proc/cpuinfo), or None where they cannot be read."""
    for line in cpu_signature().splitlines():
        if line.startswith("flags: "):
            return set(line[len("flags: "):].split())
    return None


def arch_name(arch: str | None = None) -> str:
    """The instruction set asked for, in lower case as ARCHES and the compiler's -march values spell them."""
    return (arch or os.environ.get("BABYLLAMA_NATIVE_ARCH") or "").strip().lower() or "native"


def flag_sets(arch: str) -> list[list[str]]:
    """Compiler flags to try, in order. The native build falls back to plainer sets (a compiler without
    -march=native or OpenMP's simd pragmas still builds); a forced instruction set never builds anything else."""
    marches = ARCHES[arch][0] if arch in ARCHES else ([f"-march={arch}"],)
    sets = [["-O3", *march, "-fopenmp-simd", "-pthread"] for march in marches]
    if arch == "native":
        sets += [["-O3", "-march=native", "-pthread"], ["-O3", "-pthread"]]
    return sets


# the compiler's macro for an instruction-set extension -march may switch on, and /proc/cpuinfo's flag for it
MACRO_FLAGS = {"__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma", "__F16C__": "f16c", "__BMI2__": "bmi2",
               "__AVX512F__": "avx512f", "__AVX512BW__": "avx512bw", "__AVX512CD__": "avx512cd",
               "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl", "__AVX512VNNI__": "avx512_vnni",
               "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16", "__AVX512VBMI__": "avx512vbmi",
               "__AVX512IFMA__": "avx512ifma", "__AVXVNNI__": "avx_vnni", "__GFNI__": "gfni",
               "__AMX_TILE__": "amx_tile",
               # AMD's own extensions (-march=bdver1..4, znver*), which Intel CPUs lack (and Zen CPUs all but SSE4a)
               "__XOP__": "xop", "__FMA4__": "fma4", "__TBM__": "tbm", "__LWP__": "lwp", "__SSE4A__": "sse4a"}


def missing_instructions(arch: str) -> list[str]:
    """The CPU flags a forced instruction set (BABYLLAMA_NATIVE_ARCH) needs and this CPU lacks: for the named
    sets (ARCHES) their flags, for any other -march value the extensions the compiler switches on for it (a
    library built with them would die of SIGILL at its first call). Empty where the CPU's flags cannot be read
    or the compiler does not know the value (its build then fails, with a marker)."""
    flags = cpu_flags()
    if arch == "native" or flags is None:
        return []
    needed = ARCHES[arch][1] if arch in ARCHES else _march_flags(arch)
    return sorted(needed - flags)


@cache
def _march_flags(arch: str) -> set[str]:
    """The CPU flags of the extensions the compiler switches on for -march=`arch` (its predefined macros)."""
    cc = compiler()
    if cc is None:
        return set()
    try:
        out = subprocess.run([*cc_command(cc), f"-march={arch}", "-dM", "-E", "-x", "c", os.devnull],
                             capture_output=True, text=True, errors="replace", timeout=60,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    macros = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("#define ")}
    return {flag for macro, flag in MACRO_FLAGS.items() if macro in macros}


def build(directory: Path | None = None, arch: str | None = None) -> Path | None:
    """The shared library for this source and instruction set, compiled with the first flag set that works
    and cached (a cached one is used while it matches the fingerprint its build recorded, else compiled again);
    None without a compiler or when every flag set fails (the caller falls back). A failed attempt
    leaves a marker (the command and the compiler's last words) so that later runs do not pay for it again,
    unless the machine failed it (out of disk or memory: `_machine_failure`), when the next run tries again;
    where every flag set failed, now or in an earlier run, one line on stderr says so (and, for the markers,
    how to try again: a failure may have been passing, a full disk): the fallback is several times slower."""
    cc = compiler()
    if cc is None:
        _no_compiler(directory)
        return None
    arch = arch_name(arch)
    source = SOURCE.read_bytes()
    directory = directory or cache_root()
    identity = f"{_compiler_identity(cc)}\n{cpu_signature()}"
    announced, failures, known = False, [], []
    topic = f"build {directory} {cc} {arch}"  # said once a process, failed now or in an earlier run
    for flags in flag_sets(arch):
        key = hashlib.sha256(source + "\n".join([identity, *flags]).encode()).hexdigest()[:16]
        lib, failed = directory / f"kernels-{key}.so", directory / f"kernels-{key}.failed"
        if is_intact(lib):
            sweep_stale_temps(directory, lib.name)  # what a build killed outright (SIGKILL) left beside it
            return lib
        if failed.exists():
            known.append(failed)
            continue
        directory.mkdir(parents=True, exist_ok=True)
        if not announced and sys.stderr is not None and sys.stderr.isatty():  # a compile takes seconds: say why
            say("babyllama: compiling the C kernels for this CPU (once; cached) ...")
            announced = True
        # compile to a temporary name and rename: concurrent first runs never load a half-written library; the
        # name holds this process's pid, so that what a SIGKILL left is swept by a later build
        sweep_stale_temps(directory, lib.name)
        fd, tmp = tempfile.mkstemp(prefix=f"{lib.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
        os.close(fd)
        cmd = [*cc_command(cc), *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        try:
            for c in _in_parallel(cmd):
                attempt = _run_compiler(c)
                if attempt.returncode == 0 and not _is_shared_library(Path(tmp)):  # e.g. CC=true
                    attempt = subprocess.CompletedProcess(c, 1, attempt.stdout, attempt.stderr + "\nthe compiler "
                                                          "exited 0 but wrote no shared library")
                if attempt.returncode == 0:
                    # mkstemp made it 0600 and the linker only adds x: a library others may load as they run
                    # programs (a cache several users share), as the umask allows
                    os.chmod(tmp, 0o777 & ~current_umask())
                    # the fingerprint first: a library under its name always has one (a concurrent build's at
                    # worst, whose mismatch costs one more build)
                    fingerprint_path(lib).write_text(fingerprint(Path(tmp)) + "\n")
                    os.replace(tmp, lib)
                    return lib
        finally:  # an interrupted or failed compile leaves no temporary library behind
            Path(tmp).unlink(missing_ok=True)
        passing = _machine_failure(attempt)
        if passing:  # no marker: the next run tries again; nor other flags now, which would fail alike
            _fall_back(f"the C kernels could not be compiled now ({passing}); the next run tries again", topic)
            return None
        errors = attempt.stderr.strip().splitlines()[-20:]
        failed.write_text("\n".join([" ".join(cmd), *errors]) + "\n")
        failures.append(failed)
    # a forced instruction set is named: a misspelled BABYLLAMA_NATIVE_ARCH is no compiler's fault
    with_cc = cc if arch == "native" else f"{cc} for the instruction set {arch!r} (BABYLLAMA_NATIVE_ARCH)"
    if failures:  # every flag set failed, these here and now
        _fall_back(f"the C kernels did not compile with {with_cc} (see {failures[0]})", topic)
    elif known:  # every flag set failed in a run before: the markers say so, and how to try again
        _fall_back(f"the C kernels did not compile with {with_cc} in an earlier run (see {known[0]}; remove "
                   f"{known[0].parent / 'kernels-*.failed'} to try again)", topic)
    return None


# what a compiler says when the machine, not the compiler or its flags, stopped it: a full disk or quota, a file
# size limit, memory (the OOM killer's SIGKILL shows as "Killed signal terminated program cc1")
MACHINE_FAILURES = ("No space left on device", "Disk quota exceeded", "File size limit exceeded", "File too large",
                    "Cannot allocate memory", "out of memory", "Killed signal terminated program")


def _machine_failure(attempt: subprocess.CompletedProcess) -> str | None:
    """Why a compile failed, where the machine failed it (a failure that may pass, which leaves no marker)."""
    if attempt.returncode < 0:
        return f"the compiler was stopped by signal {-attempt.returncode}"
    for line in reversed(attempt.stderr.splitlines()):
        if any(words in line for words in MACHINE_FAILURES):
            return line.strip()
    return None


def _is_shared_library(path: Path) -> bool:
    """Whether `path` starts as a library does (ELF, Mach-O or PE): a compiler command that exits 0 without
    writing one leaves the empty temporary file, which would be cached as the library for good."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head in (b"\x7fELF", b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe") or head[:2] == b"MZ"


def fingerprint_path(lib: Path) -> Path:
    """Where the size and SHA-256 of a cached library are recorded when its build succeeds."""
    return lib.with_suffix(".sha256")


def fingerprint(lib: Path) -> str:
    """A library's size and SHA-256 (~1 ms for its ~0.5 MB)."""
    data = lib.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def is_intact(lib: Path) -> bool:
    """Whether lib is the library its build wrote, byte for byte: a cached library that was truncated (a full
    disk, a copy cut short) still loads, then dies of SIGBUS at the first call into its missing pages. A library
    that is missing, damaged or has no fingerprint (another version's cache) is built again."""
    try:
        return fingerprint_path(lib).read_text(encoding="ascii").strip() == fingerprint(lib)
    except (OSError, ValueError):  # ValueError: a fingerprint file of other bytes (UnicodeDecodeError)
        return False


def _run_compiler(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run one compile in a process group of its own, and stop the whole group (the driver, cc1, the LTO jobs)
    when this process stops waiting for it, whatever the reason (Ctrl-C, a signal turned into an exception):
    killing the driver alone leaves its jobs compiling for a minute. The compiler's $TMPDIR is a folder of its
    own, removed after it: GCC's LTO wrapper, stopped while it links, leaves two scratch files there (in /tmp,
    one pair per interrupted first run)."""
    try:
        scratch: str | None = tempfile.mkdtemp(prefix="babyllama-cc.")
    except OSError:  # no writable temporary folder: the compiler meets the same, and says so itself
        scratch = None
    env = {**os.environ, "TMPDIR": scratch} if scratch else None
    try:
        # errors="replace": a compiler's messages in a non-UTF-8 locale (Latin-1 catalogues) are still shown
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                start_new_session=True, env=env)
        try:
            out, err = proc.communicate()
        except BaseException:
            _stop_group(proc)
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to proc's process group (GCC's driver then removes its temporary files, but for an LTO wrapper's
    two small scratch files, which go with the compile's own $TMPDIR: _run_compiler), then, once proc has exited
    or 5 s have passed, SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing of the group is left
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    proc.wait()


def _in_parallel(cmd: list[str]) -> list[list[str]]:
    """cmd as it compiles on every usable CPU, then as it is. With link-time optimization GCC generates the
    code in partitions, one job per CPU, which shortens the first build (docs/speed.md); the functions are the
    same C compiled with the same options, so the arithmetic is too. Compilers without GCC's -flto=N (clang)
    fail it at once and compile without it; so does a machine with one CPU."""
    jobs = min(usable_cpus(), 16)
    return ([[*cmd, f"-flto={jobs}"]] if jobs > 1 else []) + [cmd]


_char_view = ctypes.c_char.from_buffer


def _address(a: np.ndarray) -> int:
    """Where a's data starts (a is contiguous). The buffer route is 5x faster than __array_interface__,
    which matters at ~40 calls per layer, but needs a writable array (weights are read-only maps)."""
    if a.flags.writeable:
        return ctypes.addressof(_char_view(a))  # type: ignore[arg-type]  # NumPy's stubs: no __buffer__ before 3.12
    return a.__array_interface__["data"][0]


def _vector(a: np.ndarray, what: str) -> np.ndarray:
    """a, checked to be what the sampling functions read: one contiguous float32 vector (of `what`)."""
    if not (a.flags.c_contiguous and a.dtype == np.float32 and a.ndim == 1):
        raise ValueError(f"{what} must be a contiguous float32 vector")
    return a


def _c_reads_q8(w: QTensor) -> bool:
    """Whether C can read w's values and scales as they are: C-contiguous int8 and float32."""
    return (w.q.flags.c_contiguous and w.s.flags.c_contiguous and w.q.dtype == np.int8
            and w.s.dtype == np.float32)


def _fill(m: _Mat, w: Matrix, row0: int) -> None:
    """Describe matrix w to C in m, its result starting at stacked row row0."""
    if isinstance(w, QTensor) and w.packed is not None:
        if not (w.packed.flags.c_contiguous and w.packed.dtype == np.uint8):
            raise ValueError("packed Q8_0 weights must be C-contiguous uint8")
        m.w, m.s, m.type, m.gs = _address(w.packed), None, W_Q8R, w.group_size
    elif isinstance(w, QTensor):
        if not _c_reads_q8(w):
            raise ValueError("Q8_0 weights must be C-contiguous int8 values and float32 scales")
        m.w, m.s, m.type, m.gs = _address(w.q), _address(w.s), W_Q8, w.group_size
    elif isinstance(w, BlockTensor):
        if not (w.data.flags.c_contiguous and w.data.dtype == np.uint8):
            raise ValueError("block-quantized weights must be C-contiguous uint8")
        types = REGROUPED_TYPES if w.regrouped else BLOCK_TYPES
        m.w, m.s, m.type, m.gs = _address(w.data), None, types[w.kind], BLOCK
    elif isinstance(w, BF16Tensor):
        if not w.bits.flags.c_contiguous:
            raise ValueError("bfloat16 weights must be C-contiguous")
        m.w, m.s, m.type, m.gs = _address(w.bits), None, W_BF16, 0
    else:
        if not (w.flags.c_contiguous and w.dtype in DENSE_TYPES):
            raise ValueError("dense weights must be C-contiguous float32 or float16")
        m.w, m.s, m.type, m.gs = _address(w), None, DENSE_TYPES[w.dtype], 0
    m.rows, m.row0 = w.shape[0], row0


class NativeKernels:
    """The C library behind the `Kernels` protocol (kernels_base.py). A call's weights are described to C
    once (pointers, types, rows, where each result goes) and the description is reused while the same
    arrays come back, which they do every token: building it costs more than a small product."""

    name = "native"
    MAX_PLANS = 4096

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.compiler = compiler() or "cc"  # what built it (for the bench's description)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.lib.matmul.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr]
        self.lib.matmul.restype = ctypes.c_int
        self.lib.rmsnorm.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr]
        self.lib.attention_step.argtypes = [ptr] * 7 + [ctypes.c_int] + [ptr] * 2 + [i64] * 5 + [ptr]
        self.lib.attention_step.restype = ctypes.c_int
        self.lib.swiglu.argtypes = [ptr, ptr, i64, i64, ptr]
        self.lib.dequantize.argtypes = [ptr, i64, ptr]
        self.lib.dequantize_rows.argtypes = [ptr, ptr, i64, i64, ptr]
        self.lib.dequantize_rows.restype = ctypes.c_int
        self.lib.forward_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_int, i64, i64, ptr, i64, ptr]
        self.lib.forward_step.restype = ctypes.c_int
        self.lib.kernel_threads.restype = ctypes.c_int
        # pool_split_jobs, pool_sleeps, pool_shared_looks, pool_spin_us: the pool's counters and its spin, for tests
        # only (unused here)
        self.lib.pool_split_jobs.restype = ctypes.c_int64
        self.lib.pool_sleeps.restype = ctypes.c_int64
        self.lib.pool_shared_looks.restype = ctypes.c_int64
        self.lib.pool_spin_us.restype = ctypes.c_int64
        self.lib.kernel_isa.restype = ctypes.c_char_p
        self.lib.kernel_amx.argtypes = [ctypes.c_int]
        self.lib.kernel_amx.restype = ctypes.c_int
        self.lib.pool_configure.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.read_memory.argtypes = [ptr, i64, ctypes.c_int]
        self.lib.read_memory.restype = ctypes.c_uint64
        self.lib.round_q8.argtypes = [ptr, i64, i64, i64, ptr]
        self.lib.gemm.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr]
        self.lib.gemm.restype = ctypes.c_int
        self.lib.set_sgemm.argtypes = [ptr, ctypes.c_int]
        self.lib.first_above.argtypes = [ptr, i64, ctypes.c_float]
        self.lib.first_above.restype = i64
        self.lib.sample_topp.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float, ctypes.c_float]
        self.lib.sample_topp.restype = i64
        self.lib.sample_logits.argtypes = [ptr, i64, ctypes.c_double, ctypes.c_double, ctypes.c_float]
        self.lib.sample_logits.restype = i64
        self.lib.softmax_logits.argtypes = [ptr, i64, ctypes.c_double, ptr]
        self.lib.regroup_blocks.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
        self.lib.regroup_blocks.restype = ctypes.c_int
        self.lib.regroup_q8.argtypes = [ptr, ptr, ptr, i64, i64, i64]
        self.lib.regroup_q8.restype = ctypes.c_int
        self.lib.convert_ggml_rows.argtypes = [ctypes.c_int, ptr, i64, i64, ctypes.c_int, ctypes.c_int, ptr, ptr]
        self.lib.convert_ggml_rows.restype = ctypes.c_int
        self.lib.quantize_blocks.argtypes = [ptr, i64, i64, ctypes.c_int, ptr]
        self.lib.quantize_blocks.restype = ctypes.c_int
        self.path = path
        self._gemm = _hand_over_blas(self.lib)
        self._int8_q4_min_cols = INT8_Q4_PROMPT_MIN_COLS.get(self.isa())  # None: never
        self._int8_q8_min_cols = INT8_Q8_PROMPT_MIN_COLS.get(self.isa(), {})  # per group size; none: never
        self._int8_q8r_min_cols = INT8_Q8R_PROMPT_MIN_COLS.get(self.isa())  # None: never
        self._plans: dict[tuple[int, ...], tuple[tuple, ctypes.Array, list[tuple[int, int]], int]] = {}
        # forward_step's last plan and cache arrays (weak: not kept alive by this), their row type and addresses
        self._last_cache: tuple = (lambda: None,) * 3 + (0, 0, 0)
        self.configure_threads()
        if not amx_allowed():
            self.use_amx(False)
        sampler.use_cdf_search(self.first_above)
        sampler.use_topp_sampler(self.sample_topp)
        sampler.use_logits_sampler(self.sample_logits)

    # ------------------------------------------------------------------------------------------ threads

    def configure_threads(self, n: int | None = None) -> None:
        """n threads for every parallel product (explicit, like --threads); None: OMP_NUM_THREADS when set
        (explicit), else every CPU this process may use, with small products kept on one thread.
        BABYLLAMA_SPIN_US: how long idle pool threads spin before they sleep (default: 500 where every thread is used,
        by the adaptation or explicitly, and the thread's CPU is not shared with other busy work, else 50; see
        kernels.c spin_limit)."""
        if n is None:
            n = explicit_threads()
        explicit = n is not None
        if n is None:
            n = usable_cpus()
        self.lib.pool_configure(n, int(explicit), spin_us())

    def threads(self) -> int:
        return self.lib.kernel_threads()

    def amx(self) -> bool:
        """Whether prompts of Q8_0 and Q4_0 weights (32 tokens or more) run on AMX's int8 tiles: a Sapphire
        Rapids-class Xeon or later, whose OS grants the tiles, and BABYLLAMA_AMX not 0. Their results are the
        AVX-512 rows', bit for bit (kernels.c, amx_rows)."""
        return bool(self.lib.kernel_amx(-1))

    def use_amx(self, on: bool) -> bool:
        """Turn the tiles on (where the CPU and OS have them) or off; returns whether they are on."""
        return bool(self.lib.kernel_amx(int(on)))

    def isa(self) -> str:
        """The instruction set the library was compiled for: avx512-vnni, avx512, avx2-vnni, avx2 or scalar."""
        return self.lib.kernel_isa().decode()

    def first_above(self, probs: np.ndarray, coin: float) -> int:
        """sampler.sample_mult's index (the first whose running fp32 sum of `probs` exceeds `coin`) in one pass
        without the CDF; probs: contiguous float32."""
        return self.lib.first_above(_address(_vector(probs, "probabilities")), len(probs), coin)

    def sample_topp(self, probs: np.ndarray, topp: np.float32, cutoff: np.float32, coin: np.float32) -> int:
        """sampler.sample_topp's token (run.c's top-p sampling, the same fp32 arithmetic) in one call; -1 where
        C could not allocate its candidates. probs: contiguous float32."""
        return self.lib.sample_topp(_address(_vector(probs, "probabilities")), len(probs), topp, cutoff, coin)

    def softmax_logits(self, logits: np.ndarray, temperature: float) -> np.ndarray:
        """The probabilities `sample_logits` draws from: softmax(logits / temperature) in fp32, within a few units
        in the last place of sampler.softmax's (another exponential, another order of the sum)."""
        logits = _vector(logits, "logits")
        probs = np.empty_like(logits)
        self.lib.softmax_logits(_address(logits), len(logits), temperature, _address(probs))
        return probs

    def sample_logits(self, logits: np.ndarray, temperature: float, topp: float, coin: np.float32) -> int:
        """Sampler.sample's token for temperature > 0 in one call (run.c's procedure on `softmax_logits`'
        probabilities, with the caller's coin); -1 where C could not allocate. logits: contiguous float32."""
        logits = _vector(logits, "logits")
        return self.lib.sample_logits(_address(logits), len(logits), temperature, topp, coin)

    # --------------------------------------------------------------------------------------- products

    def _plan(self, ws: Sequence[Matrix]) -> tuple[ctypes.Array, list[tuple[int, int]], int]:
        """(C descriptions of ws, each one's (first row, end row) in the stacked result, their common row length).
        Results are laid out one matrix after another, each (n_tok, rows) and contiguous, so the caller's views
        need no copy."""
        held = (*ws, *_regrouped_arrays(ws))  # a matrix regrouped since: a new key
        key = tuple(id(a) for a in held)
        plan = self._plans.get(key)
        if plan is not None and all(ref() is a for ref, a in zip(plan[0], held)):
            return plan[1], plan[2], plan[3]
        mats = (_Mat * len(ws))()
        n = ws[0].shape[1]
        if any(w.shape[1] != n for w in ws):
            raise ValueError("the matrices of one call must have the same row length")
        bounds = _describe(mats, ws)
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
        # weak references: a plan must not keep a dropped model's matrices (its mapped file) alive; it goes when the
        # first of them does (an id reused by another matrix then gets a plan of its own)
        def forget(_: weakref.ref, key: tuple[int, ...] = key) -> None:
            self._plans.pop(key, None)

        self._plans[key] = (tuple(weakref.ref(a, forget) for a in held), mats, bounds, n)
        return mats, bounds, n

    @staticmethod
    def _outputs(bounds: list[tuple[int, int]], n_tok: int) -> tuple[np.ndarray, list[np.ndarray]]:
        out = np.empty(n_tok * bounds[-1][1], dtype=np.float32)
        return out, [out[n_tok * a:n_tok * b].reshape(n_tok, b - a) for a, b in bounds]

    def matmul(self, x: np.ndarray, ws: Sequence[Matrix], norm: tuple[np.ndarray, float] | None = None,
               gate: np.ndarray | None = None, into: np.ndarray | None = None) -> list[np.ndarray]:
        """x @ w.T for each w in ws (any mix of fp32, Q8_0 and block types), in one C call. Fused forms for a
        decode step: norm=(weight, eps) multiplies rmsnorm(x) * weight instead of x; gate=g multiplies
        silu(x) * g; into=y (one matrix) adds the product into y in place and returns [y]."""
        x = _contiguous(x)
        mats, bounds, n = self._plan(ws)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"x must be (tokens, {n})")
        if into is not None:
            if len(ws) != 1 or not (into.flags.c_contiguous and into.dtype == np.float32 and into.flags.writeable):
                raise ValueError("into= takes one matrix and a writable contiguous float32 array")
            out, views = into, [into]
        else:
            out, views = self._outputs(bounds, x.shape[0])
        fusion = None
        if norm is not None or gate is not None or into is not None:
            # the locals keep any contiguous copies alive through the call
            norm_w = None if norm is None else _contiguous(norm[0])
            gate = None if gate is None else _contiguous(gate)
            fusion = _Fusion(None if norm_w is None else _address(norm_w), 0.0 if norm is None else norm[1],
                             None if gate is None else _address(gate), into is not None)
        if self.lib.matmul(_address(x), x.shape[0], n, mats, len(ws), _address(out),
                           None if fusion is None else ctypes.byref(fusion)):
            raise ValueError("one call takes matrices of at most two quantization group sizes")
        return views

    def prompt_on_int8(self, w: Matrix) -> bool:
        """Whether a prompt's product with w runs the int8 decode kernel rather than dequantize + sgemm: Q4_0
        matrices on the builds of INT8_Q4_PROMPT_MIN_COLS, runq.c-layout Q8_0 ones on those of
        INT8_Q8_PROMPT_MIN_COLS, llama.cpp's Q8_0 blocks regrouped and runq.c's packed on those of
        INT8_Q8R_PROMPT_MIN_COLS, with rows at least that long."""
        if isinstance(w, BlockTensor):
            min_cols = self._int8_q4_min_cols if w.kind == "q4_0" else self._int8_q8r_min_cols if w.regrouped else None
            return min_cols is not None and w.cols >= min_cols
        if isinstance(w, QTensor) and w.packed is not None:
            return self._int8_q8r_min_cols is not None and w.shape[1] >= self._int8_q8r_min_cols
        min_cols = self._int8_q8_min_cols.get(w.group_size) if isinstance(w, QTensor) else None
        return min_cols is not None and w.shape[1] >= min_cols

    def matmul_many(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        rows = x.shape[0]
        if not any(is_quantized(w) for w in ws):
            return self.matmul(x, ws) if rows <= F32_KERNEL_MAX_ROWS else self.gemm(x, ws)
        if rows < QUANT_NATIVE_GEMM_MIN_ROWS:
            return self.matmul(x, ws)
        # Where this build's int8 kernel is the faster (prompt_on_int8): computed as decode steps compute.
        # The rest meet runq.c's rounding of x (quantized and dequantized per group), made once per group size,
        # and the matrices that take the same x go to sgemm in one call (NumPy without it).
        int8 = [i for i, w in enumerate(ws) if self.prompt_on_int8(w)]
        by_x: dict[int | None, list[int]] = {}
        for i, w in enumerate(ws):
            if i not in int8:
                by_x.setdefault(w.group_size if is_quantized(w) else None, []).append(i)
        calls = [(int8, self.matmul(x, [ws[i] for i in int8]))] if int8 else []
        for gs, idx in by_x.items():
            mats = [ws[i] for i in idx]
            if not self._gemm:
                calls.append((idx, [quantized_gemm(x, [w], self.dequantize)[0] if is_quantized(w) else x @ dense(w).T
                                    for w in mats]))
            else:
                calls.append((idx, self.gemm(x if gs is None else self.round_activations(x, gs), mats)))
        out: list[np.ndarray] = [np.empty(0)] * len(ws)
        for idx, results in calls:
            for i, r in zip(idx, results, strict=True):
                out[i] = r
        return out

    def gemm(self, x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
        """x @ w.T for many rows of x (a prompt): BLAS sgemm on chunks of weight rows, from the pool's threads
        (quantized rows dequantized a chunk at a time); NumPy's own (threaded) BLAS call when no sgemm could
        be handed over."""
        if not self._gemm:
            return [x @ self.dequantize(w).T for w in ws]
        x = _contiguous(x)
        mats, bounds, n = self._plan(ws)
        if x.ndim != 2 or x.shape[1] != n:
            raise ValueError(f"x must be (tokens, {n})")
        out, views = self._outputs(bounds, x.shape[0])
        self.lib.gemm(_address(x), x.shape[0], n, mats, len(ws), _address(out))
        return views

    def dequantize(self, w: Matrix) -> np.ndarray:
        """w as fp32, on every thread."""
        if is_fp32(w):
            return w
        m = _Mat()
        _fill(m, w, 0)
        out = np.empty(w.shape, dtype=np.float32)
        self.lib.dequantize(ctypes.byref(m), w.shape[1], _address(out))
        return out

    def embed(self, table: Matrix, tokens: np.ndarray) -> np.ndarray:
        """Rows `tokens` of the table as fp32, in C (a regrouped table, a shared classifier's, included)."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64).reshape(-1)
        m = _Mat()
        try:
            _fill(m, table, 0)
        except ValueError:  # arrays C does not read (not contiguous, another dtype)
            return table_rows(table, tokens)
        out = np.empty((len(tokens), table.shape[1]), dtype=np.float32)
        if self.lib.dequantize_rows(ctypes.byref(m), _address(tokens), len(tokens), table.shape[1], _address(out)):
            raise ValueError(f"token ids must lie in [0, {table.shape[0]})")
        return out

    def round_activations(self, x: np.ndarray, gs: int) -> np.ndarray:
        """x (N, n) quantized per group of gs and dequantized again, in C (kernels_base.quantize_rows and
        dequantize_rows' arithmetic): what a prompt's sgemm multiplies quantized weights by."""
        x = _contiguous(x)
        out = np.empty_like(x)
        self.lib.round_q8(_address(x), x.shape[0], x.shape[1], gs, _address(out))
        return out

    def read_memory(self, buf: np.ndarray, streams: int = 1) -> int:
        """Read buf (C-contiguous, a whole number of 4 KiB pages) on every thread, each 64 KiB of it as `streams`
        interleaved streams (1, 2, 4, 8 or 16): the memory-bandwidth probe. Returns a checksum of the bytes."""
        if not buf.flags.c_contiguous or buf.nbytes % 4096:
            raise ValueError("read_memory takes a contiguous buffer of whole 4 KiB pages")
        if type(streams) is not int or streams not in (1, 2, 4, 8, 16):  # not 1.0 or True
            raise ValueError(f"read_memory reads 1, 2, 4, 8 or 16 streams, not {streams}")
        return self.lib.read_memory(_address(buf), buf.nbytes // 4096, streams)

    # ------------------------------------------------------------ the rest of a decode step (engine.py)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x, weight = _contiguous(x), _contiguous(weight)
        out = np.empty_like(x)
        self.lib.rmsnorm(_address(x), _address(weight), x.shape[0], x.shape[1], eps, _address(out))
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                  keys: np.ndarray, values: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """See Kernels.attention. q and k are rotated in place (when contiguous float32; else copies are); the
        cache arrays must be writable and contiguous, float32, float16 or Q8_0 rows (both the same)."""
        kv_type = _cache_type(keys, values, q.shape[2])
        q, k, v, cos, sin = (_contiguous(a) for a in (q, k, v, cos, sin))
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        n, n_heads, hs = q.shape
        out = np.empty((n, n_heads * hs), dtype=np.float32)
        if self.lib.attention_step(_address(q), _address(k), _address(v), _address(cos), _address(sin),
                                   _address(keys), _address(values), kv_type, _address(slots), _address(positions), n,
                                   n_heads, keys.shape[1], keys.shape[2], hs, _address(out)):
            raise kv_overflow()
        return out

    def swiglu(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _contiguous(a), _contiguous(b)
        out = np.empty_like(a)
        rows = a.shape[0] if a.ndim == 2 else 1
        self.lib.swiglu(_address(a), _address(b), rows, a.size // rows, _address(out))
        return out

    def step_plan(self, w: Weights, cos: np.ndarray, sin: np.ndarray) -> ModelPlan:
        """w and its RoPE tables cos/sin (positions, hs/2) for `forward_step` (built once per model: it holds
        pointers)."""
        a = w.args
        layers = (_Layer * a.n_layers)()
        products = []  # (C matrices, the weights they describe): what a step multiplies by
        for i, ly in enumerate(layers):
            products += [(ly.qkv, [w.wq[i], w.wk[i], w.wv[i]]), (ly.w13, [w.w1[i], w.w3[i]]),
                         (_one(ly.wo), [w.wo[i]]), (_one(ly.w2), [w.w2[i]])]
            ly.rms_att, ly.rms_ffn = _address(_checked(w.rms_att[i])), _address(_checked(w.rms_ffn[i]))
        struct = _Model(a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.head_size, a.norm_eps, layers)
        products.append((_one(struct.cls), [w.wcls]))
        self._regroup([m for _, ws in products for m in ws])
        for mats, ws in products:
            _describe(mats, ws)
        emb = w.tok_embeddings  # C reads it through a stored pointer: _fill refuses anything but the array itself
        _describe(_one(struct.embeddings), [emb])
        struct.cos, struct.sin, struct.n_positions = _address(_checked(cos)), _address(_checked(sin)), len(cos)
        struct.rms_final = _address(_checked(w.rms_final))
        mats = (emb, *(m for _, ws in products for m in ws))
        arrays = [a for m in mats for a in matrix_arrays(m)] + _regrouped_arrays(mats)
        return ModelPlan(w, (cos, sin), struct, layers, arrays)

    def regroup(self, w: BlockTensor, out: np.ndarray | None = None) -> BlockTensor | None:
        """w (Q4_0 or Q8_0 blocks) regrouped for this build's kernels, its bytes in `out` (uint8, w's size) when
        given; None where the build has no kernels for it (no AVX2) or w is regrouped already."""
        if w.regrouped:
            return None
        data = np.empty_like(w.data) if out is None else out.reshape(w.data.shape)
        if self.lib.regroup_blocks(_address(w.data), _address(data), w.shape[0], w.shape[1], BLOCK_TYPES[w.kind]):
            return None
        return BlockTensor(w.kind, data, w.cols, regrouped=True)

    def pack_q8(self, w: QTensor, out: np.ndarray | None = None) -> np.ndarray | None:
        """w's values and scales in the order this build's kernels read them (kernels.c's W_Q8R; uint8, rows of
        cols + 4 * groups bytes), in `out` when given; None where the build has no kernel for them (no AVX2,
        groups other than 32 and 64) or w's arrays are not what C reads."""
        rows, cols = w.shape
        if not _c_reads_q8(w):
            return None  # describing it says so (_fill)
        data = (np.empty(w.nbytes, dtype=np.uint8) if out is None else out).reshape(rows, -1)
        if self.lib.regroup_q8(_address(w.q), _address(w.s), _address(data), rows, cols, w.group_size):
            return None
        return data

    def quantize_blocks(self, w: np.ndarray, kind: str) -> BlockTensor:
        """w (rows, cols; cols a multiple of 32) as `kind` blocks ("q4_0" or "q8_0") on the pool's threads:
        quant.py's quantizer byte for byte."""
        w = _contiguous(w)
        if w.ndim != 2 or w.shape[1] % BLOCK:
            raise ValueError(f"rows of {w.shape[-1]} weights do not split into blocks of {BLOCK}")
        out = np.empty((w.shape[0], w.shape[1] // BLOCK * BLOCK_BYTES[kind]), dtype=np.uint8)
        self.lib.quantize_blocks(_address(w), w.shape[0], w.shape[1], BLOCK_TYPES[kind], _address(out))
        return BlockTensor(kind, out, w.shape[1])

    def convert_ggml(self, data: np.ndarray, ggml_type: int, cols: int, kind: str,
                     out: np.ndarray | None = None, searched: bool = False) -> tuple[BlockTensor, float, float] | None:
        """Rows of llama.cpp blocks of type `ggml_type` (uint8, one row of `cols` weights each) as `kind` blocks
        ("q4_0" or "q8_0"; their bytes in `out` when given, C-contiguous), with the sums of the squared error and
        of the squared weights (float64); None for a type the C code does not convert (interop/gguf.py then uses
        the gguf package). The blocks are those of the gguf package's dequantizer followed by quant.py's
        quantizer (Q4_0 `searched`: quantize_q4_0_searched's); a block with a weight that is not finite gets a NaN
        scale."""
        data = np.ascontiguousarray(data)
        shape = (data.shape[0], cols // BLOCK * BLOCK_BYTES[kind])
        out = np.empty(shape, dtype=np.uint8) if out is None else out
        if out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous uint8 of shape {shape}")
        sums = np.zeros(2, dtype=np.float64)
        failed = self.lib.convert_ggml_rows(ggml_type, _address(data), data.shape[0], cols, BLOCK_TYPES[kind],
                                            int(searched), _address(out), _address(sums))
        if failed == 2:
            raise MemoryError("no memory for a row of converted weights")
        return None if failed else (BlockTensor(kind, out, cols), float(sums[0]), float(sums[1]))

    def _regroup(self, ws: Sequence[Matrix]) -> None:
        """Put the block matrices (Q4_0, Q8_0) among ws in the order this build's kernels read (kernels.c's
        W_Q4_0R, W_Q8_0R; the same bytes per row, permuted), once per matrix and for every reader: their bytes
        are replaced by a regrouped copy (one buffer for all, which NumPy gives huge pages, as it does a file read
        into memory), so decode steps, prompts and embedding rows read it and the blocks are let go as each
        matrix is copied: freed where they were process memory (quantized or converted on load), handed back
        where they were a file's pages (memory.release_mapped; a later read maps them again from the page cache),
        so that memory holds the blocks and their copy together for one matrix (a file's) or an eighth of the
        model (process memory, returned to the system that often) at most. Each matrix starts on a cache line
        (LINE), so that where a row is a whole number of lines (110M's rows of 2048) every row starts on one (rows
        that start 16 bytes into a line, NumPy's own start, split every other 256-bit load: see docs/speed.md).
        Matrices of runq.c's layout (Q8 with groups of 32 or 64, kernels.c's W_Q8R) get their copy in
        QTensor.packed: their values and scales stay for every other reader where they are a file's pages (handed
        back), and are let go where they were process memory (QTensor.keep_packed_only: rebuilt from the copy when
        read). Nothing changes where the build has no such kernels or the copies would take more than a quarter of
        the free memory (memory.read_by_default)."""
        todo = list({id(w): w for w in ws if (isinstance(w, BlockTensor) and not w.regrouped)
                     or (isinstance(w, QTensor) and w.packed is None and w.group_size in PACKED_GROUP_SIZES)}.values())
        starts = np.cumsum([0] + [-(-w.nbytes // LINE) * LINE for w in todo]).tolist()
        total = starts[-1]
        if not todo or not memory.read_by_default(total):
            return
        self._plans.clear()  # their descriptions hold the blocks
        buf, maps = memory.empty_aligned(total, LINE), memory.read_only_file_maps()
        # the blocks made on load, freed as their copies are made, go back to the system every eighth of the
        # model (64 MiB at most) rather than staying with the allocator, which would hold the model twice
        every, since = min(total // 8, 64 << 20), 0
        for w, at in zip(todo, starts):
            if not self._regroup_one(w, buf[at:at + w.nbytes], maps):  # no such kernels in this build
                return
            since += w.nbytes
            if since >= every:
                memory.return_freed_memory()
                since = 0
        memory.return_freed_memory()

    def _regroup_one(self, w: BlockTensor | QTensor, out: np.ndarray, maps: list[tuple[int, int]]) -> bool:
        """w regrouped (blocks) or packed (runq.c's Q8) into `out` for every reader, the bytes it came from let go
        (see _regroup); False where the build has no kernels for it."""
        if isinstance(w, QTensor):
            w.packed = self.pack_q8(w, out)
            if w.packed is None:
                return False
            if memory.file_mapped(w.q, maps) and memory.file_mapped(w.s, maps):
                memory.release_mapped(w.q, w.s, maps=maps)
            else:
                w.keep_packed_only()  # process memory is freed here
            return True
        copy = self.regroup(w, out)
        if copy is None:
            return False
        blocks, w.data, w.regrouped = w.data, copy.data, True
        memory.release_mapped(blocks, maps=maps)
        return True  # the blocks are freed as this returns where they were process memory

    def forward_step(self, plan: ModelPlan, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                     keys: np.ndarray, values: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """A decode-sized step in one call: tokens (N,) embedded, every transformer block (RoPE at each
        token's position, keys/values written into the cache arrays (L, slots, kv_heads, seq_len, hs) at
        (slots[i], positions[i]), each token attending over its slot up to its position), then the final
        norm and the classifier for the step's rows `rows`: logits (len(rows), vocab). The cache arrays are
        float32, float16 or Q8_0 rows (fp32 arithmetic in every case)."""
        last_plan, last_keys, last_values, kv_type, keys_at, values_at = self._last_cache
        if plan is not last_plan() or keys is not last_keys() or values is not last_values():  # the same come back
            kv_type = _cache_type(keys, values, plan.weights.args.head_size)
            keys_at, values_at = _address(keys), _address(values)
            self._last_cache = (weakref.ref(plan), weakref.ref(keys), weakref.ref(values), kv_type, keys_at, values_at)
        elif not (keys.flags.writeable and values.flags.writeable):
            _cache_type(keys, values, plan.weights.args.head_size)  # raises
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        row_ids = np.ascontiguousarray(rows, dtype=np.int64)
        check_step_lengths(tokens, positions, slots)
        n = len(tokens)
        logits = np.empty((len(row_ids), plan.vocab_size), dtype=np.float32)
        err = self.lib.forward_step(plan.ref, _address(tokens), n, _address(slots), _address(positions), keys_at,
                                    values_at, kv_type, keys.shape[1], keys.shape[3], _address(row_ids),
                                    len(row_ids), _address(logits))
        if err == KV_OVERFLOW:
            raise kv_overflow()
        if err:  # checked in C before anything is read or written: NumPy's min/max cost more than the step
            raise ValueError(STEP_ERRORS[err])
        return logits


# NumPy's OpenBLAS under the names its builds use: (cblas_sgemm, 64-bit integers?), and its thread setter
_SGEMM_NAMES = (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("scipy_cblas_sgemm", False),
                ("cblas_sgemm", False))
_THREADS_NAMES = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                  "openblas_set_num_threads")


def _hand_over_blas(lib: ctypes.CDLL) -> bool:
    """Give the kernels NumPy's OpenBLAS sgemm (found among the process's mapped libraries, Linux) and make
    that BLAS single-threaded: the pool's threads call it in parallel. False where none is found."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and line.split()[-1].startswith("/")}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            blas = ctypes.CDLL(path)
        except OSError:
            continue
        found = next(((getattr(blas, name), ilp64) for name, ilp64 in _SGEMM_NAMES if hasattr(blas, name)), None)
        set_threads = next((getattr(blas, name) for name in _THREADS_NAMES if hasattr(blas, name)), None)
        if found is None or set_threads is None:
            continue
        set_threads.argtypes = [ctypes.c_int]
        set_threads(1)
        lib.set_sgemm(ctypes.cast(found[0], ctypes.c_void_p), int(found[1]))
        return True
    return False


def _regrouped_arrays(ws: Iterable[Matrix]) -> list[np.ndarray]:
    """The regrouped copies C reads for the matrices among ws that have one (their bytes replaced, or packed)."""
    arrays = [w.data if isinstance(w, BlockTensor) else w.packed if isinstance(w, QTensor) else None for w in ws]
    return [a for a in arrays if a is not None]


def _describe(mats: ctypes.Array, ws: Sequence[Matrix]) -> list[tuple[int, int]]:
    """Fill mats with ws, stacked one result after another; returns each one's (first row, end row)."""
    bounds, row0 = [], 0
    for m, w in zip(mats, ws, strict=True):
        _fill(m, w, row0)
        bounds.append((row0, row0 + w.shape[0]))
        row0 += w.shape[0]
    return bounds


def _one(mat: _Mat) -> ctypes.Array:
    """A struct's single matrix field as the one-element array that `_describe` fills."""
    return (_Mat * 1).from_address(ctypes.addressof(mat))


def _checked(a: np.ndarray) -> np.ndarray:
    """a itself, which C will read through a stored pointer: it must not be a temporary copy."""
    if not (a.flags.c_contiguous and a.dtype == np.float32):
        raise ValueError("arrays that C reads through stored pointers must be contiguous float32")
    return a


def _cache_type(keys: np.ndarray, values: np.ndarray, head_size: int) -> int:
    """C's code for the cache arrays' row type (KV_TYPES, or KV_Q8 for Q8_0 rows of `head_size` values), after
    checking that C may write them."""
    kv_type = KV_Q8 if keys.dtype == kv_q8_dtype(head_size) else KV_TYPES.get(keys.dtype)
    if kv_type is None or values.dtype != keys.dtype or not all(c.flags.c_contiguous and c.flags.writeable
                                                                for c in (keys, values)):
        raise ValueError("the cache must be writable contiguous arrays of one type: float32, float16 or Q8_0 rows")
    return kv_type


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous and a.dtype == np.float32 else np.ascontiguousarray(a, dtype=np.float32)


_loaded: dict[Path, NativeKernels] = {}
# One load (and build) at a time: Python threads that reach their first generation together would otherwise
# each compile the library (8 threads: 8 compiles of ~15 s sharing the CPUs, minutes before any output).
_loading = threading.Lock()


def _unlock_in_child() -> None:
    """A forked child gets a fresh lock: the thread that held it (compiling) does not exist there."""
    global _loading
    _loading = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


def switched_off() -> bool:
    """Whether BABYLLAMA_NATIVE=0 keeps the kernels out of the default choice (unset, empty or 1: they are in it;
    any other value is a BabyLlamaError, as an unknown BABYLLAMA_KERNELS is: a "false" or "off" that is silently
    taken for "on" runs what the user meant to leave out)."""
    value = os.environ.get("BABYLLAMA_NATIVE", "")
    if value.strip() not in ("", "0", "1"):
        raise BabyLlamaError(f"BABYLLAMA_NATIVE={value!r} must be 0 (leave the C kernels out of the default choice) "
                             "or 1")
    return value.strip() == "0"


def amx_allowed() -> bool:
    """Whether BABYLLAMA_AMX lets prompts use AMX's tiles where the CPU has them: unset, empty or 1 yes, 0 no (for
    measurements: the numbers are the same either way); any other value is a BabyLlamaError."""
    value = os.environ.get("BABYLLAMA_AMX", "")
    if value.strip() not in ("", "0", "1"):
        raise BabyLlamaError(f"BABYLLAMA_AMX={value!r} must be 0 (prompts never use AMX's tiles) or 1")
    return value.strip() != "0"


SPIN_US_MAX = 1_000_000  # a second: beyond it idle threads would spin through whole pauses of a session


def spin_us() -> int:
    """$BABYLLAMA_SPIN_US as the pool takes it: microseconds 0..SPIN_US_MAX, or -1 (unset: kernels.c decides)."""
    value = os.environ.get("BABYLLAMA_SPIN_US", "").strip()
    if not value:
        return -1
    if not (value.isascii() and value.isdigit()) or int(value) > SPIN_US_MAX:
        raise BabyLlamaError(f"BABYLLAMA_SPIN_US={value!r} must be a whole number of microseconds from 0 to "
                             f"{SPIN_US_MAX} (how long idle threads spin before they sleep)")
    return int(value)


def load(arch: str | None = None, forced: bool = False) -> NativeKernels | None:
    """The native kernels for instruction set `arch` (default $BABYLLAMA_NATIVE_ARCH, else "native"), or None
    (the caller falls back) when disabled (BABYLLAMA_NATIVE=0, unless `forced`: asked for by name), when the CPU
    lacks a forced instruction set,
    when no compiler works, when the cache folder is not writable, or when the built library cannot be loaded
    (one line on stderr says which). One object per library."""
    if not forced and switched_off():  # named (BABYLLAMA_KERNELS=native), the variable is not read
        return None
    missing = missing_instructions(arch_name(arch))
    if missing:
        _fall_back(f"this CPU lacks {', '.join(missing)}, which the C kernels' instruction set {arch_name(arch)!r} "
                   "(BABYLLAMA_NATIVE_ARCH) uses", f"arch {arch_name(arch)}")
        return None
    with _loading:
        return _load(arch)


def _load(arch: str | None) -> NativeKernels | None:
    """`load`'s work, with the lock held."""
    try:
        path = build(arch=arch)
    except OSError as e:  # e.g. a read-only home: run without the kernels rather than fail
        where = f": {os.fsdecode(e.filename)}" if e.filename is not None else ""
        _fall_back(f"cannot build the C kernels in their cache ({e.strerror or first_line(e)}{where}; "
                   f"BABYLLAMA_CACHE names another folder)")
        return None
    if path is None:
        return None
    if path in _loaded:
        return _loaded[path]
    try:
        kernels = NativeKernels(path)
    except (OSError, AttributeError) as e:
        # build() returned it, so it is the library the compiler wrote, byte for byte: building it again would
        # fail the same way (a folder mounted noexec refuses every library in it), at ~15 s a run; it stays
        _fall_back(f"cannot load the C kernels built in {path.parent} ({first_line(e)}: a folder mounted noexec? "
                   f"BABYLLAMA_CACHE names another)")
        return None
    _loaded[path] = kernels
    return kernels


def set_threads(n: int) -> None:
    """n threads for every library loaded so far (threads.configure, after the kernels loaded)."""
    for kernels in _loaded.values():
        kernels.configure_threads(n)
