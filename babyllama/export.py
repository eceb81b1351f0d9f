"""`babyllama export`: models from a source into a llama2.c .bin (version 0, 1 or 2), and sentencepiece
tokenizers into tokenizer.bin.

Every source becomes `formats.Weights` (the one in-memory model) and every target is written from it, so a
new source (say, a Hugging Face folder) only needs a `Weights` loader here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from . import formats
from .errors import BabyLlamaError

TOKENIZER_BIN = "tokenizer.bin"


def weights_from_checkpoint(path: str | os.PathLike) -> formats.Weights:
    """A babyllama training checkpoint (ckpt.pt) as fp32 Weights."""
    try:
        from .train.checkpoint import load_model
    except ImportError:
        raise BabyLlamaError("exporting a checkpoint needs torch: pip install 'babyllama[train]'") from None
    return load_model(path).to_weights()


def export_model(out: str | os.PathLike, *, checkpoint: str | os.PathLike, version: int = 1,
                 group_size: int | None = None) -> Path:
    """Write `checkpoint`'s model to `out` as a llama2.c .bin of `version`; the checkpoint's tokenizer.bin
    goes beside it when none is there yet (so `babyllama run OUT` finds it)."""
    out = Path(out)
    if out.is_dir():
        raise BabyLlamaError(f"{out} is a folder: give the output .bin file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    formats.save(weights_from_checkpoint(checkpoint), out, version=version, group_size=group_size)
    ckpt_dir = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    tok_src, tok_dst = ckpt_dir / TOKENIZER_BIN, out.with_name(TOKENIZER_BIN)
    if tok_src.is_file() and not tok_dst.exists():
        shutil.copyfile(tok_src, tok_dst)
    return out


def export_tokenizer(model: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A sentencepiece .model as a llama2.c tokenizer.bin (default: the same name with .bin)."""
    from .tokenizer import Tokenizer

    out = Path(out) if out else Path(model).with_suffix(".bin")
    Tokenizer.from_sentencepiece(model).save(out)
    return out
