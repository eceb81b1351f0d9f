"""The Python API: `load()` a model file with its tokenizer and generate text, as the CLI does."""

from __future__ import annotations

import os
from pathlib import Path

from . import formats
from .engine import Engine
from .errors import BabyLlamaError
from .generate import generate
from .sampler import Sampler
from .tokenizer import BOS, Tokenizer

ASSETS = Path(__file__).parent / "assets"
BUILTIN_MODEL = ASSETS / "model.bin"
BUILTIN_TOKENIZER = ASSETS / "tokenizer.bin"


def find_tokenizer(model_path: str | os.PathLike, vocab_size: int) -> Path:
    """run.c's -z default, made helpful: tokenizer.bin beside the model, else the built-in one when its
    vocabulary has the model's size."""
    beside = Path(model_path).with_name("tokenizer.bin")
    if beside.is_file():
        return beside
    if BUILTIN_TOKENIZER.is_file() and Tokenizer.load(BUILTIN_TOKENIZER).vocab_size == vocab_size:
        return BUILTIN_TOKENIZER
    raise BabyLlamaError(
        f"no tokenizer found for {model_path} (vocab {vocab_size}): put tokenizer.bin beside it or pass -z")


class Model:
    """A loaded model: weights, engine and tokenizer together."""

    def __init__(self, weights: formats.Weights, tokenizer: Tokenizer):
        self.weights = weights
        self.engine = Engine(weights)
        self.tokenizer = tokenizer

    @property
    def args(self):
        return self.weights.args

    def generate(self, prompt: str = "", steps: int = 256, temperature: float = 1.0, topp: float = 0.9,
                 seed: int | None = None) -> str:
        ids = self.tokenizer.encode(prompt, bos=True)
        sampler = Sampler(temperature, topp, seed)
        steps = clamp_steps(steps, self.args.max_seq_len)
        new = list(generate(self.engine, ids, steps, sampler))
        return self.tokenizer.decode(ids + new)


def clamp_steps(steps: int, seq_len: int) -> int:
    """run.c: 0 or more than seq_len means seq_len."""
    if steps < 0:
        raise BabyLlamaError(f"steps must be >= 0, got {steps}")
    return seq_len if steps == 0 or steps > seq_len else steps


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A babyllama training checkpoint: a .pt file, or a training run's folder holding ckpt.pt."""
    path = Path(path)
    return path.suffix == ".pt" or (path / "ckpt.pt").is_file()


def load(model: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None) -> Model:
    """Load a llama2.c .bin (default: the built-in model) or a training checkpoint (needs torch; converted
    to the same fp32 Weights) and its tokenizer."""
    if model is None:
        if not BUILTIN_MODEL.is_file():
            raise BabyLlamaError("the built-in model is missing from this installation; pass a model file")
        model = BUILTIN_MODEL
    if is_checkpoint(model):
        from .export import weights_from_checkpoint

        weights = weights_from_checkpoint(model)
        if Path(model).is_dir():
            model = Path(model) / "ckpt.pt"  # its tokenizer.bin lies beside it
    else:
        weights = formats.load(model)
    tok_path = tokenizer or find_tokenizer(model, weights.args.vocab_size)
    return Model(weights, Tokenizer.load(tok_path, weights.args.vocab_size))


__all__ = ["Model", "load", "clamp_steps", "find_tokenizer", "BOS"]
