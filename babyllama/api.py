"""The Python API: `load()` a model file with its tokenizer and generate text, as the CLI does."""

from __future__ import annotations

import os
import time
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

    def __init__(self, weights: formats.Weights, tokenizer: Tokenizer, plain: bool = False, device: str = "numpy",
                 compile: bool = False):
        self.weights = weights
        self.engine = make_engine(weights, device, plain, compile)
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

    def generate_batch(self, prompts: list[str], steps: int | list[int] = 256, temperature: float = 1.0,
                       topp: float = 0.9, seed: int | None = None) -> list[str]:
        """Generate after each prompt, all at once (one batched forward pass per step); sequence i samples
        with seed + i. Returns prompt + continuation for each, like `generate`."""
        from .generate import generate_batch

        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        per_seq = [steps] * len(prompts) if isinstance(steps, int) else list(steps)
        per_seq = [clamp_steps(n, self.args.max_seq_len) for n in per_seq]
        base = seed or int(time.time())  # distinct seeds: equal ones would sample the same tokens
        samplers = [Sampler(temperature, topp, base + i) for i in range(len(prompts))]
        seqs = generate_batch(self.engine, ids, per_seq, samplers)
        return [self.tokenizer.decode(p + s.generated) for p, s in zip(ids, seqs)]


def clamp_steps(steps: int, seq_len: int) -> int:
    """run.c: 0 or more than seq_len means seq_len."""
    if steps < 0:
        raise BabyLlamaError(f"steps must be >= 0, got {steps}")
    return seq_len if steps == 0 or steps > seq_len else steps


def check_device(device: str, compile: bool = False) -> None:
    """A one-line error unless `device` can run here: "numpy", or "cpu"/"cuda[:N]" with PyTorch (and a GPU)."""
    if device == "numpy":
        if compile:
            raise BabyLlamaError("--compile works with the PyTorch engine only (--device cpu or cuda)")
        return
    if device != "cpu" and not device.startswith("cuda"):
        raise BabyLlamaError(f"unknown device {device!r} (numpy, cpu, cuda or cuda:N)")
    try:
        import torch
    except ImportError:
        raise BabyLlamaError(f"--device {device} needs PyTorch: pip install 'babyllama[train]'") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BabyLlamaError(f"--device {device} requested but no CUDA GPU is available")


def make_engine(weights: formats.Weights, device: str = "numpy", plain: bool = False, compile: bool = False):
    """The NumPy engine (device "numpy"), or the PyTorch KV-cache engine on "cpu" (fp32) or "cuda[:N]"
    (bf16), its decode step compiled with torch.compile when `compile` (CUDA graphs on CUDA); both engines
    have the same `forward`/`new_cache` interface, so every generation loop runs on either."""
    check_device(device, compile)
    if device == "numpy":
        return Engine(weights, plain=plain)
    import torch

    from .model import TorchEngine, Transformer

    dtype = torch.bfloat16 if device.startswith("cuda") else None
    return TorchEngine(Transformer.from_weights(weights), device, compile=compile, dtype=dtype)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A babyllama training checkpoint: a .pt file, or a training run's folder holding ckpt.pt."""
    path = Path(path)
    return path.suffix == ".pt" or (path / "ckpt.pt").is_file()


def load(model: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
         quantize: str | None = None, plain: bool = False, device: str = "numpy", mmap: bool = True,
         compile: bool = False) -> Model:
    """Load a llama2.c .bin (default: the built-in model) or a training checkpoint (needs torch; converted
    to the same fp32 Weights) and its tokenizer. `quantize="q8_0"` converts fp32 weights to Q8_0 on load;
    `plain` selects the unoptimized reference engine; `device` "cpu" or "cuda" runs the PyTorch model
    instead of the NumPy engine (`compile`: its decode step through torch.compile); `mmap=False` reads the
    weights into memory (see formats.load)."""
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
        weights = formats.load(model, mmap=mmap)
    if quantize is not None:
        if quantize != "q8_0":
            raise BabyLlamaError(f"unknown quantization {quantize!r} (babyllama supports q8_0)")
        weights = weights.quantize()
    tok_path = tokenizer or find_tokenizer(model, weights.args.vocab_size)
    return Model(weights, Tokenizer.load(tok_path, weights.args.vocab_size), plain=plain, device=device,
                 compile=compile)


__all__ = ["Model", "load", "make_engine", "check_device", "clamp_steps", "find_tokenizer", "BOS"]
