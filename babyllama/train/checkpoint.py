"""Training checkpoints: plain dicts of tensors, numbers and strings, so `torch.load(weights_only=True)`
reads them (no pickled classes, nothing executed on load). Written to a temporary file and renamed, so a
crash never leaves a half-written ckpt.pt.

Contents: model (state dict), optimizer (keyed by parameter name, the torch.distributed.checkpoint
layout that single-device, DDP and FSDP runs share), scaler, model_args (ModelArgs as llama2.c names it: see
portable_model_args), config (TrainConfig as a dict, with llama2.c's vocab_source: see portable_config),
iter_num, best_val_loss, rng (torch CPU/CUDA and data-sampler generator states).
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch

from .. import safeio
from ..config import CKPT_NAME, DEFAULT_ROPE_THETA, LLAMA2_VOCAB_SIZE, ModelArgs, checked_args
from ..errors import BabyLlamaError
from ..interop.state_dict import expected_shapes, torch_load_failure
from ..model import Transformer

FORMAT = "babyllama-checkpoint-1"
# what a model's weights may be held as; other floating types (float8) lack the operations loading needs
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# the fields of llama2.c model.py's ModelArgs, which its export.py and sample.py build as ModelArgs(**model_args)
LLAMA2C_MODEL_ARGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "multiple_of",
                      "norm_eps", "max_seq_len", "dropout")


def portable_model_args(args: ModelArgs) -> dict:
    """model_args for a checkpoint: llama2.c's fields only where llama2.c computes the same model, so that its
    export.py and sample.py read what we train. What its model cannot compute (another RoPE base, a classifier
    of its own) is written as well, and its ModelArgs then refuses the unknown key instead of building a
    different model. ffn_dim_multiplier is left out: hidden_dim holds its effect. Readers take the missing fields'
    defaults, which are llama2.c's fixed choices."""
    d = args.to_dict()
    out = {k: d[k] for k in LLAMA2C_MODEL_ARGS}
    if args.rope_theta != DEFAULT_ROPE_THETA:
        out["rope_theta"] = args.rope_theta
    if not args.shared_classifier:
        out["shared_classifier"] = False
    return out


def portable_config(config: dict, vocab_size: int) -> dict:
    """A run's config for a checkpoint, with llama2.c's vocab_source, which its sample.py reads to find the
    tokenizer: "custom" (data/tokN.model, where `data train-vocab` writes it too) or, for a vocabulary of Meta's
    size, "llama2" (Meta's tokenizer.model). Without it sample.py takes Meta's for any model: a prompt then
    holds ids past a small vocabulary, and generated ids decode as other text."""
    return {**config, "vocab_source": "llama2" if vocab_size == LLAMA2_VOCAB_SIZE else "custom"}


def save(state: dict, path: str | os.PathLike) -> None:
    with safeio.atomic_write(path) as f:
        torch.save({"format": FORMAT, **state}, f)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not os.path.lexists(path):
        raise BabyLlamaError(f"checkpoint not found: {path}")
    safeio.check_regular(path, "checkpoint")
    if path.stat().st_size == 0:
        raise BabyLlamaError(f"{path}: empty checkpoint (a write that was interrupted?)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise BabyLlamaError(f"cannot read checkpoint {path}: {torch_load_failure(path, e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or \
            not isinstance(ckpt.get("model_args"), dict):
        raise BabyLlamaError(f"{path}: not a training checkpoint (babyllama's or llama2.c's: model and model_args)")
    return ckpt


def model_from(ckpt: dict, source: str = "checkpoint") -> Transformer:
    """The checkpoint's model, after its shape and every tensor were checked against each other (a model is
    only built, and its memory only allocated, for a shape the tensors present confirm)."""
    if ckpt.get("lora"):
        base = (ckpt.get("config") or {}).get("base")
        named = f" ({base})" if isinstance(base, str) and base else ""
        raise BabyLlamaError(f"{source} is a LoRA fine-tune, which holds only the adapter: give its base model{named} "
                             "with --lora RUN (the run folder, or adapter.safetensors in it), as `babyllama run|chat|"
                             "eval|serve BASE --lora RUN` take it, or merge it: `babyllama export OUT.bin --model "
                             "BASE --lora RUN`")
    known = {f.name for f in fields(ModelArgs)}
    values = {k: v for k, v in ckpt["model_args"].items() if k in known}
    values["dropout"] = 0.0  # inference
    args = checked_args(source, **values)
    sd = _strip_prefixes(ckpt["model"])
    expected = expected_shapes(args)
    if args.shared_classifier:
        expected["output.weight"] = expected["tok_embeddings.weight"]  # tied: saved under both names
    check_tensors(sd, expected, source, f" for a model of {args.n_layers} layers", optional=("output.weight",))
    model = Transformer(args)
    model.load_state_dict(sd, strict=not args.shared_classifier or "output.weight" in sd)
    return model.eval()


def check_tensors(state: dict, expected: dict[str, tuple[int, ...]], source: str, context: str = "",
                  optional: tuple[str, ...] = ()) -> None:
    """Every tensor of `state` is one of `expected` (name -> shape; `context` says whose, in the message), dense
    float of that shape and finite, and every expected one but `optional` is there."""
    for name, t in state.items():
        if name not in expected:
            raise BabyLlamaError(f"{source}: unexpected tensor {name}{context}")
        if not isinstance(t, torch.Tensor) or t.dtype not in WEIGHT_DTYPES or t.layout != torch.strided:
            layout = "" if not isinstance(t, torch.Tensor) or t.layout == torch.strided else f"{t.layout} "
            what = f"a {layout}{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise BabyLlamaError(f"{source}: {name} is {what}, not dense float32/16, bfloat16 or float64 weights")
        want = tuple(expected[name])
        if tuple(t.shape) != want:
            raise BabyLlamaError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {want}")
        if not bool(torch.isfinite(t).all()):
            raise BabyLlamaError(f"{source}: tensor {name} holds NaN or infinite values; the file is corrupt")
    missing = [n for n in expected if n not in state and n not in optional]
    if missing:
        raise BabyLlamaError(f"{source}: tensor {missing[0]} is missing")


def check_resumed_state(ckpt: dict, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """The model and optimizer states a resumed run loads, against what it trains (`expected`: the model's state
    names and shapes). It refuses, before training starts, what loading would otherwise let through: an integer
    tensor (load_state_dict casts it), NaN or infinite values (training would go on from them), a missing tensor
    (its fresh initialization would stay) and an optimizer moment of another shape (it fails only at the first
    step, with a traceback)."""
    check_tensors(_strip_prefixes(ckpt["model"]), expected, source)
    states = ckpt["optimizer"].get("state")
    if not isinstance(states, dict):
        raise BabyLlamaError(f"{source}: the optimizer state holds no per-parameter state")
    for name, state in states.items():
        moments = {k: v for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")} if isinstance(state, dict) else {}
        if name not in expected or not isinstance(state, dict):
            raise BabyLlamaError(f"{source}: optimizer state for {name}, which the model does not train")
        check_tensors(moments, {k: expected[name] for k in moments}, f"{source}: optimizer state of {name}")


def check_resumable(ckpt: dict, source: str) -> None:
    """What resuming reads besides the model: optimizer state, counters, generator states, config."""
    ok = (isinstance(ckpt.get("optimizer"), dict) and isinstance(ckpt.get("config"), dict) and
          isinstance(ckpt.get("iter_num"), int) and not isinstance(ckpt.get("iter_num"), bool) and
          ckpt["iter_num"] >= 0 and isinstance(ckpt.get("best_val_loss"), (int, float)) and
          isinstance(ckpt.get("rng"), dict) and
          all(isinstance(ckpt["rng"].get(k), torch.Tensor) and ckpt["rng"][k].dtype == torch.uint8
              for k in ("torch", "data")))
    if not ok and is_llama2c(ckpt):
        raise BabyLlamaError(f"{source} was written by llama2.c's train.py, whose runs babyllama cannot resume (no "
                             "data-sampler state, the optimizer's keyed otherwise): run, sample and export read it, "
                             "and `babyllama finetune --base=CKPT` trains on from its weights")
    if not ok:
        raise BabyLlamaError(f"{source}: not a resumable training checkpoint (its optimizer state, counters or "
                             "generator states are missing or malformed)")


def is_llama2c(ckpt: dict) -> bool:
    """Whether a checkpoint is llama2.c train.py's: no format tag, and its config holds train.py's own keys."""
    config = ckpt.get("config")
    return "format" not in ckpt and isinstance(config, dict) and "vocab_source" in config


def load_model(path: str | os.PathLike) -> Transformer:
    """The model of a training checkpoint, fp32 on the CPU, in eval mode."""
    return model_from(load(path), str(path))


def _strip_prefixes(sd: dict) -> dict:
    """Accept state dicts saved from wrapped modules (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            if isinstance(k, str) and k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out
