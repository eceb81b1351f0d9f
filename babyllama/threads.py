"""Thread counts for BLAS (NumPy) and numba, set before either library loads (neither re-reads them).

`configure(n)`: n threads everywhere. `configure(None)`: respect the environment; numba alone ignores
OMP_NUM_THREADS/OPENBLAS_NUM_THREADS, so it is given the same count when only those are set.
"""

from __future__ import annotations

import os
import sys

from .errors import BabyLlamaError

BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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
