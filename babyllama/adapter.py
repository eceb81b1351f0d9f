"""LoRA adapters outside training (NumPy only): the adapter files, the base model's identity, merging an
adapter into `Weights`, and writing it in PEFT's layout.

An adapter is two files side by side (train/lora.py writes them):

    adapter.safetensors   for each adapted matrix W (out, in) of layer N: layers.N.attention.wq.lora_A (r, in)
                          and layers.N.attention.wq.lora_B (out, r), fp32, llama2.c names and row order
    adapter.json          {"format", "rank", "alpha", "dropout", "targets", "base": {"args", "sha256"}}

The adapted model computes W·x + (alpha/r)·B·A·x, so merging is W' = W + (alpha/r)·B·A. "base" names the model
the adapter was trained on: its shape and a sha256 over its fp32 tensors as loaded (names, shapes, bytes).
An adapter is merged only into that model: a quantized copy of the base has other tensors, so it is another
base (merge first, then quantize).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import safeio
from .config import CKPT_NAME
from .errors import BabyLlamaError, missing_extra
from .fields import Fields
from .formats import LAYER_MATRICES, LAYER_NAMES, Weights, all_finite, dense, held_tensors, is_fp32, layer_key

FORMAT = "babyllama-lora-1"
ADAPTER_FILE = "adapter.safetensors"
IDENTITY_KEYS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta",
                 "shared_classifier")


def lora_key(layer: int, target: str, which: str) -> str:
    """The adapter tensor name of one factor: (0, "wq", "A") -> layers.0.attention.wq.lora_A."""
    return f"layers.{layer}.{LAYER_NAMES[target]}.lora_{which}"


def parse_targets(text: str | list[str]) -> list[str]:
    """"wq,wv" -> ["wq", "wv"], checked against the layer matrices."""
    names = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    names = [t for t in names if t]
    unknown = [t for t in names if t not in LAYER_MATRICES]
    if unknown or not names:
        raise BabyLlamaError(f"lora targets must be some of {','.join(LAYER_MATRICES)}, got {text!r}")
    return [t for t in LAYER_MATRICES if t in names]


# ------------------------------------------------------------------------------------------------ identity


def weights_sha256(weights: Weights) -> str:
    """sha256 over every fp32 tensor of the model (name, shape, little-endian bytes), in a fixed order."""
    h = hashlib.sha256()
    for name, m in held_tensors(weights).items():  # one tensor in fp32 at a time
        t = np.ascontiguousarray(dense(m), dtype="<f4")
        h.update(f"{name}{t.shape}".encode())
        h.update(memoryview(t).cast("B"))  # type: ignore[arg-type]  # NumPy's stubs: no __buffer__ before 3.12
    return h.hexdigest()


def base_identity(weights: Weights) -> dict:
    """What an adapter records about its base: the shape and the hash of the fp32 tensors."""
    args = weights.args.to_dict()
    return {"args": {k: args[k] for k in IDENTITY_KEYS}, "sha256": weights_sha256(weights)}


# ------------------------------------------------------------------------------------------------ files


@dataclass
class Adapter:
    rank: int
    alpha: float
    targets: list[str]
    base: dict  # base_identity() of the model it was trained on
    tensors: dict[str, np.ndarray]
    dropout: float = 0.0
    path: Path | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def config(self) -> dict:
        return {"format": FORMAT, "rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "targets": self.targets, "base": self.base}


def adapter_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(tensors, config) of an adapter given as its .safetensors, its .json or the folder holding them."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> list[Path]:
    """Write the adapter's tensors and config (each to a temporary name, then renamed)."""
    from safetensors.numpy import save_file

    tensors_path, config_path = adapter_paths(path)
    safeio.output_file(tensors_path, "adapter")
    with safeio.pending(tensors_path, "adapter") as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in adapter.tensors.items()}, str(tmp),
                  metadata={"format": FORMAT})
    safeio.write_text(config_path, json.dumps(adapter.config(), indent=2) + "\n")
    return [tensors_path, config_path]


def load_adapter(path: str | os.PathLike) -> Adapter:
    if Path(path).is_file() and Path(path).suffix not in (".safetensors", ".json"):
        raise BabyLlamaError(f"{path} is no adapter: an adapter is NAME.safetensors with NAME.json beside it, or the "
                             "folder of a LoRA run that holds them")
    tensors_path, config_path = adapter_paths(path)
    # a run folder with neither adapter file is a full fine-tune's (or any training run's); one with the config
    # alone is a LoRA run whose tensors are missing, said below
    if Path(path).is_dir() and not tensors_path.exists() and not config_path.exists() and \
            (Path(path) / CKPT_NAME).is_file():
        raise BabyLlamaError(f"{path} holds a {CKPT_NAME} but no adapter: a full fine-tune (lora_rank 0), like any "
                             f"training run, is a model of its own; run it as the model (babyllama chat {path})")
    for p in (tensors_path, config_path):
        if not p.exists():
            raise safeio.not_found(p, "adapter file", " (an adapter is NAME.safetensors with NAME.json beside it)")
        safeio.open_regular(p, "adapter file").close()  # a pipe, a device or an unreadable file: said what it is
    config = safeio.read_json(config_path, "adapter config")
    if config.get("format") != FORMAT:
        raise BabyLlamaError(f"{config_path}: not a babyllama adapter config (format {config.get('format')!r}, "
                             f"expected {FORMAT!r})")
    fields = Fields(config, str(config_path))
    rank, alpha = fields.int("rank"), fields.float("alpha")
    dropout = fields.float("dropout", 0.0, positive=False)
    if not 0.0 <= dropout < 1.0:
        raise BabyLlamaError(f"{config_path}: field dropout must be in [0, 1), got {dropout}")
    listed = fields.list("targets")  # its error names the file
    try:
        targets = parse_targets(listed)
    except BabyLlamaError as e:
        raise BabyLlamaError(f"{config_path}: {e}") from None
    base = fields.dict("base")
    identity = fields.sub("base")  # checked here, so that merging can compare it with a model's
    identity.dict("args")
    identity.str("sha256")
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise missing_extra("reading a LoRA adapter (safetensors)", "interop") from None
    try:
        tensors = load_file(str(tensors_path))
    except Exception as e:  # safetensors raises its own error type for a corrupt file
        raise safeio.unreadable_safetensors(tensors_path, e) from None
    return Adapter(rank, alpha, targets, base, tensors, dropout, tensors_path)


# ------------------------------------------------------------------------------------------------ merging


class OtherBase(BabyLlamaError):
    """An adapter given a model it was not trained on."""


def check_base(adapter: Adapter, weights: Weights, what: str = "this model") -> None:
    """One clear line unless `weights` is the model the adapter was trained on."""
    name = adapter.path or "the adapter"
    args = weights.args.to_dict()
    differ = [f"{k} {adapter.base['args'].get(k)} vs {args[k]}" for k in IDENTITY_KEYS
              if adapter.base["args"].get(k) != args[k]]
    if differ:
        raise OtherBase(f"{name} was trained on another model than {what} ({', '.join(differ)})")
    if weights_sha256(weights) != adapter.base["sha256"]:
        stacks = weights.layer_matrices().values()
        mats = (weights.tok_embeddings, weights.wcls, *(m for stack in stacks for m in stack))
        rounded = not all(is_fp32(m) for m in mats)
        hint = (": a quantized or rounded (f16, bf16) copy of the base is another base; merge into the fp32 base "
                "first, then quantize or round (babyllama export OUT.bin --model BASE --lora ADAPTER --version 2)"
                ) if rounded else ""
        raise OtherBase(f"{name} was trained on another base than {what} (same shape, other weights{hint})")


def merge(weights: Weights, adapter: Adapter, what: str = "this model") -> Weights:
    """`weights` with the adapter folded in (W + (alpha/r)·B·A for every adapted matrix), fp32."""
    check_base(adapter, weights, what)
    check_names(adapter, weights.args.n_layers)
    w = weights.to_fp32()
    merged: dict[str, Any] = {}
    for target in adapter.targets:
        stack = np.array(getattr(w, target), dtype=np.float32)  # a copy: the file's arrays are read-only
        for layer in range(w.args.n_layers):
            a, b = adapter_pair(adapter, layer, target, stack[layer].shape)
            with np.errstate(over="ignore", invalid="ignore"):  # checked below, naming the adapter
                stack[layer] += np.float32(adapter.scale) * (b @ a)
            if not all_finite(stack[layer]):
                raise BabyLlamaError(f"{adapter.path}: merging it overflows fp32 in {target} of layer {layer} "
                                     f"(alpha {adapter.alpha:g}, rank {adapter.rank}): the adapter is corrupt")
        merged[target] = stack
    return replace(w, **merged)


def check_names(adapter: Adapter, n_layers: int) -> None:
    """Refuse a tensor that no adapted matrix reads: another layer count, a target adapter.json does not list,
    or not a LoRA factor at all (left out, it would change nothing while the file claims to)."""
    expected = {lora_key(layer, target, which) for layer in range(n_layers) for target in adapter.targets
                for which in "AB"}
    unknown = sorted(set(adapter.tensors) - expected)
    if unknown:
        raise BabyLlamaError(f"{adapter.path}: tensor {unknown[0]} is none of the adapter's (targets "
                             f"{','.join(adapter.targets)} of {n_layers} layers, lora_A and lora_B)")


def adapter_pair(adapter: Adapter, layer: int, target: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of one adapted matrix of `shape`, checked."""
    pair = []
    for which, want in (("A", (adapter.rank, shape[1])), ("B", (shape[0], adapter.rank))):
        key = lora_key(layer, target, which)
        if key not in adapter.tensors:
            raise BabyLlamaError(f"{adapter.path}: tensor {key} is missing")
        t = adapter.tensors[key]
        if tuple(t.shape) != want:
            raise BabyLlamaError(f"{adapter.path}: tensor {key} has shape {tuple(t.shape)}, expected {want}")
        if not np.issubdtype(t.dtype, np.floating):
            raise BabyLlamaError(f"{adapter.path}: tensor {key} holds {t.dtype} values, not floating-point ones")
        t = t.astype(np.float32, copy=False)
        if not all_finite(t):
            raise BabyLlamaError(f"{adapter.path}: tensor {key} holds NaN or infinite values; the adapter is corrupt")
        pair.append(t)
    return pair[0], pair[1]


# ------------------------------------------------------------------------------------------------ PEFT


def save_peft(adapter: Adapter, weights: Weights, outdir: str | os.PathLike) -> Path:
    """The adapter in PEFT's layout (adapter_config.json + adapter_model.safetensors), for the base model
    exported to Hugging Face: `PeftModel.from_pretrained(base, outdir)` then computes what we do. wq/wk's B
    rows follow the Hugging Face export's rotary row order (A acts on the input side and stays as is)."""
    from safetensors.numpy import save_file

    from .interop.hf import hf_name, interleaved_to_halves

    args = weights.args
    outdir = safeio.output_dir(outdir, "adapter folder")
    tensors = {}
    for target in adapter.targets:
        shape = tuple(getattr(weights, target)[0].shape)
        for layer in range(args.n_layers):
            a, b = adapter_pair(adapter, layer, target, shape)
            if target in ("wq", "wk"):
                b = interleaved_to_halves(b, args.n_heads if target == "wq" else args.n_kv_heads)
            # the Hugging Face export's module (model.layers.N.self_attn.q_proj...), under PEFT's wrapper
            prefix = "base_model.model." + hf_name(layer_key(layer, target)).removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    with safeio.pending(outdir / "adapter_model.safetensors", "adapter") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
              "lora_dropout": adapter.dropout,
              "target_modules": [hf_name(layer_key(0, t)).split(".")[-2] for t in adapter.targets],
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "base_model_name_or_path": None}
    safeio.write_text(outdir / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return outdir
