"""babyllama: the Llama 2 stack for small models — run, chat, train, export and serve llama2.c models.

Python API (mirrors the CLI):
    model = babyllama.load("stories260K.bin", tokenizer="tok512.bin")
    print(model.generate("Once upon a time", steps=100, temperature=0.0))
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import Model, load  # noqa: E402

__all__ = ["Model", "load", "__version__"]
