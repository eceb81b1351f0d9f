"""Meta's original Llama checkpoints ⇄ `Weights`.

A Meta directory holds `params.json` and `consolidated.00.pth`, `consolidated.01.pth`, ...: one shard
per model-parallel rank (1 for 7B, 2 for 13B, 8 for 70B). Each shard holds a slice of every matrix, cut
the way Meta's fairscale layers split them, so the full tensor is the concatenation along:
  - dim 0 (output rows) for the column-parallel layers: wq, wk, wv, w1, w3 and output;
  - dim 1 (input columns) for the row-parallel layers wo and w2, and for tok_embeddings
    (ParallelEmbedding splits the embedding dimension);
  - norms are replicated: every shard has the whole vector.
Names and the interleaved rotary order are llama2.c's already (llama2.c copied Meta's model.py).

`params.json` has no hidden_dim: it is derived from dim, multiple_of and ffn_dim_multiplier (checked
against the shards' w1), and Llama 2's ships vocab_size -1 (taken from tok_embeddings). It has no context
length either: max_seq_len comes from the caller, else params.json's own "max_seq_len", else Llama 2's
4096; rope_theta from params.json where present (Code Llama, Llama 3), else 10000.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import safeio
from ..config import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, LIMITS, ModelArgs, checked_args, llama_hidden_dim
from ..errors import BabyLlamaError, missing_extra
from ..fields import Fields
from ..formats import BF16Tensor, Weights, check_writable
from .state_dict import (
    check_torch_state,
    from_state_dict,
    load_torch_weights,
    same_values,
    to_state_dict,
    torch_weight,
)

LLAMA2_CONTEXT = 4096
_ROWS = ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3", "output")
_COLS = ("attention.wo", "feed_forward.w2", "tok_embeddings")


def shard_axis(name: str) -> int | None:
    """The axis along which Meta's model-parallel shards split tensor `name` (None: replicated)."""
    stem = name.removesuffix(".weight")
    if stem.endswith(_ROWS):
        return 0
    if stem.endswith(_COLS):
        return 1
    return None


def _torch():
    try:
        import torch
    except ImportError:
        raise missing_extra("reading Meta checkpoints (PyTorch files)", "interop") from None
    return torch


def load_meta(folder: str | os.PathLike, max_seq_len: int | None = None, quantize: str | None = None,
              read: list[Path] | None = None) -> Weights:
    """Read a Meta checkpoint directory (params.json + consolidated.*.pth) into `Weights`; `quantize`: each
    matrix quantized as it is read (from_state_dict). The files read are added to `read`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BabyLlamaError(f"{folder}: not a directory (a Meta checkpoint is a folder with params.json)")
    params_path = folder / "params.json"
    if not os.path.lexists(params_path):
        raise BabyLlamaError(f"{params_path}: missing (not a Meta checkpoint directory?)")
    safeio.check_regular(params_path, "params.json")
    shards = sorted(folder.glob("consolidated.*.pth"), key=_shard_number)  # by rank: "10" after "9", not "1"
    if not shards:
        raise BabyLlamaError(f"{folder}: no consolidated.*.pth shards")
    check_shard_numbers(folder, shards)
    if read is not None:
        read += [params_path, *shards]
    params = Fields(safeio.read_json(params_path, "params.json"), str(params_path))
    if params.data.get("use_scaled_rope"):
        raise BabyLlamaError(f"{params_path}: scaled RoPE (Llama 3.1) is not supported")
    if params.data.get("moe") or params.data.get("vision_chunk_size"):
        raise BabyLlamaError(f"{params_path}: unsupported architecture (only dense text Llama models)")

    torch = _torch()
    states = [check_torch_state(load_torch_weights(shard, "checkpoint shard"), shard) for shard in shards]

    def get(name: str) -> np.ndarray | BF16Tensor:
        parts = [s[name] for s in states if name in s]
        if len(parts) != len(states):
            raise KeyError(name)
        if not all(p.is_floating_point() for p in parts):
            raise BabyLlamaError(f"{folder}: tensor {name} holds {parts[0].dtype} values, not floating-point weights")
        axis = shard_axis(name)
        if axis is None or len(parts) == 1:
            return torch_weight(parts[0])
        try:
            return torch_weight(torch.cat(parts, dim=axis))
        except RuntimeError:
            shapes = ", ".join(str(tuple(p.shape)) for p in parts)
            raise BabyLlamaError(f"{folder}: the shards of {name} do not fit together ({shapes})") from None

    try:
        emb = get("tok_embeddings.weight")
        output = get("output.weight")
    except KeyError as e:
        raise BabyLlamaError(f"{folder}: tensor {e.args[0]} is missing") from None
    if len(emb.shape) != 2 or len(output.shape) != 2:
        raise BabyLlamaError(f"{folder}: tok_embeddings and output must be matrices")
    cache = {"tok_embeddings.weight": emb, "output.weight": output}
    args = _args_from_params(params, emb.shape[0], emb.shape[1], max_seq_len, params_path)
    # Meta's models never tie the classifier; one we wrote from a tied model has it equal to the embedding
    args.shared_classifier = same_values(output, emb)
    asked = set(cache)

    def fetch(name: str) -> np.ndarray | BF16Tensor:
        asked.add(name)
        return cache.pop(name) if name in cache else get(name)

    # each tensor is fetched once: popped, the two read ahead are dropped once used (quantized, with quantize)
    weights = from_state_dict(args, fetch, str(folder), quantize=quantize)
    extra = sorted({name for state in states for name in state} - asked - {"rope.freqs"})  # Meta's RoPE table
    if extra:
        raise BabyLlamaError(f"{folder}: unexpected tensor {extra[0]} for a model of {args.n_layers} layers "
                             f"({len(extra)} in all; does {params_path.name} describe these shards?)")
    return weights


def _shard_number(path: Path) -> tuple[int, str]:
    """A shard's rank (consolidated.RANK.pth), -1 for a name without one (refused by check_shard_numbers)."""
    rank = path.name.split(".")[1]
    return (int(rank) if rank.isdigit() else -1, path.name)


def check_shard_numbers(folder: Path, shards: list[Path]) -> None:
    """Meta's shards are consolidated.00.pth to consolidated.NN.pth, one per model-parallel rank: a gap or a
    name without a rank would be concatenated into matrices of the wrong size, and said as such. (A missing or
    extra last rank leaves no gap: the tensors' sizes against params.json tell that one.)"""
    numbers = [_shard_number(p)[0] for p in shards]
    if numbers != list(range(len(shards))):
        names = ", ".join(p.name for p in shards)
        raise BabyLlamaError(f"{folder}: the shards must be consolidated.00.pth to consolidated."
                             f"{len(shards) - 1:02d}.pth, one per rank; found {names}")


def _args_from_params(params: Fields, vocab: int, dim: int, max_seq_len: int | None, source: Path) -> ModelArgs:
    n_dim = params.int("dim", hi=LIMITS["dim"])
    n_heads = params.int("n_heads", hi=LIMITS["n_heads"])
    vocab_size = params.int("vocab_size", -1, lo=-1, hi=LIMITS["vocab_size"])
    try:
        hidden_dim = llama_hidden_dim(n_dim, params.int("multiple_of", 256, hi=LIMITS["hidden_dim"]),
                                      params.float("ffn_dim_multiplier", None))
    except ValueError as e:
        raise BabyLlamaError(f"{source}: {e}") from None
    args = checked_args(
        str(source), dim=n_dim, n_layers=params.int("n_layers", hi=LIMITS["n_layers"]), n_heads=n_heads,
        n_kv_heads=params.int("n_kv_heads", n_heads, hi=LIMITS["n_kv_heads"]),
        vocab_size=vocab if vocab_size <= 0 else vocab_size, hidden_dim=hidden_dim,
        norm_eps=params.float("norm_eps", DEFAULT_NORM_EPS), rope_theta=params.float("rope_theta", DEFAULT_ROPE_THETA),
        max_seq_len=max_seq_len or params.int("max_seq_len", LLAMA2_CONTEXT, hi=LIMITS["max_seq_len"]),
    )
    if args.dim != dim:
        raise BabyLlamaError(f"{source}: dim {args.dim} but tok_embeddings has {dim} columns")
    return args


def save_meta(weights: Weights, folder: str | os.PathLike, n_shards: int = 1) -> Path:
    """Write `weights` as a Meta checkpoint split into `n_shards` model-parallel shards (the layout
    `load_meta` reads; used to test it and to hand a model to Meta-format tools)."""
    torch = _torch()
    args = weights.args
    check_writable(args, folder)
    sd = to_state_dict(weights)
    sd.setdefault("output.weight", sd["tok_embeddings.weight"])  # Meta's model always has its own output
    for name, t in sd.items():
        axis = shard_axis(name)
        if axis is not None and t.shape[axis] % n_shards:
            raise BabyLlamaError(f"cannot split {name} {t.shape} into {n_shards} shards")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(n_shards):
        shard = {}
        for name, t in sd.items():
            axis = shard_axis(name)
            piece = t if axis is None else np.split(t, n_shards, axis=axis)[rank]
            shard[name] = torch.from_numpy(np.array(piece))  # a writable copy (the weights may be a read-only map)
        with safeio.atomic_write(folder / f"consolidated.{rank:02d}.pth") as f:
            torch.save(shard, f)
    safeio.write_text(folder / "params.json", json.dumps(_params_from_args(args)) + "\n")
    return folder


def _params_from_args(args: ModelArgs) -> dict:
    """params.json for `args`. Meta derives hidden_dim from multiple_of and ffn_dim_multiplier; any width
    is reachable with multiple_of = hidden_dim and a multiplier that lands within (0, hidden_dim]."""
    params: dict[str, Any] = {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "vocab_size": -1, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps, "rope_theta": args.rope_theta}
    if llama_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) != args.hidden_dim:
        params["multiple_of"] = args.hidden_dim
        params["ffn_dim_multiplier"] = args.hidden_dim / int(2 * (4 * args.dim) / 3)
    elif args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    assert llama_hidden_dim(args.dim, params["multiple_of"], params.get("ffn_dim_multiplier")) == args.hidden_dim
    return params
