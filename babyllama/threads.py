"""Thread counts for BLAS (NumPy), numba and the native kernels' pool, set before the libraries load.

`configure(n)`: n threads everywhere (the native pool then splits every product n ways). `configure(None)`:
respect the environment; numba alone ignores OMP_NUM_THREADS/OPENBLAS_NUM_THREADS, so it is given the same
count when only those are set. The native pool reads OMP_NUM_THREADS as an explicit count too; without one it
uses every CPU for large products and keeps small ones (a tiny model's) on the calling thread.
"""

from __future__ import annotations

import os
import sys

from .errors import BabyLlamaError

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# How long idle BLAS threads busy-wait before sleeping. A prompt alternates OpenBLAS's sgemm (its own
# threads) with the native kernels' pool; at the libraries' defaults (OpenBLAS ~2^28 cycles, GNU OpenMP
# 300k spins) the pool that just finished keeps spinning on a core the other pool needs, which halved
# prefill on 2 cores. The native pool spins 50 us at most (BABYLLAMA_SPIN_US).
WAIT_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "GOMP_SPINCOUNT": "10000"}


def set_wait_defaults() -> None:
    """Short spin-waits for both thread pools, unless the environment sets them; read when each library
    loads, so this runs before NumPy and the native kernels are imported."""
    for var, value in WAIT_DEFAULTS.items():
        os.environ.setdefault(var, value)


def configure(n: int | None = None) -> None:
    if n is not None:
        if n < 1:
            raise BabyLlamaError(f"--threads must be >= 1, got {n}")
        for var in (*BLAS_VARS, "NUMBA_NUM_THREADS"):
            os.environ[var] = str(n)
    elif "NUMBA_NUM_THREADS" not in os.environ:
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
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    native = sys.modules.get("babyllama.kernels_native")
    if native is not None:
        native.set_threads(n)
