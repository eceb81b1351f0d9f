"""`Weights` ⇄ a flat dict of fp32 tensors under llama2.c's names (the names of Meta's checkpoints and of
llama2.c's model.py), the hub that every converter maps its own names onto:

    tok_embeddings.weight            (vocab, dim)
    layers.N.attention_norm.weight   (dim,)        layers.N.ffn_norm.weight      (dim,)
    layers.N.attention.wq.weight     (dim, dim)    layers.N.attention.wk.weight  (kv_dim, dim)
    layers.N.attention.wv.weight     (kv_dim, dim) layers.N.attention.wo.weight  (dim, dim)
    layers.N.feed_forward.w1.weight  (hidden, dim) layers.N.feed_forward.w2.weight (dim, hidden)
    layers.N.feed_forward.w3.weight  (hidden, dim)
    norm.weight                      (dim,)        output.weight                 (vocab, dim), absent when tied

Matrices are in nn.Linear layout (out_features, in_features) and q/k rows in Meta's interleaved-pair
rotary order, exactly as `Weights` holds them.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from .. import memory, safeio
from ..config import ModelArgs
from ..errors import BabyLlamaError, first_line, missing_extra
from ..formats import (
    LAYER_MATRICES,
    BF16Tensor,
    Matrix,
    QTensor,
    Weights,
    all_finite,
    check_quantize_kind,
    checked_floats,
    chosen_group_size,
    default_group_size,
    dense,
    held_tensors,
    is_fp32,
    is_quantized,
    layer_key,
    matrix_arrays,
    quant_kind,
    quantize_matrix,
)
from ..progress import progress_bar
from ..quant import BLOCK, BlockTensor


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a model of `args`' shape, in file order, with its shape."""
    d, V, m = args.dim, args.vocab_size, args.matrix_shapes()
    per_layer: dict[str, tuple[int, ...]] = {"rms_att": (d,), **{k: m[k] for k in ("wq", "wk", "wv", "wo")},
                                             "rms_ffn": (d,), **{k: m[k] for k in ("w1", "w2", "w3")}}
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, d)}
    for layer in range(args.n_layers):
        shapes.update({layer_key(layer, f): s for f, s in per_layer.items()})
    shapes["norm.weight"] = (d,)
    if not args.shared_classifier:
        shapes["output.weight"] = (V, d)
    return shapes


def same_values(a: Matrix, b: Matrix) -> bool:
    """Whether two matrices hold the same values: compared as stored where both are of one kind, else as fp32 (an
    embedding that a checkpoint also keeps, as its own type, for a tied classifier)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if type(a) is type(b):
        return all(map(np.array_equal, matrix_arrays(a), matrix_arrays(b)))
    return bool(np.array_equal(dense(a), dense(b)))


def to_state_dict(weights: Weights) -> dict[str, np.ndarray]:
    """The model's tensors under llama2.c names, fp32 (quantized and 16-bit matrices converted), all at once."""
    return {name: dense(m) for name, m in held_tensors(weights).items()}


def load_torch_weights(path: str | os.PathLike, what: str) -> Any:
    """What torch.load reads from the PyTorch file `path`, tensors and plain values only (weights_only: no pickled
    code runs), or one line. torch.save's zip (PyTorch 1.6 on) is memory-mapped; an older file, one pickle, cannot
    be, and is read into memory (transformers reads both)."""
    try:
        import torch
    except ImportError:
        raise missing_extra(f"reading {os.path.basename(path)} (a PyTorch file)", "interop") from None
    path = safeio.check_regular(path, what)
    try:
        return torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=True)
    except Exception as e:  # torch raises many types for a bad file (pickle, zip, runtime)
        raise BabyLlamaError(f"{path}: not a readable PyTorch checkpoint ({torch_load_failure(path, e)})") from None


def torch_load_failure(path: str | os.PathLike, e: Exception) -> str:
    """Why torch.load could not read `path`, on one line. torch.save writes a zip whose directory is its last
    bytes: a zip without one was cut short (an interrupted copy or download), which torch reports as "[Errno 22]
    Invalid argument" or miniz's "failed finding central directory"."""
    try:
        with safeio.open_regular(path, "PyTorch file") as f:
            start = f.read(4)
    except (BabyLlamaError, OSError):  # gone or replaced since torch tried it: torch's words stand
        return first_line(e)
    zip_start = start == b"PK\x03\x04"
    if zip_start and not zipfile.is_zipfile(path):
        return "not a whole PyTorch file: no zip directory at its end (cut short?)"
    if not zip_start and not start.startswith(b"\x80"):  # torch.save's zip, or an older one's pickle
        return "not a PyTorch file (neither torch.save's zip nor a pickle)"
    if "Weights only load failed" in str(e):  # torch's words advise unpickling anything, which can run code
        return ("it holds Python objects besides tensors and plain values, which are not unpickled (that could "
                "run any code)")
    return first_line(e)


def check_torch_state(state: Any, source: str | os.PathLike) -> dict:
    """`state` (what torch.load read from `source`) as a state dict: names to dense tensors, else one line. It
    refuses a key that is not a string, and a sparse or meta tensor, here, as the code that reads the tensors
    takes names and dense data only."""
    import torch

    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise BabyLlamaError(f"{source}: not a state dict of tensors")
    for name, t in state.items():
        if not isinstance(name, str):
            raise BabyLlamaError(f"{source}: a tensor is named {name!r}, not by a string: not a state dict")
        if t.layout != torch.strided:
            raise BabyLlamaError(f"{source}: tensor {name} is stored as {t.layout}, not as dense weights")
        if t.is_meta:  # a shape without values (what a model built on the meta device saves)
            raise BabyLlamaError(f"{source}: tensor {name} has no data (a tensor on PyTorch's meta device)")
    return state


def torch_weight(t: Any) -> np.ndarray | BF16Tensor:
    """A PyTorch tensor as from_state_dict takes it: a bfloat16 matrix as its bits (BF16Tensor) and an fp16 one
    as fp16, both sharing the tensor's memory (kept as they are: the kernels read them as fp32); anything else
    as fp32. Each in C order: a tensor saved as a strided view (a transposed or sliced one) is copied into it,
    as the kernels take only that. Tensors saved with requires_grad (llama2.c's export.py --version -1 clones
    its parameters so) are detached first: NumPy cannot take them otherwise."""
    import torch

    t = t.detach()
    if t.dim() == 2 and t.dtype == torch.bfloat16:
        return BF16Tensor(t.contiguous().view(torch.int16).numpy().view(np.uint16))
    if t.dim() == 2 and t.dtype == torch.float16:
        return t.contiguous().numpy()
    return t.float().contiguous().numpy()


# export's kinds for a GGUF file: llama.cpp's block types (from_state_dict)
GGUF_BLOCKS = {"gguf q4_0": "q4_0", "gguf q8_0": "q8_0"}


def from_state_dict(args: ModelArgs,
                    get: Mapping[str, Matrix] | Callable[[str], Matrix],
                    source: str = "model", display: Callable[[str], str] = str,
                    quantize: str | None = None) -> Weights:
    """Assemble `Weights` of `args`' shape from tensors under llama2.c names. `get` is a mapping or a
    function name -> array (so converters can load lazily, one tensor at a time); every tensor is checked
    against the shape `args` implies, so a wrong config or a truncated file is one clear error, naming
    the tensor as the source file does (`display` maps llama2.c names to the file's). `quantize` ("q8_0",
    "q4_0", "f16" or "bf16", `--quantize`): each dense matrix is quantized (rounded) as soon as it is read and
    checked (what Weights.quantize_as would make of it) and its pages handed back where they are a mapped
    file's, so that memory never holds the model in fp32; quantized matrices (and 16-bit ones of the type asked
    for) are kept as they are. A kind of GGUF_BLOCKS (export's, for a GGUF file): llama.cpp's blocks for matrices
    whose rows are whole blocks, the others as they are read (the GGUF writer keeps those in F16)."""
    lookup = get.__getitem__ if isinstance(get, Mapping) else get
    try:
        args.validate()
    except ValueError as e:
        raise BabyLlamaError(f"{source}: invalid model shape: {e}") from None
    if quantize is not None and quantize not in GGUF_BLOCKS:
        check_quantize_kind(quantize)
    group_size = chosen_group_size(args, quantize) if quantize is not None else default_group_size(args)
    maps = memory.read_only_file_maps() if quantize is not None else []

    def fetch(name: str, shape: tuple[int, ...]) -> Any:  # an fp32, fp16 or bf16 matrix, or a quantized one
        t: Any
        try:
            t = lookup(name)
        except KeyError:
            raise BabyLlamaError(f"{source}: tensor {display(name)} is missing") from None
        kept = isinstance(t, (BlockTensor, QTensor, BF16Tensor))  # kept as it is (GGUF's Q8_0/Q4_0 blocks, bf16
        t = t if kept else np.asarray(t)                           # matrices, or matrices quantized on load)
        if not kept and t.dtype.kind != "f":
            raise BabyLlamaError(f"{source}: tensor {display(name)} holds {t.dtype} values, not floating-point weights")
        if tuple(t.shape) != shape:
            raise BabyLlamaError(
                f"{source}: tensor {display(name)} has shape {tuple(t.shape)}, the config implies {shape}")
        if not (kept or t.dtype == np.float16 and len(shape) == 2):  # fp16 matrices are kept: the kernels
            t = t.astype(np.float32, copy=False)                      # read them as fp32 (W_F16)
        if not all_finite(checked_floats(t)):
            raise BabyLlamaError(f"{source}: tensor {display(name)} holds NaN or infinite values; the file is corrupt")
        if quantize is not None and not is_quantized(t) and len(shape) == 2 and quant_kind(t) != quantize \
                and not (quantize in GGUF_BLOCKS and shape[1] % BLOCK):
            t = quantized_on_read(t)
        bar.update()
        return t

    def quantized_on_read(t: np.ndarray | BF16Tensor) -> Matrix:
        from .. import kernels

        assert quantize is not None
        # a mapped file's pages (a GGUF's) are read once: handed back after quantizing, or, for fp16 and bf16,
        # as soon as their fp32 copy is made
        values = dense(t)
        if values is not t:
            memory.release_mapped(*matrix_arrays(t), maps=maps)
        m = (kernels.quantize_blocks(values, GGUF_BLOCKS[quantize]) if quantize in GGUF_BLOCKS
             else quantize_matrix(values, quantize, group_size, kernels.q4_0_blocks))
        if values is t:
            memory.release_mapped(t, maps=maps)
        return m

    shapes = expected_shapes(args)
    L = args.n_layers
    # a large checkpoint takes a while to read (and quantize): a bar on a terminal, once it has taken a second
    bar = progress_bar(total=len(shapes), desc=f"reading {os.path.basename(source)}", unit="tensor", delay=1.0)

    def stack(field: str) -> Any:  # an (L, ...) fp32 array, or the layers' matrices as they are (a list)
        rows = [fetch(layer_key(i, field), shapes[layer_key(i, field)]) for i in range(L)]
        if not all(is_fp32(r) for r in rows):  # quantized, fp16 or bf16: kept where they are (a mapped file's
            return rows                         # pages, or the tensor read), not copied into a stack
        stacked = np.stack(rows)
        memory.release_mapped(*rows)  # views of a mapped file (GGUF's F32): the copy alone stays resident
        return stacked

    with bar:
        emb = fetch("tok_embeddings.weight", shapes["tok_embeddings.weight"])
        mats: dict[str, Any] = {name: stack(name) for name in LAYER_MATRICES}
        wcls = emb if args.shared_classifier else fetch("output.weight", shapes["output.weight"])
        weights = Weights(args, emb, rms_att=stack("rms_att"), rms_ffn=stack("rms_ffn"),
                          rms_final=fetch("norm.weight", shapes["norm.weight"]), wcls=wcls, **mats)
    if quantize == "q8_0":  # runq.c's groups, labelled as Weights.quantize labels them (which then keeps them)
        return replace(weights, version=2, group_size=group_size)
    return weights
