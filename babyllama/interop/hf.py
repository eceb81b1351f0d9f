"""Hugging Face Llama checkpoints ⇄ `Weights`.

A Hugging Face Llama directory is `config.json` plus the weights in `model.safetensors` (or
`pytorch_model.bin`), possibly sharded with an index file (`*.index.json`) naming the shard of each
tensor. Reading needs `safetensors` (torch only for `pytorch_model*.bin`); `transformers` is never
imported.

The one real difference from Meta's layout is rotary position embedding. Meta (and llama2.c, and GGUF)
rotate interleaved pairs (q[2i], q[2i+1]) of each head; Hugging Face's LlamaAttention rotates the two
halves (q[i], q[i + hs/2]) ("rotate_half"), so its conversion script permuted the rows of wq and wk of
every head: HF row (h*hs/2 + i) of a head is Meta row (2i + h), h ∈ {0, 1}. The dot products q·k are the
same either way as long as q and k agree; we undo the permutation on import and redo it on export. wk
has n_kv_heads heads, not n_heads (grouped-query models such as TinyLlama): upstream export.py's bug.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import safeio
from ..config import CHAT_TEMPLATE_FILE, DEFAULT_ROPE_THETA, LIMITS, SENTENCEPIECE_MODEL, ModelArgs, checked_args
from ..errors import BabyLlamaError, missing_extra, note
from ..fields import Fields
from ..formats import (
    BF16Tensor,
    Matrix,
    Weights,
    bf16_to_f32,
    check_writable,
    dense,
    held_tensors,
    in_turn,
    to_bf16,
    to_f16,
)
from ..tokenizer import BOS, EOS, vocab_mismatch
from .state_dict import (
    check_torch_state,
    expected_shapes,
    from_state_dict,
    load_torch_weights,
    same_values,
    torch_weight,
)
from .vocab import LLAMA2C_CONVENTION

# llama2.c name fragment -> Hugging Face name fragment (the rest of the name is shared: layers.N...weight)
_HF_PARTS = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")  # a buffer older transformers versions saved


def hf_name(name: str) -> str:
    """The Hugging Face name of a llama2.c tensor name."""
    if name in _TOP:
        return _TOP[name]
    m = _LAYER.fullmatch(name)
    assert m is not None  # callers pass the names of expected_shapes
    return f"model.layers.{m.group(1)}.{_HF_PARTS[m.group(2)]}.weight"


# ------------------------------------------------------------------------------------------- rotary order


def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's row order of wq/wk (pairs 2i, 2i+1 per head) -> Hugging Face's (halves i, i+hs/2)."""
    out, n_in = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, n_in).swapaxes(1, 2).reshape(out, n_in)


def halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `interleaved_to_halves` (llama2.c export.py's permute_reverse)."""
    out, n_in = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, n_in).swapaxes(1, 2).reshape(out, n_in)


# ------------------------------------------------------------------------------------------------ config


# transformers' LlamaConfig default, which a config.json without rms_norm_eps runs with (not Llama 2's 1e-5)
HF_NORM_EPS = 1e-6


def args_from_config(config: dict, max_seq_len: int | None = None, source: str = "config.json") -> ModelArgs:
    """ModelArgs from a Hugging Face LlamaConfig dict, refusing what babyllama's engine cannot run; every
    field's type and range is checked (`"tie_word_embeddings": "false"` is a string, not a bool)."""
    f = Fields(config, source)
    _check_llama_architecture(f, source)
    act = f.str("hidden_act", "silu")
    if act not in ("silu", "swish"):  # transformers' ACT2FN computes "swish" as x * sigmoid(x) too
        raise BabyLlamaError(f"{source}: hidden_act '{act}' is not supported (Llama uses silu)")
    if f.bool("attention_bias", False) or f.bool("mlp_bias", False):
        raise BabyLlamaError(f"{source}: attention/MLP biases are not supported by the llama2.c format")
    # transformers 5 nests rope settings in rope_parameters; 4.x had rope_theta + rope_scaling at the top
    ropes = {key: f.sub(key) for key in ("rope_parameters", "rope_scaling") if f.has(key)}
    for rope in ropes.values():
        rope_type = rope.str("rope_type", None) or rope.str("type", "default")
        # linear scaling divides positions by its factor: by 1 it is plain RoPE (as the GGUF reader takes it)
        plain = rope_type == "default" or rope_type == "linear" and rope.float("factor", None) == 1.0
        if not plain:
            raise BabyLlamaError(f"{source}: rope scaling '{rope_type}' is not supported (only plain RoPE)")
    theta = _rope_theta(f, ropes)
    n_heads = f.int("num_attention_heads", hi=LIMITS["n_heads"])
    args = checked_args(
        source, dim=f.int("hidden_size", hi=LIMITS["dim"]), n_layers=f.int("num_hidden_layers", hi=LIMITS["n_layers"]),
        n_heads=n_heads, n_kv_heads=f.int("num_key_value_heads", n_heads, hi=LIMITS["n_kv_heads"]),
        hidden_dim=f.int("intermediate_size", hi=LIMITS["hidden_dim"]),
        vocab_size=f.int("vocab_size", hi=LIMITS["vocab_size"]),
        norm_eps=f.float("rms_norm_eps", HF_NORM_EPS), rope_theta=theta,
        max_seq_len=max_seq_len or f.int("max_position_embeddings", 2048, hi=LIMITS["max_seq_len"]),
        shared_classifier=f.bool("tie_word_embeddings", False),
    )
    head_dim = f.int("head_dim", None, hi=LIMITS["dim"])
    if head_dim is not None and head_dim != args.head_size:
        raise BabyLlamaError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads; "
                             "the llama2.c format cannot express it")
    return args


def _check_llama_architecture(f: Fields, source: str) -> None:
    """model_type 'llama', and no class but LlamaForCausalLM in `architectures` (where the config lists them);
    a refusal names the model type or class that is not Llama's."""
    model_type = f.str("model_type", None)
    if model_type is None:
        raise BabyLlamaError(f"{source}: field model_type is missing (a Llama config says 'llama'; only Llama "
                             "models can be converted)")
    other = next((str(a) for a in f.list("architectures", []) if a != "LlamaForCausalLM"), None)
    if model_type != "llama" or other is not None:
        raise BabyLlamaError(f"{source}: unsupported architecture '{other if model_type == 'llama' else model_type}' "
                             "(only Llama models, model_type 'llama' / LlamaForCausalLM, can be converted)")


def _rope_theta(f: Fields, ropes: dict[str, Fields]) -> float:
    """rope_parameters' theta, else rope_scaling's, else the top-level one: transformers 5 reads rope_parameters
    first, and rope_scaling as another name for it, so a config whose thetas disagree runs as transformers 5 runs
    it."""
    thetas = [ropes["rope_parameters"].float("rope_theta", None) if "rope_parameters" in ropes else None,
              ropes["rope_scaling"].float("rope_theta", None) if "rope_scaling" in ropes else None,
              f.float("rope_theta", None)]
    return next((t for t in thetas if t is not None), DEFAULT_ROPE_THETA)


def config_from_args(args: ModelArgs, dtype: str = "float32") -> dict:
    """The config.json of a LlamaForCausalLM with `args`' shape and weights of `dtype` (keys both transformers 4.x
    and 5 read)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_size,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": args.shared_classifier,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------- reading


def _resolve(paths: Sequence[str | os.PathLike]) -> tuple[Path, list[Path], list[Path]]:
    """(config.json, weight files, shard indexes) from a checkpoint directory or an explicit list of files."""
    given = [Path(p) for p in paths]
    for p in given:
        if not p.exists():
            raise safeio.not_found(p, "Hugging Face model")
    if len(given) == 1 and given[0].is_dir():
        folder = given[0]
        files = _folder_weights(folder)
        config = folder / "config.json"
    else:
        if len(given) > 1 and any(p.is_dir() for p in given):
            raise BabyLlamaError("--hf takes one model folder, or weight files (with config.json beside them), "
                                 "not several folders")
        config = next((p for p in given if p.name == "config.json"), given[0].parent / "config.json")
        files = [p for p in given if p.name != "config.json"]
        if not files:
            raise BabyLlamaError("--hf: give a model directory or its weight files")
    if not os.path.lexists(config):
        raise BabyLlamaError(f"{config}: missing (a Hugging Face model needs its config.json)")
    safeio.check_regular(config, "config.json")
    shards: list[Path] = []
    indexes = [f for f in files if f.name.endswith(".index.json")]
    for f in files:
        if f in indexes:
            shards.extend(_index_shards(f))
        else:
            shards.append(safeio.check_regular(f, "weight file"))
    return config, list(dict.fromkeys(shards)), indexes


# the checkpoint of a folder is the first of these it holds, whatever else is there: transformers' order (4.x and 5),
# so that a folder holding two (a stale index that save_pretrained left beside a model.safetensors) is one model
_HF_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# else, for weights named otherwise, every file of the first of these patterns that matches
_OTHER_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def _folder_weights(folder: Path) -> list[Path]:
    """The weight files (or the shard index) of a checkpoint folder."""
    for name in _HF_WEIGHT_NAMES:
        if os.path.lexists(folder / name):  # a link to nothing is named by the reader, not skipped
            return [folder / name]
    for pattern in _OTHER_WEIGHTS:
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise BabyLlamaError(f"{folder}: no model.safetensors or pytorch_model.bin (not a Hugging Face model?)")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a *.index.json names: each must lie in the index's folder (a name such as
    "../x.safetensors" or an absolute path is refused; the file itself may be a symlink, as in Hugging
    Face's cache, where snapshots/ links into blobs/)."""
    weight_map = Fields(safeio.read_json(index, "shard index"), str(index)).dict("weight_map")
    names = list(dict.fromkeys(weight_map.values()))
    if not names or not all(isinstance(n, str) for n in names):
        raise BabyLlamaError(f"{index}: weight_map must map tensor names to shard file names")
    folder = index.parent
    real_folder = folder.resolve()
    shards = []
    for name in names:
        rel = Path(name)
        if rel.is_absolute() or rel.anchor or ".." in rel.parts or not rel.parts or "\\" in name:
            raise BabyLlamaError(f"{index}: shard {name!r} is not a file inside the model folder")
        shard = folder / rel
        if not shard.parent.resolve().is_relative_to(real_folder):
            raise BabyLlamaError(f"{index}: shard {name!r} resolves outside the model folder")
        if not shard.is_file():
            raise BabyLlamaError(f"{shard}: missing (listed in {index.name})")
        shards.append(safeio.check_regular(shard, "weight file"))
    return shards


def _safetensors_header(path: Path) -> tuple[int, dict]:
    """(where the tensors' bytes start, the header: name -> dtype, shape, data_offsets) of a safetensors file
    that safetensors has already opened (and so checked)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


# the float types a weight may have, as the file stores them (bfloat16 as its bits: see _read_tensor)
_NUMPY_DTYPES: dict[str, np.dtype] = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
                                      "BF16": np.dtype("<u2")}
_FLOAT_DTYPES = tuple(_NUMPY_DTYPES)


def _read_tensor(path: Path, data_start: int, meta: dict) -> np.ndarray | BF16Tensor:
    """A safetensors tensor read from the file into memory of its own: float types as they are stored, a
    bfloat16 matrix as its bits (BF16Tensor: numpy has no bfloat16), other bfloat16 tensors as fp32. Not through
    safetensors' memory map, whose pages stay resident until the file is closed: a model read (and quantized) a
    tensor at a time would hold the whole file besides."""
    dtype = _NUMPY_DTYPES[meta["dtype"]]
    start, end = meta["data_offsets"]
    count = (end - start) // dtype.itemsize
    t = np.fromfile(path, dtype=dtype, count=count, offset=data_start + start)
    if t.size != count:  # safetensors checked the file's size when it opened it: it was cut short since
        raise BabyLlamaError(f"{path}: the file changed while it was read (a tensor ends past its end)")
    t = t.reshape(meta["shape"])
    if meta["dtype"] == "BF16":
        return BF16Tensor(t) if t.ndim == 2 else bf16_to_f32(t)
    return t


def _tensor_index(shards: list[Path]) -> dict[str, Callable[[], np.ndarray | BF16Tensor]]:
    """name -> loader for every tensor of every shard (safetensors' read from the file when asked for, torch
    files mmapped). Only floating-point tensors are weights: an integer tensor is refused, not converted."""
    index: dict[str, Callable[[], np.ndarray | BF16Tensor]] = {}
    held_by: dict[str, Path] = {}  # which shard holds each tensor: one held twice makes the model ambiguous
    for shard in shards:
        if shard.suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError:
                raise missing_extra("reading safetensors", "interop") from None
            safeio.open_regular(shard, "weight file").close()  # safetensors calls an unreadable file missing
            try:
                handle = safe_open(str(shard), framework="numpy")
                dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
            except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
                raise safeio.unreadable_safetensors(shard, e) from None
            _check_dtypes(shard, dtypes)
            data_start, header = _safetensors_header(shard)
            _held_once(shard, dtypes, held_by)
            index.update({name: (lambda s=shard, d=data_start, m=header[name]: _read_tensor(s, d, m))
                          for name in dtypes})
        else:
            state = check_torch_state(load_torch_weights(shard, "weight file"), shard)
            _check_dtypes(shard, {name: "F32" if t.is_floating_point() else str(t.dtype) for name, t in state.items()})
            _held_once(shard, state, held_by)
            index.update({name: (lambda t=t: torch_weight(t)) for name, t in state.items()})
    return index


def _held_once(shard: Path, names: Iterable[str], held_by: dict[str, Path]) -> None:
    """Record that `shard` holds `names`, refusing a tensor an earlier weight file holds too (the last one read
    silently replaced the first)."""
    for name in names:
        if name in held_by:
            raise BabyLlamaError(f"{shard}: tensor {name} is in {held_by[name]} too: which one is the model's? "
                                 "(name the weight files, or remove the extra one)")
        held_by[name] = shard


def _check_dtypes(shard: Path, dtypes: dict[str, str]) -> None:
    for name, dtype in dtypes.items():
        if dtype not in _FLOAT_DTYPES and not _IGNORED.fullmatch(name):
            raise BabyLlamaError(f"{shard}: tensor {name} holds {dtype} values, not floating-point weights")


def hf_args(paths: Sequence[str | os.PathLike], max_seq_len: int | None = None) -> ModelArgs:
    """The shape of the checkpoint at `paths` (load_hf's), from its config.json alone."""
    config_path = _resolve(paths)[0]
    return args_from_config(safeio.read_json(config_path, "config.json"), max_seq_len, str(config_path))


def load_hf(paths: str | os.PathLike | Sequence[str | os.PathLike], max_seq_len: int | None = None,
            quantize: str | None = None, read: list[Path] | None = None) -> Weights:
    """Read a Hugging Face Llama checkpoint (a directory, or its weight files with config.json beside them);
    `quantize`: each matrix quantized as it is read (from_state_dict). The files read (config.json, shard
    indexes, weight files, generation_config.json and tokenizer_config.json where there) are added to `read`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    config_path, shards, indexes = _resolve(paths)
    if read is not None:
        read += [config_path, *indexes, *shards]
    config = safeio.read_json(config_path, "config.json")
    args = args_from_config(config, max_seq_len, str(config_path))
    settings = _check_llama2c_specials(config, config_path)
    if read is not None:
        read += settings
    index = _tensor_index(shards)
    source = str(Path(paths[0]))

    known = {hf_name(k) for k in expected_shapes(args)} | {"lm_head.weight"}  # tied models may keep lm_head
    unexpected = [n for n in index if n not in known and not _IGNORED.fullmatch(n)]
    if unexpected:
        raise BabyLlamaError(f"{source}: unexpected tensor {unexpected[0]} (not a plain Llama model?)")

    def get(name: str) -> np.ndarray | BF16Tensor:
        key = hf_name(name)
        if key not in index:
            raise KeyError(name)
        t = index[key]()
        if name.endswith(("attention.wq.weight", "attention.wk.weight")) and len(t.shape) == 2:
            heads = args.n_heads if ".wq." in name else args.n_kv_heads
            if t.shape[0] % (2 * heads) == 0:  # a wrong shape is reported by from_state_dict
                if isinstance(t, BF16Tensor):
                    return BF16Tensor(halves_to_interleaved(t.bits, heads))
                t = halves_to_interleaved(t, heads)
        return t

    read_ahead = _classifier_read_ahead(args, index, get, config_path)
    # each tensor is fetched once: the ones read ahead are popped, and so dropped once used
    return from_state_dict(args, lambda n: read_ahead.pop(n) if n in read_ahead else get(n), source,
                           display=hf_name, quantize=quantize)


def _check_llama2c_specials(config: dict, config_path: Path) -> list[Path]:
    """The engine runs llama2.c's convention (interop/vocab.LLAMA2C_CONVENTION); transformers follows the folder's
    own BOS and EOS ids (config.json, generation_config.json: a list of EOS ids ends generation at any of them)
    and its tokenizer's add_bos_token / add_eos_token, so a folder that sets them otherwise would run differently
    here: refused, naming what differs (absent keys mean llama2.c's values). Returns the settings files read."""
    folder, read, differs = config_path.parent, [], []
    sources = [(config_path.name, config)]
    for name in ("generation_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            read.append(path)
            try:
                sources.append((name, safeio.read_json(path, name)))
            except BabyLlamaError:  # transformers' to check; the weights and their ids do not depend on it
                continue
    for name, settings in sources:
        if not isinstance(settings, dict):
            continue
        for key, want in (("bos_token_id", BOS), ("eos_token_id", EOS)):
            ids = settings.get(key)
            if ids is not None and (ids if isinstance(ids, list) else [ids]) != [want]:
                differs.append(f"{name} {key} {json.dumps(ids)}")
        for key, want in (("add_bos_token", True), ("add_eos_token", False)):
            value = settings.get(key)
            if value is not None and value != want:
                differs.append(f"{name} {key} {json.dumps(value)}")
    if differs:
        raise BabyLlamaError(f"{folder}: {', '.join(differs)}: {LLAMA2C_CONVENTION}")
    return read


def _classifier_read_ahead(args: ModelArgs, index: dict, get: Callable[[str], np.ndarray | BF16Tensor],
                           config_path: Path) -> dict[str, np.ndarray | BF16Tensor]:
    """A config that ties the classifier to the embedding over a checkpoint that keeps an lm_head.weight of other
    values runs untied, with that lm_head (as transformers 5 runs it, with a warning), said in one line; `args`
    is changed so. Returns the tensors this read (llama2.c names) for from_state_dict to take."""
    if not args.shared_classifier or "lm_head.weight" not in index:
        return {}
    emb, output = get("tok_embeddings.weight"), get("output.weight")
    if same_values(emb, output):
        return {"tok_embeddings.weight": emb}
    args.shared_classifier = False
    note(f"{config_path} says tie_word_embeddings, but the checkpoint's lm_head.weight differs from "
         "model.embed_tokens.weight: running it untied, with that lm_head.weight, as transformers does")
    return {"tok_embeddings.weight": emb, "output.weight": output}


# ----------------------------------------------------------------------------------------------- writing


# `export --to hf --dtype`: the tensors' type in model.safetensors, as config.json names it
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def save_hf(weights: Weights, outdir: str | os.PathLike, tokenizer_model: str | os.PathLike | bytes | None = None,
            dtype: str = "f32", chat_template: str | None = None) -> Path:
    """Write `outdir`/config.json + model.safetensors (every tensor in `dtype`: f32, or f16/bf16 rounded to
    nearest even, as Hugging Face checkpoints usually ship), and tokenizer.model + tokenizer_config.json when a
    sentencepiece model is given (its file, or its bytes: `Vocab.to_sentencepiece`), so that transformers'
    Auto* classes load the directory; tokenizer_config.json too beside a tokenizer.model kept from an earlier
    export. `chat_template`: the Jinja tokenizer_config.json carries (None: Llama 2's)."""
    if dtype not in HF_DTYPES:
        raise BabyLlamaError(f"a Hugging Face folder holds {', '.join(HF_DTYPES)} tensors, not {dtype}")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise BabyLlamaError(f"{outdir}: exists and is not a directory")
    stale = _other_checkpoint_files(outdir)
    if stale:
        raise BabyLlamaError(f"{outdir} already holds another checkpoint ({stale[0]}); choose an empty folder")
    args = weights.args
    check_writable(args, outdir)
    if tokenizer_model is not None and not isinstance(tokenizer_model, bytes):
        _check_sentencepiece(tokenizer_model, args.vocab_size)
    safeio.output_dir(outdir)

    held = {hf_name(name): m for name, m in held_tensors(weights).items()}
    shapes = {hf_name(name): shape for name, shape in expected_shapes(args).items()}

    def converted(name: str, m: Matrix) -> np.ndarray:
        t = dense(m)
        if name.endswith("self_attn.q_proj.weight"):
            t = interleaved_to_halves(t, args.n_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            t = interleaved_to_halves(t, args.n_kv_heads)
        if dtype == "f16":
            return to_f16(t)
        if dtype == "bf16":  # its bits (numpy has no bfloat16)
            return to_bf16(t.reshape(len(t), -1)).bits.reshape(t.shape)
        return t

    # every file renamed into place once all are written: a failure (a full disk) on the tokenizer must not leave
    # the new model beside an earlier export's config and tokenizer. config.json last: a new folder that a kill
    # interrupted among the renames has no config, so nothing loads it as a model
    with safeio.committed_together():
        # closing: a write that fails ends the tensors' progress bar before the error line, not at exit
        with safeio.pending(outdir / "model.safetensors") as tmp, \
                contextlib.closing(in_turn(dict(sorted(held.items())), outdir)) as tensors:
            write_safetensors(tmp, {name: (SAFETENSORS_DTYPES[dtype], shape) for name, shape in shapes.items()},
                              ((name, converted(name, m)) for name, m in tensors))
        if isinstance(tokenizer_model, bytes):
            safeio.write_bytes(outdir / SENTENCEPIECE_MODEL, tokenizer_model)
        elif tokenizer_model is not None:
            safeio.copy_file(tokenizer_model, outdir / SENTENCEPIECE_MODEL, "tokenizer")
        if tokenizer_model is not None or (outdir / SENTENCEPIECE_MODEL).is_file():  # written, or kept
            config = _tokenizer_config(args, chat_template)
            safeio.write_text(outdir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        safeio.write_text(outdir / "generation_config.json", json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
        safeio.write_text(outdir / "config.json", json.dumps(config_from_args(args, HF_DTYPES[dtype]), indent=2) + "\n")
    return outdir


# another checkpoint's files, which some reader would take instead of the export's or together with them:
# transformers loads a tokenizer.json before our tokenizer.model, and pytorch_model*.bin in place of our
# model.safetensors when told not to read safetensors (use_safetensors=False); tools that take every
# model*.safetensors of a folder as the parts of one model (llama.cpp's convert_hf_to_gguf.py, which also checks
# the parts against model.safetensors.index.json) would mix other shards with ours, or find that the index
# names tensors ours lacks. Anything else stays: training_args.bin, a tokenizer.bin, a README are not weights.
_OTHER_CHECKPOINT = ("tokenizer.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                     "pytorch_model*.bin.index.json",
                     # transformers 5 reads a chat template there before tokenizer_config.json's (ours)
                     CHAT_TEMPLATE_FILE, "chat_templates")


def _other_checkpoint_files(outdir: Path) -> list[str]:
    """The names of the files in `outdir` that belong to another checkpoint (_OTHER_CHECKPOINT)."""
    if not outdir.is_dir():
        return []
    return sorted(p.name for p in outdir.iterdir() if p.name != "model.safetensors"
                  and any(fnmatch.fnmatchcase(p.name, pattern) for pattern in _OTHER_CHECKPOINT))


# safetensors' names of the types `export --to hf --dtype` writes, and their sizes
SAFETENSORS_DTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: Path, specs: dict[str, tuple[str, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """A safetensors file of the tensors `specs` describes (name -> safetensors dtype, shape), whose (name,
    array) pairs `tensors` yields in the order of the names, written one at a time: the package's own writers take every
    tensor at once, i.e. a second copy of the whole model in memory. The same bytes as its save_file (tested):
    8 bytes of header length, the header as compact JSON padded with spaces to a multiple of 8, then the
    tensors back to back, ordered by name (its order among tensors of one type). Bfloat16 goes as its bits."""
    names = sorted(specs)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    end = 0
    for name in names:
        kind, shape = specs[name]
        start, end = end, end + math.prod(shape) * _ITEM_BYTES[kind]
        header[name] = {"dtype": kind, "shape": list(shape), "data_offsets": [start, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for expected, (name, t) in zip(names, tensors, strict=True):
            kind, shape = specs[name]
            if name != expected or t.shape != tuple(shape) or t.itemsize != _ITEM_BYTES[kind]:
                raise ValueError(f"{name} {t.dtype} {t.shape} given where the header has {expected} {kind} {shape}")
            f.write(np.ascontiguousarray(t).data)


def _tokenizer_config(args: ModelArgs, chat_template: str | None = None) -> dict:
    from ..chat_template import get_template

    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "legacy": True,  # sentencepiece's own behaviour, which babyllama's tokenizer reproduces
        "model_max_length": args.max_seq_len,
        # apply_chat_template then gives the ids `chat` and the server feed the model
        "chat_template": chat_template or get_template().jinja,
    }


def _check_sentencepiece(path: str | os.PathLike, vocab_size: int) -> None:
    """A Hugging Face directory carries a sentencepiece model: its .model file here (a tokenizer.bin goes in
    as `load_vocab(path).to_sentencepiece()`'s bytes)."""
    path = Path(path)
    if not path.is_file():
        raise BabyLlamaError(f"tokenizer {path}: no such file")
    if path.suffix != ".model":
        raise BabyLlamaError(f"tokenizer {path}: Hugging Face output needs the sentencepiece .model file, "
                             "not a tokenizer.bin")
    from .vocab import load_vocab

    n = len(load_vocab(path).tokens)
    if n != vocab_size:
        raise vocab_mismatch(f"tokenizer {path}", n, vocab_size)
