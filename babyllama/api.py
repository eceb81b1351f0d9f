"""The Python API: `load()` a model file with its tokenizer and generate text, as the CLI does."""

from __future__ import annotations

import os
import re
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import cast

from . import formats, kernels
from .config import DEFAULT_PARALLEL, KV_CACHE_TYPES, SEED_LIMIT, ModelArgs, default_steps
from .engine import Engine
from .errors import BabyLlamaError, counted, missing_extra
from .fields import is_integer
from .generate import generate
from .loading import builtin_model, model_template, open_model, tokenizer_for
from .safeio import has_lone_surrogate
from .sampler import Controls, Sampler, choice_seed, sampling_problem
from .tokenizer import Tokenizer


class Model:
    """A loaded model: weights, engine and tokenizer together, with the generation calls the CLI makes."""

    def __init__(self, weights: formats.Weights, tokenizer: Tokenizer, plain: bool = False, device: str = "numpy",
                 compile: bool = False, source_kind: str = "bin", description: str = "", kv_cache: str = "auto",
                 chat_template: str | None = None):
        self.weights = weights
        self.engine = make_engine(weights, device, plain, compile, kv_cache)
        self.tokenizer = tokenizer
        self.source_kind = source_kind  # the format it was read from (loading.KINDS)
        self.description = description  # one line: what was loaded
        # the chat template the model takes (chat_template.TEMPLATES' name; None: Llama 2's), what `chat` and the
        # server use unless told otherwise
        self.chat_template = chat_template

    @property
    def args(self) -> ModelArgs:
        return self.weights.args

    def stream(self, prompt: str = "", steps: int | None = None, temperature: float = 1.0, topp: float = 0.9,
               seed: int | None = None, max_new_tokens: int | None = None, *, top_k: int = Controls.top_k,
               min_p: float = Controls.min_p, repeat_penalty: float = Controls.repeat_penalty,
               repeat_last_n: int = Controls.repeat_last_n, presence_penalty: float = Controls.presence_penalty,
               frequency_penalty: float = Controls.frequency_penalty,
               logit_bias: Mapping[int, float] | None = None) -> Iterator[str]:
        """Yield the text generated after `prompt`, piece by piece as tokens are sampled (a character split
        across byte tokens comes whole, once its last byte is there). `steps` counts positions as run.c's
        -n does (BOS and the prompt included; 0 or more than the context: the context; None, as -n unset: 256,
        or the context when `max_new_tokens` is given); `max_new_tokens` also bounds the generated tokens.
        temperature 0 is greedy; `topp` 1 turns top-p off; `seed` (default: a new one each call) makes sampling
        reproducible (0 included, unlike run.c's -s 0: as in the server).
        `top_k`, `min_p`, `repeat_penalty` over the last `repeat_last_n` tokens, `presence_penalty`,
        `frequency_penalty` and `logit_bias` ({token id: bias in [-100, 100]}, added to those tokens' logits) are
        llama.cpp's and OpenAI's sampling controls (sampler.Controls; the defaults: off).
        The arguments are checked on the call, before the first piece is asked for."""
        controls = make_controls(top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
                                 logit_bias)
        return self._pieces(prompt, steps, temperature, topp, seed, max_new_tokens, controls)

    def generate(self, prompt: str = "", steps: int | None = None, temperature: float = 1.0, topp: float = 0.9,
                 seed: int | None = None, max_new_tokens: int | None = None, *, top_k: int = Controls.top_k,
                 min_p: float = Controls.min_p, repeat_penalty: float = Controls.repeat_penalty,
                 repeat_last_n: int = Controls.repeat_last_n, presence_penalty: float = Controls.presence_penalty,
                 frequency_penalty: float = Controls.frequency_penalty,
                 logit_bias: Mapping[int, float] | None = None) -> str:
        """The prompt followed by the text generated after it (`stream`'s pieces, joined)."""
        controls = make_controls(top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
                                 logit_bias)
        return prompt + "".join(self._pieces(prompt, steps, temperature, topp, seed, max_new_tokens, controls))

    def _pieces(self, prompt: str, steps: int | None, temperature: float, topp: float, seed: int | None,
                max_new_tokens: int | None, controls: Controls) -> Iterator[str]:
        """`stream`'s work for its two public callers: checks and warnings now (a warning names the caller's
        caller: the user's line), the pieces as they are iterated."""
        steps = default_steps(steps, max_new_tokens)
        check_generation([prompt], steps, temperature, topp, max_new_tokens, seed, controls, self.args.vocab_size)
        max_new_tokens = python_int(max_new_tokens)
        ids = self.tokenizer.encode(prompt, bos=True)
        positions = clamp_steps(steps, self.args.max_seq_len)
        warn_if_no_room(len(ids), positions, stacklevel=3)
        sampler = Sampler(temperature, topp, choice_seed(unseeded() if seed is None else seed), controls)
        return self._decode(generate(self.engine, ids, positions, sampler,
                                     max_new=max_new_tokens), ids[-1])

    def _decode(self, tokens: Iterator[int], prev: int) -> Iterator[str]:
        text = self.tokenizer.stream(prev)
        for token in tokens:
            piece = text.push(token)
            if piece:
                yield piece
        rest = text.flush()
        if rest:
            yield rest

    def generate_batch(self, prompts: list[str], steps: int | list[int] | None = None, temperature: float = 1.0,
                       topp: float = 0.9, seed: int | None = None, max_new_tokens: int | None = None,
                       parallel: int = DEFAULT_PARALLEL, *, top_k: int = Controls.top_k,
                       min_p: float = Controls.min_p, repeat_penalty: float = Controls.repeat_penalty,
                       repeat_last_n: int = Controls.repeat_last_n, presence_penalty: float = Controls.presence_penalty,
                       frequency_penalty: float = Controls.frequency_penalty,
                       logit_bias: Mapping[int, float] | None = None) -> list[str]:
        """`generate` for every prompt at once: one batched forward pass per step, each sequence stopping on its
        own; `steps` (as `generate`'s) may differ per prompt; sequence i samples with seed + i. At most
        `parallel` sequences are live at once (each holds a KV cache; the others wait for a free slot; on the
        native kernels, whose rows do not depend on the batch, the text is the same whatever `parallel` is, on
        the numpy and numba backends the same up to rounding); the sampling controls are `stream`'s. Returns prompt +
        continuation for each, in order."""
        from .generate import generate_batch

        if isinstance(prompts, str):  # a string is a sequence too: of one-character prompts
            raise BabyLlamaError("generate_batch takes a list of prompts, not one string (generate takes one)")
        if not isinstance(prompts, Iterable):
            raise BabyLlamaError(f"generate_batch takes a list of prompts, got {type(prompts).__name__}")
        prompts = list(prompts)  # a generator or a tuple too
        per_seq: list[int]
        if steps is None:
            steps = default_steps(None, max_new_tokens)
        if is_integer(steps):
            per_seq = [cast(int, steps)] * len(prompts)
        elif isinstance(steps, Iterable) and not isinstance(steps, str):
            per_seq = list(steps)
        else:
            raise BabyLlamaError(f"steps must be an integer >= 0 or a list of them (one per prompt), got {steps!r}")
        if len(per_seq) != len(prompts):
            raise BabyLlamaError(f"steps holds {len(per_seq)} values for {len(prompts)} prompts (or give one number)")
        controls = make_controls(top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
                                 logit_bias)
        check_generation(prompts, per_seq, temperature, topp, max_new_tokens, seed, controls, self.args.vocab_size)
        max_new_tokens = python_int(max_new_tokens)
        if not (is_integer(parallel) and parallel >= 1):
            raise BabyLlamaError(f"parallel must be an integer >= 1, got {parallel!r}")
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        per_seq = [clamp_steps(n, self.args.max_seq_len) for n in per_seq]
        for i, (prompt_ids, positions) in enumerate(zip(ids, per_seq)):
            warn_if_no_room(len(prompt_ids), positions, stacklevel=2, which=f"prompt {i}")
        base = unseeded() if seed is None else seed  # distinct seeds: equal ones would sample the same tokens
        samplers = [Sampler(temperature, topp, choice_seed(base, i), controls) for i in range(len(prompts))]
        seqs = generate_batch(self.engine, ids, per_seq, samplers, max_new=max_new_tokens, max_slots=int(parallel))
        return [p + self.tokenizer.decode_text(s.generated, ids_[-1]) for p, ids_, s in zip(prompts, ids, seqs)]


def unseeded() -> int:
    """The seed of a call that names none: the clock in nanoseconds, so that every call samples anew (its seconds,
    run.c's rule for -s 0, would give every call within a second the same text); below 2**32, so that seed + i of
    a call's choices stays clear of seed 0's stand-in."""
    return time.time_ns() % 2**32


def python_int(value: int | None) -> int | None:
    """A checked count as a Python int: a NumPy integer's arithmetic wraps at its type's bounds (the positions a
    count of 2**63 - 1 tokens reaches would come out negative)."""
    return None if value is None else int(value)


def check_generation(prompts: list[str], steps: int | list[int], temperature: float, topp: float,
                     max_new_tokens: int | None, seed: int | None = None, controls: Controls | None = None,
                     vocab_size: int | None = None) -> None:
    """The checks the CLI makes on its flags, for callers of the Python API (a logit bias's token ids against
    `vocab_size` where given): one BabyLlamaError each."""
    if seed is not None and not (is_integer(seed) and 0 <= seed < SEED_LIMIT):
        raise BabyLlamaError(f"seed must be an integer in [0, 2**63) (or None), got {seed!r}")
    if not all(isinstance(p, str) for p in prompts):
        raise BabyLlamaError("a prompt must be a string")
    if any(has_lone_surrogate(p) for p in prompts):  # the tokenizer would feed the model its CESU-8 bytes
        raise BabyLlamaError("a prompt holds half a UTF-16 surrogate pair (such as '\\ud800' alone), which is no "
                             "character: it has no UTF-8 bytes to encode")
    for n in steps if isinstance(steps, list) else [steps]:
        if not is_integer(n) or n < 0:
            raise BabyLlamaError(f"steps must be an integer >= 0, got {n!r}")
    problem = sampling_problem(temperature, topp)
    if problem:
        raise BabyLlamaError(" ".join(problem))
    if max_new_tokens is not None and not (is_integer(max_new_tokens) and max_new_tokens >= 1):
        raise BabyLlamaError(f"max_new_tokens must be an integer >= 1 (or None), got {max_new_tokens!r}")
    problem = controls.problem(vocab_size) if controls is not None else None
    if problem:
        raise BabyLlamaError(" ".join(problem))


def make_controls(top_k: int, min_p: float, repeat_penalty: float, repeat_last_n: int, presence_penalty: float,
                  frequency_penalty: float, logit_bias: Mapping[int, float] | None) -> Controls:
    """The API's sampling arguments as sampler.Controls (checked later, by check_generation)."""
    if logit_bias is not None and not isinstance(logit_bias, Mapping):
        raise BabyLlamaError(f"logit_bias must map token ids to biases (a dict), got {type(logit_bias).__name__}")
    return Controls(top_k, min_p, repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty,
                    tuple((logit_bias or {}).items()))


def warn_if_no_room(n_ids: int, positions: int, stacklevel: int, which: str = "the prompt") -> None:
    """As run.c, nothing follows a prompt longer than the positions allowed (one that fills them exactly gets
    the token sampled at its last position): say so (the CLI warns too).
    `stacklevel` is what warnings.warn would take in the caller."""
    if n_ids > positions:
        warnings.warn(f"{which} is {n_ids} tokens (with BOS) and steps allows {counted(positions, 'position')} "
                      "(the context at most): nothing is generated", stacklevel=stacklevel + 1)


def clamp_steps(steps: int, seq_len: int) -> int:
    """run.c: 0 or more than seq_len means seq_len."""
    if steps < 0:
        raise BabyLlamaError(f"steps must be >= 0, got {steps}")
    return seq_len if steps == 0 or steps > seq_len else steps


def _check_type(what: str, value: object, kind: type) -> None:
    """Flags taken by their truth ("no" is true) and names that are no strings (a TypeError deeper in) refused."""
    if not isinstance(value, kind):
        raise BabyLlamaError(f"{what} must be {'True or False' if kind is bool else 'a string'}, got {value!r}")


def check_device(device: str, compile: bool = False) -> None:
    """A one-line error unless `device` can run here: "numpy", or "cpu"/"cuda[:N]" with PyTorch (and a GPU)."""
    _check_type("device", device, str)
    _check_type("compile", compile, bool)
    if device == "numpy":
        if compile:
            raise BabyLlamaError("--compile works with the PyTorch engine only (--device cpu or cuda)")
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BabyLlamaError(f"unknown device {device!r} (numpy, cpu, cuda or cuda:N)")
    try:
        import torch
    except ImportError:
        raise missing_extra(f"--device {device} (the PyTorch engine)", "train") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BabyLlamaError(f"--device {device} requested but no CUDA GPU is available")


def check_kv_cache(kv_cache: str, device: str = "numpy") -> None:
    """A one-line error unless `kv_cache` names a cache type the engine on `device` takes."""
    _check_type("kv_cache", kv_cache, str)
    if kv_cache not in KV_CACHE_TYPES:
        raise BabyLlamaError(f"unknown KV cache type {kv_cache!r} (choose {', '.join(KV_CACHE_TYPES)})")
    if kv_cache != "auto" and device != "numpy":
        raise BabyLlamaError("--kv-cache works with the NumPy engine only (the PyTorch engine keeps its cache in "
                             "its compute type: fp32 on cpu, bf16 on cuda)")


def check_quantize(quantize: str | None, device: str = "numpy") -> None:
    """A one-line error where `quantize` asks for Q8_0 or Q4_0 arithmetic that the engine on `device` lacks: the
    PyTorch engine would dequantize the weights again and compute in its own type (f16 and bf16 weights are the
    numbers they stand for in either engine)."""
    if quantize in ("q8_0", "q4_0") and device != "numpy":
        raise BabyLlamaError(f"--quantize {quantize} works with the NumPy engine only (the PyTorch engine would "
                             "dequantize the weights and compute in fp32 on cpu, bf16 on cuda)")


def check_plain(plain: bool, device: str = "numpy") -> None:
    """A one-line error where the plain reference engine (NumPy's) is asked for on a PyTorch device."""
    _check_type("plain", plain, bool)
    if plain and device != "numpy":
        raise BabyLlamaError(f"--plain is the NumPy reference engine: it cannot be combined with --device {device}")


def make_engine(weights: formats.Weights, device: str = "numpy", plain: bool = False, compile: bool = False,
                kv_cache: str = "auto"):
    """The NumPy engine (device "numpy"), or the PyTorch KV-cache engine on "cpu" (fp32) or "cuda[:N]"
    (bf16), its decode step compiled with torch.compile when `compile` (CUDA graphs on CUDA); both engines
    have the same `forward`/`new_cache` interface, so every generation loop runs on either. `kv_cache`: the
    NumPy engine's cache type, "auto" (f16 for Q8_0/Q4_0 weights, f32 otherwise), "f32", "f16" or "q8_0"."""
    check_kv_cache(kv_cache, device)  # first: a flag clash needs no PyTorch to be told
    check_plain(plain, device)
    check_device(device, compile)
    if device == "numpy":
        return Engine(weights, plain=plain, kv_cache=kv_cache)
    import torch

    from .model import TorchEngine, Transformer

    dtype = torch.bfloat16 if device.startswith("cuda") else None
    return TorchEngine(Transformer.from_weights(weights), device, compile=compile, dtype=dtype)


def load(model: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
         quantize: str | None = None, plain: bool = False, device: str = "numpy", mmap: bool | None = None,
         compile: bool = False, lora: str | os.PathLike | None = None, kv_cache: str = "auto") -> Model:
    """Load a model (default: the built-in one) of any format babyllama reads (a .bin, GGUF, Hugging Face or
    Meta folder, training checkpoint: see loading.py) with its tokenizer (`tokenizer`, else the model's own,
    for a .bin or a checkpoint, tokenizer.bin beside it, else for a .bin the built-in one when the vocabularies
    match).
    `quantize` (q8_0, q4_0, f16, bf16) converts the weights on load; `plain` selects the unoptimized reference
    engine; `device` "cpu" or "cuda" runs the PyTorch model instead of the NumPy engine (`compile`: its
    decode step through torch.compile); `mmap`, for a llama2.c .bin file only (refused for other formats, which
    are read their own way: a GGUF file is always mapped), True maps the file, False reads the weights into memory,
    None (the default) reads files that take at most a quarter of the free memory (see formats.load).
    `lora` merges a LoRA adapter (its .safetensors, or the fine-tuning run's folder) into the weights first:
    it must have been trained on this very model (see adapter.py). The chat template the model takes
    (`Model.chat_template`) is its card's (loading.model_card), else the file's own where it is a known one; with
    `lora`, Llama 2's, which fine-tuning renders conversations with. `kv_cache` is the KV cache's type:
    "f32", "f16" (half the bytes attention reads per token), "q8_0" (int8 with a scale per 32 values: about
    half of fp16's bytes), or "auto": f16 when the weights are quantized (Q8_0/Q4_0, as loaded or by
    `quantize`), f32 otherwise."""
    for what, value in (("model", model), ("tokenizer", tokenizer), ("lora", lora)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise BabyLlamaError(f"{what} must be a path (str or os.PathLike), got {type(value).__name__}")
        if value is not None and not isinstance(os.fspath(value), str):  # a PathLike may give bytes (os.scandir(b"."))
            raise BabyLlamaError(f"{what} must be a path whose name is a str, got a bytes path")
        if value is not None and not os.fspath(value):  # it would name the current folder
            raise BabyLlamaError(f"{what} is an empty path")
    if mmap is not None and not isinstance(mmap, bool):
        raise BabyLlamaError(f"mmap must be True, False or None, got {mmap!r}")
    check_kv_cache(kv_cache, device)  # before the model is read
    check_quantize(quantize, device)
    check_plain(plain, device)
    check_device(device, compile)
    # a LoRA adapter is merged into the fp32 weights, quantized after it; the PyTorch engine computes in its own
    # type, so a GGUF's types of no native kernel's reach it as the file's weights, not converted for the kernels,
    # and so does a merge: an adapter was trained on (and knows by the hash of) the file's own weights
    source = open_model(builtin_model() if model is None else model, mmap=mmap, read_once=quantize is not None,
                        quantize=quantize if lora is None else None,
                        convert_other_types=device == "numpy" and lora is None)
    weights = source.weights
    description = source.describe()
    if lora is not None:
        from .adapter import load_adapter, merge

        adapter = load_adapter(lora)
        weights = merge(weights, adapter, str(source.path))
        if quantize is not None:
            weights = weights.quantize_as(quantize, kernels.q4_0_blocks)
        # the weights that run: merged in fp32 (whatever the base's type), then quantized if asked
        running = replace(source, weights=weights, merged=True, quantized=quantize is not None)
        description = f"{running.describe()}, LoRA adapter {adapter.path} merged (rank {adapter.rank})"
    template = None if lora is not None else model_template(source, None if model is None else os.fspath(model))
    return Model(weights, tokenizer_for(source, tokenizer), plain=plain, device=device, compile=compile,
                 source_kind=source.kind, description=description, kv_cache=kv_cache, chat_template=template)

__all__ = ["Model", "load", "make_engine", "check_device", "check_kv_cache", "check_plain", "check_quantize",
           "clamp_steps"]
