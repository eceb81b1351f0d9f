"""LoRA (Hu et al., 2021) on our own PyTorch Transformer: a few lines of wrapper rather than PEFT.

`apply_lora` freezes every parameter of the model and replaces each targeted projection (wq, wk, wv, wo,
w1, w2, w3 of every layer) by a `LoRALinear` that keeps the same frozen weight (under the same state-dict name)
and adds a trainable low-rank path:

    y = W·x + (alpha/r) · B·A·dropout(x)        A (r, in): Kaiming-uniform, B (out, r): zeros

so training starts from exactly the base model, and only A and B get gradients and optimizer state. Their
state-dict names (layers.N.attention.wq.lora_A, ...) are the adapter file's (babyllama/adapter.py), which
merges them into the base for inference: W' = W + (alpha/r)·B·A.

Why not PEFT: PEFT wraps Hugging Face modules and renames every parameter (base_model.model...), which our
checkpoints, DDP/FSDP state dicts and llama2.c names would all have to undo; the whole method is the class
below. We still write PEFT's layout on export (adapter.save_peft) for people who use it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import Adapter, parse_targets
from ..config import ModelArgs
from ..errors import BabyLlamaError
from ..formats import LAYER_NAMES
from ..model import Transformer


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable rank-r update (see the module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.weight = base.weight  # the frozen base matrix, under its own name
        self.weight.requires_grad_(False)
        out_features, in_features = self.weight.shape
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight) + self.scale * update


def apply_lora(model: Transformer, rank: int, alpha: float, dropout: float, targets: str | list[str]) -> list[str]:
    """Freeze `model` and wrap its `targets` in every layer; returns the trainable parameters' names."""
    model.requires_grad_(False)
    for layer in model.layers:
        for target in parse_targets(targets):
            parent_name, attr = LAYER_NAMES[target].split(".")
            parent = getattr(layer, parent_name)
            setattr(parent, attr, LoRALinear(getattr(parent, attr), rank, alpha, dropout))
    return [name for name, p in model.named_parameters() if p.requires_grad]


def check_rank(rank: int, targets: str | list[str], args: ModelArgs) -> None:
    """A rank above the smaller side of a matrix it adapts adds parameters (and memory) but nothing the update
    could express: refused."""
    names = set(parse_targets(targets))
    sides = [args.dim]  # wq, wo: dim x dim; every matrix has dim on one side
    sides += [args.kv_dim] if names & {"wk", "wv"} else []
    sides += [args.hidden_dim] if names & {"w1", "w2", "w3"} else []
    if rank > min(sides):
        raise BabyLlamaError(f"lora_rank {rank} is more than the smallest side ({min(sides)}) of the matrices it "
                             "adapts")


def is_factor(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


def adapter_from_state(state: dict, config: dict) -> Adapter:
    """The LoRA factors of a model state dict as an `Adapter` (config: rank, alpha, dropout, targets, base)."""
    tensors = {name: t.detach().float().cpu().numpy() for name, t in state.items() if is_factor(name)}
    return Adapter(config["rank"], config["alpha"], list(config["targets"]), config["base"], tensors,
                   config.get("dropout", 0.0))


def load_factors(model: nn.Module, tensors: dict[str, np.ndarray]) -> None:
    """Copy adapter tensors into the model's LoRA factors (names must match exactly)."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        params[name].data.copy_(torch.as_tensor(value))
