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

import numpy as np

from ..config import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, ModelArgs, llama_hidden_dim
from ..errors import BabyLlamaError
from ..formats import Weights
from .state_dict import from_state_dict, to_state_dict

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
        raise BabyLlamaError("Meta checkpoints are PyTorch files: pip install 'babyllama[interop]'") from None
    return torch


def load_meta(folder: str | os.PathLike, max_seq_len: int | None = None) -> Weights:
    """Read a Meta checkpoint directory (params.json + consolidated.*.pth) into `Weights`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BabyLlamaError(f"{folder}: not a directory (a Meta checkpoint is a folder with params.json)")
    params_path = folder / "params.json"
    if not params_path.is_file():
        raise BabyLlamaError(f"{params_path}: missing (not a Meta checkpoint directory?)")
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise BabyLlamaError(f"{folder}: no consolidated.*.pth shards")
    try:
        params = json.loads(params_path.read_text())
    except ValueError as e:
        raise BabyLlamaError(f"{params_path}: not valid JSON ({e})") from None
    if params.get("use_scaled_rope"):
        raise BabyLlamaError(f"{params_path}: scaled RoPE (Llama 3.1) is not supported")
    if params.get("moe") or params.get("vision_chunk_size"):
        raise BabyLlamaError(f"{params_path}: unsupported architecture (only dense text Llama models)")

    torch = _torch()
    states = []
    for shard in shards:
        try:
            states.append(torch.load(shard, map_location="cpu", mmap=True, weights_only=True))
        except Exception as e:  # pickle, zip or runtime errors for a damaged file
            raise BabyLlamaError(f"{shard}: not a readable PyTorch checkpoint ({e})") from None

    def get(name: str) -> np.ndarray:
        parts = [s[name] for s in states if name in s]
        if len(parts) != len(states):
            raise KeyError(name)
        axis = shard_axis(name)
        if axis is None or len(parts) == 1:
            return parts[0].float().numpy()
        return torch.cat(parts, dim=axis).float().numpy()

    try:
        emb = get("tok_embeddings.weight")
        output = get("output.weight")
    except KeyError as e:
        raise BabyLlamaError(f"{folder}: tensor {e.args[0]} is missing") from None
    cache = {"tok_embeddings.weight": emb, "output.weight": output}
    args = _args_from_params(params, emb.shape[0], emb.shape[1], max_seq_len, params_path)
    # Meta's models never tie the classifier; one we wrote from a tied model has it equal to the embedding
    args.shared_classifier = output.shape == emb.shape and np.array_equal(output, emb)
    return from_state_dict(args, lambda n: cache[n] if n in cache else get(n), str(folder))


def _args_from_params(params: dict, vocab: int, dim: int, max_seq_len: int | None, source: Path) -> ModelArgs:
    try:
        n_heads = int(params["n_heads"])
        args = ModelArgs(
            dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=vocab if int(params.get("vocab_size", -1)) <= 0 else int(params["vocab_size"]),
            hidden_dim=llama_hidden_dim(int(params["dim"]), int(params.get("multiple_of", 256)),
                                        params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", DEFAULT_NORM_EPS)),
            rope_theta=float(params.get("rope_theta", DEFAULT_ROPE_THETA)),
            max_seq_len=int(max_seq_len or params.get("max_seq_len") or LLAMA2_CONTEXT),
        )
    except KeyError as e:
        raise BabyLlamaError(f"{source}: field {e.args[0]} is missing") from None
    except (TypeError, ValueError) as e:
        raise BabyLlamaError(f"{source}: malformed field: {e}") from None
    if args.dim != dim:
        raise BabyLlamaError(f"{source}: dim {args.dim} but tok_embeddings has {dim} columns")
    return args


def save_meta(weights: Weights, folder: str | os.PathLike, n_shards: int = 1) -> Path:
    """Write `weights` as a Meta checkpoint split into `n_shards` model-parallel shards (the layout
    `load_meta` reads; used to test it and to hand a model to Meta-format tools)."""
    torch = _torch()
    args = weights.args
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
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    (folder / "params.json").write_text(json.dumps(_params_from_args(args)) + "\n")
    return folder


def _params_from_args(args: ModelArgs) -> dict:
    """params.json for `args`. Meta derives hidden_dim from multiple_of and ffn_dim_multiplier; any width
    is reachable with multiple_of = hidden_dim and a multiplier that lands within (0, hidden_dim]."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": -1, "multiple_of": args.multiple_of, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta}
    if llama_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) != args.hidden_dim:
        params["multiple_of"] = args.hidden_dim
        params["ffn_dim_multiplier"] = args.hidden_dim / int(2 * (4 * args.dim) / 3)
    elif args.ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    assert llama_hidden_dim(args.dim, params["multiple_of"], params.get("ffn_dim_multiplier")) == args.hidden_dim
    return params
