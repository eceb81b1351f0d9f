"""babyllama: the Llama 2 stack for small models — run, chat, train, export and serve llama2.c models.

Python API (mirrors the CLI):
    model = babyllama.load("stories260K.bin", tokenizer="tok512.bin")
    print(model.generate("Once upon a time", steps=100, temperature=0.0))
"""

from __future__ import annotations

from .threads import cap_environment, set_wait_defaults
from .version import __version__

# before anything imports NumPy (OpenBLAS) or loads the native kernels (OpenMP), which read these once
set_wait_defaults()
cap_environment()

__all__ = ["Model", "load", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `babyllama.cli` starts without NumPy: `--threads` must be applied
    # before NumPy loads its BLAS (which fixes its thread count then).
    if name in ("Model", "load"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'babyllama' has no attribute {name!r}")
