"""Thread counts for BLAS (NumPy), numba and the native kernels' pool, set before the libraries load.

`configure(n)`: n threads everywhere (the native pool then splits every product n ways). `configure(None)`:
respect the environment; numba alone ignores OMP_NUM_THREADS/OPENBLAS_NUM_THREADS, so it is given the same
count when only those are set. The native pool reads OMP_NUM_THREADS as an explicit count too; without one it
uses every CPU for large products and keeps small ones (a tiny model's) on the calling thread.

All counts are capped at `max_threads()`: more threads than cores only queue for the same cores, and tens of
thousands exhaust the thread libraries (libgomp's stacks: a crash by signal). `--threads` above the cap is
refused; a larger count in the environment is lowered to the cap, with a note, when babyllama is imported
(before any pool reads its variable as it starts).
"""

from __future__ import annotations

import os
import sys

from .errors import BabyLlamaError, note

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# the thread variables the process started with, before `configure` sets or caps them (bench reports these)
STARTING_ENVIRONMENT = {k: os.environ[k] for k in (*BLAS_VARS, "NUMBA_NUM_THREADS") if k in os.environ}

# How long idle BLAS threads busy-wait before sleeping. A prompt alternates OpenBLAS's sgemm (its own
# threads) with the native kernels' pool; at the libraries' defaults (OpenBLAS ~2^28 cycles, GNU OpenMP
# 300k spins) the pool that just finished keeps spinning on a core the other pool needs, which can halve a
# prefill where the cores are few (docs/speed.md). The native pool's idle threads spin 50 or 500 us (kernels.c
# spin_limit; BABYLLAMA_SPIN_US).
WAIT_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"}


def set_wait_defaults() -> None:
    """Short spin-waits for both thread pools, unless the environment sets them; read when each library
    loads, so this runs before NumPy and the native kernels are imported."""
    for var, value in WAIT_DEFAULTS.items():
        os.environ.setdefault(var, value)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def explicit_threads() -> int | None:
    """The thread count the environment sets (as --threads sets it): OMP_NUM_THREADS's first level, or None."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def worker_count() -> int:
    """Threads for work split in Python (NumPy releasing the GIL), such as converting a file's tensors on load:
    explicit_threads(), else every usable CPU, at most max_threads()."""
    return min(explicit_threads() or usable_cpus(), max_threads())


def max_threads() -> int:
    """The most threads babyllama starts in any pool: 4 per usable CPU, and at least 16."""
    return max(16, 4 * usable_cpus())


def cap_environment() -> None:
    """Lower thread counts in the environment that exceed `max_threads()` (OMP_NUM_THREADS may list one count
    per nesting level, "8,4": each is capped)."""
    cap = max_threads()
    for var in (*BLAS_VARS, "NUMBA_NUM_THREADS"):
        value = os.environ.get(var)
        if value is None:
            continue
        counts = [part.strip() for part in value.split(",")]
        capped = [str(cap) if c.isdigit() and int(c) > cap else c for c in counts]
        if capped != counts:
            os.environ[var] = ",".join(capped)
            note(f"{var}={value} lowered to {os.environ[var]} (at most {cap} threads on "
                 f"this machine's {usable_cpus()} CPUs)")


def check_count(n: int, flag: str = "--threads") -> None:
    """One line unless `n` is a thread count babyllama runs: at least 1, at most max_threads()."""
    if n < 1:
        raise BabyLlamaError(f"{flag} must be >= 1, got {n}")
    if n > max_threads():
        raise BabyLlamaError(f"{flag} {n} is more than babyllama uses on this machine (at most "
                             f"{max_threads()}: 4 per CPU, {usable_cpus()} CPUs)")


def check_environment() -> None:
    """One line for an OMP_NUM_THREADS that is not a thread count (a positive integer, or one per nesting level,
    "8,4"), which run would ignore and libgomp (PyTorch's, the native kernels') would report in lines of its
    own (an empty one too)."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value is not None and not all(c.strip().isdigit() and int(c) > 0 for c in value.split(",")):
        raise BabyLlamaError(f"OMP_NUM_THREADS={value!r} is not a thread count (a positive integer, or one per "
                             "nesting level: 8,4; unset it for the default)")


def configure(n: int | None = None) -> None:
    """--threads' `n` (None: the environment's counts, checked) for every pool, before the libraries load."""
    if n is not None:
        check_count(n)
        for var in (*BLAS_VARS, "NUMBA_NUM_THREADS"):
            os.environ[var] = str(n)
    else:
        check_environment()
        cap_environment()
    if n is None and "NUMBA_NUM_THREADS" not in os.environ:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
                os.environ["NUMBA_NUM_THREADS"] = os.environ[var]
                break
    if n is not None and "numpy" in sys.modules:  # too late for BLAS's own start-up: tell it directly
        _set_loaded(n)


def _set_loaded(n: int) -> None:
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:
        pass
    if "numba" in sys.modules:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
    native = sys.modules.get("babyllama.kernels_native")
    if native is not None:
        native.set_threads(n)
