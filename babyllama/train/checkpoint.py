"""Training checkpoints: plain dicts of tensors, numbers and strings, so `torch.load(weights_only=True)`
reads them (no pickled classes, nothing executed on load). Written to a temporary file and renamed, so a
crash never leaves a half-written ckpt.pt.

Contents: model (state dict), optimizer (keyed by parameter name, the torch.distributed.checkpoint
layout that single-device, DDP and FSDP runs share), scaler, model_args (ModelArgs as a dict), config
(TrainConfig as a dict), iter_num, best_val_loss, rng (torch CPU/CUDA and data-sampler generator states).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import ModelArgs
from ..errors import BabyLlamaError
from ..model import Transformer

FORMAT = "babyllama-checkpoint-1"
CKPT_NAME = "ckpt.pt"


def save(state: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise BabyLlamaError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file
        raise BabyLlamaError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise BabyLlamaError(f"{path}: not a babyllama training checkpoint")
    return ckpt


def model_from(ckpt: dict) -> Transformer:
    if ckpt.get("lora"):
        raise BabyLlamaError("a LoRA fine-tuning checkpoint holds only the adapter: use its base model with "
                             "--lora (its run folder, or adapter.safetensors in it)")
    args = ModelArgs.from_dict(ckpt["model_args"])
    args.dropout = 0.0  # inference
    model = Transformer(args)
    model.load_state_dict(_strip_prefixes(ckpt["model"]))
    return model.eval()


def load_model(path: str | os.PathLike) -> Transformer:
    """The model of a training checkpoint, fp32 on the CPU, in eval mode."""
    return model_from(load(path))


def _strip_prefixes(sd: dict) -> dict:
    """Accept state dicts saved from wrapped modules (torch.compile's `_orig_mod.`, DDP's `module.`)."""
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out
