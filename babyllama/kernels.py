"""Which kernel backend runs the forward pass's heavy operations: `backend()` returns a `Kernels` (the protocol
in kernels_base.py that engine.py calls through), chosen on first use:
    native  C kernels (csrc/kernels.c) built on first use with the system compiler (kernels_native.py):
            AVX-512/VNNI or AVX2 int8 products for Q8_0 and Q4_0, streaming fp32 products, one-call decode
            steps, a thread pool that survives a busy machine;
    numba   fp32 (large matrices), fp16, bf16 and runq.c-Q8_0 products in numba (`pip install babyllama[fast]`),
            for machines without a compiler; NumPy for the rest;
    numpy   BLAS for fp32 (fp16 and bf16 converted to it), the reference arithmetic for quantized decode.
`use_backend` or BABYLLAMA_KERNELS=native|numba|numpy (in any case) picks one; one that cannot load falls back
down the list. Prompts (many rows) go to BLAS sgemm on every backend, quantized weights dequantized first.
kernels_base.matmul_plain is the readable reference every fast path is tested against.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import BabyLlamaError, first_line, note, say
from .formats import Matrix
from .kernels_base import QUANT_GEMM_MIN_ROWS, Kernels, NumpyKernels, PlainKernels, matmul_q8
from .quant import QUANTIZERS, BlockTensor, check_scales_fit

if TYPE_CHECKING:
    from .kernels_native import NativeKernels

BACKENDS = ("native", "numba", "numpy")
BACKEND_NAMES = {"native": "the C kernels", "numba": "numba", "numpy": "NumPy"}
KERNELS_VARIABLE = "BABYLLAMA_KERNELS"
_backend: Kernels | None = None  # chosen on first use
PLAIN: Kernels = PlainKernels()


def _load(name: str, named: bool = False) -> Kernels | None:
    """The kernels of backend `name`, or None when it cannot be used here; `named`: asked for by name (the
    native kernels then load under BABYLLAMA_NATIVE=0 too, which only keeps them out of the default choice)."""
    if name == "native":
        from . import kernels_native
        return kernels_native.load(forced=named)
    if name == "numba":
        try:
            from . import kernels_numba
        except ImportError:  # numba is an optional extra
            return None
        except (RuntimeError, ValueError, OSError) as e:
            # numba installed but unusable here: no folder to cache its compiled functions in (a read-only
            # install and home, as in a container run as another user), or its own settings refused
            # (NUMBA_NUM_THREADS=0)
            note(f"the numba kernels cannot load ({first_line(e) or type(e).__name__}): NumPy runs instead")
            return None
        return kernels_numba.NumbaKernels()
    return NumpyKernels()


def use_backend(name: str | None = None) -> str:
    """Select the kernel backend ("native", "numba" or "numpy", in any case); None: $BABYLLAMA_KERNELS if set,
    else the first that works here. A named backend that is unavailable falls back down the list. Returns the
    name in use. An unknown name is a ValueError, an unknown $BABYLLAMA_KERNELS a BabyLlamaError (the user's
    setting, reported in one line)."""
    global _backend
    if name is not None:
        wanted = name.strip().lower()
        if wanted not in BACKENDS:
            raise ValueError(f"unknown kernel backend {name!r}; choose from {', '.join(BACKENDS)}")
    else:
        wanted = _backend_from_environment()
    named = name is not None or bool(os.environ.get(KERNELS_VARIABLE, "").strip())
    for candidate in BACKENDS[BACKENDS.index(wanted):]:
        kernels = _load(candidate, named and candidate == wanted)
        if kernels is not None:
            _backend = kernels
            if named and candidate != wanted:  # asked for by name: say it is not used
                say(f"babyllama: {_why_not(wanted)}; running on {BACKEND_NAMES[candidate]}")
            return candidate
    raise AssertionError("unreachable: numpy is always available")


def _why_not(wanted: str) -> str:
    """Why the backend asked for by name did not load."""
    if wanted != "numba":
        return "the C kernels asked for cannot run here (no C compiler, or the line above says why)"
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install 'babyllama[fast]')"
    return "numba is installed but cannot run here (the line above says why)"


def _backend_from_environment() -> str:
    """$BABYLLAMA_KERNELS (any case; unset or empty: the first backend), checked."""
    value = os.environ.get(KERNELS_VARIABLE, "")
    wanted = value.strip().lower() or BACKENDS[0]
    if wanted not in BACKENDS:
        raise BabyLlamaError(f"{KERNELS_VARIABLE}={value!r} is not a kernel backend (choose {', '.join(BACKENDS)})")
    return wanted


def backend() -> Kernels:
    """The backend in use (chosen on first call)."""
    if _backend is None:
        use_backend()
    assert _backend is not None  # use_backend() sets it or raises
    return _backend


def matmul_many(x: np.ndarray, ws: Sequence[Matrix]) -> list[np.ndarray]:
    """x @ w.T for each w in `ws` (one input, any weight types), on the backend in use."""
    return backend().matmul_many(x, ws)


def matmul(x: np.ndarray, w: Matrix) -> np.ndarray:
    """x @ w.T on the backend in use."""
    return matmul_many(x, [w])[0]


def native_backend() -> NativeKernels | None:
    """The backend in use where it is the native kernels (which also quantize, and convert llama.cpp's other
    block types, in C), else None."""
    from . import kernels_native

    k = backend()
    return k if isinstance(k, kernels_native.NativeKernels) else None


def quantize_blocks(w: np.ndarray, kind: str) -> BlockTensor:
    """w (rows, cols) as `kind` blocks ("q4_0" or "q8_0"): in C on every thread where the native kernels are
    the backend (the same bytes), else by quant.py's quantizers (the reference)."""
    native = native_backend()
    return check_scales_fit(native.quantize_blocks(w, kind) if native else QUANTIZERS[kind](w))


def q4_0_blocks(w: np.ndarray) -> BlockTensor:
    """quantize_blocks(w, "q4_0"): what Weights.quantize_q4 and version-3 files take as their quantizer."""
    return quantize_blocks(w, "q4_0")


__all__ = ["BACKENDS", "PLAIN", "QUANT_GEMM_MIN_ROWS", "Kernels", "backend", "matmul", "matmul_many", "matmul_q8",
           "native_backend", "q4_0_blocks", "quantize_blocks", "use_backend"]
