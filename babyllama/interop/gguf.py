"""llama.cpp's GGUF ⇄ `Weights` (+ vocabulary), through the `gguf` package's writer and reader.

What goes in a file llama.cpp loads as architecture "llama":
  - metadata `llama.*`: context_length, embedding_length, block_count, feed_forward_length,
    attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base,
    rope.dimension_count (= head size), vocab_size; general.file_type for the tensor type;
  - the vocabulary as `tokenizer.ggml.*`: model "llama" (sentencepiece), tokens, scores, token_type,
    bos/eos/unk ids, add_bos_token;
  - tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), `output`
    omitted when the classifier is tied to the embedding (llama.cpp then reuses token_embd).

Rotary order: llama.cpp runs LLM_ARCH_LLAMA with its "normal" RoPE, which rotates interleaved pairs
(x[2i], x[2i+1]) exactly as Meta, llama2.c and babyllama's engine do; that is why llama.cpp's
convert_hf_to_gguf.py un-permutes Hugging Face's q/k back to Meta's row order. `Weights` already holds
that order, so q/k are written unchanged (the Hugging Face permutation lives only in hf.py).

Tensor types: "f32", "f16", "q8_0" or "q4_0" for the matrices (llama.cpp's block types: blocks of 32 with an
fp16 scale; babyllama's own Q8_0 .bin groups differ, so matrices are re-quantized from fp32, while Q4_0
matrices of a version-3 model are written as they are). Norm vectors stay
f32, as llama.cpp requires; a matrix whose rows do not split into 32-blocks falls back to f16, as
llama.cpp's converter does.

Reading quantized files (`load_gguf(..., keep_quantized=True)`, what running a GGUF model uses): Q8_0 and
Q4_0 tensors are the block layout babyllama's kernels run (quant.BlockTensor), so they stay views of the
memory-mapped file; every other llama.cpp type that the gguf package can dequantize (Q4_1, Q5_0, Q5_1,
Q2_K-Q6_K, the IQ types, ...) is converted on load to the nearest of the two by bits per weight (under 6.5:
Q4_0, else Q8_0; so Q6_K becomes Q8_0 and the rest Q4_0), a few rows at a time, never to fp32; the conversion's
error is reported (`ConversionNote`). F32/F16/BF16 tensors become fp32 arrays.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, ModelArgs
from ..errors import BabyLlamaError
from ..formats import Weights
from ..quant import BLOCK, BLOCK_BYTES, KINDS, QUANTIZERS, BlockTensor
from .state_dict import LAYER_NAMES, from_state_dict, layer_key, to_state_dict
from .vocab import Vocab

DTYPES = ("f32", "f16", "q8_0", "q4_0")
ARCH = "llama"
# llama2.c per-layer name fragment -> llama.cpp's (blk.N.<name>.weight)
_BLOCK = {
    LAYER_NAMES["rms_att"]: "attn_norm", LAYER_NAMES["wq"]: "attn_q", LAYER_NAMES["wk"]: "attn_k",
    LAYER_NAMES["wv"]: "attn_v", LAYER_NAMES["wo"]: "attn_output", LAYER_NAMES["rms_ffn"]: "ffn_norm",
    LAYER_NAMES["w1"]: "ffn_gate", LAYER_NAMES["w2"]: "ffn_down", LAYER_NAMES["w3"]: "ffn_up",
}
_TOP = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise BabyLlamaError("GGUF files need the gguf package: pip install 'babyllama[interop]'") from None
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a llama2.c tensor name."""
    if name in _TOP:
        return _TOP[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_BLOCK[rest.removesuffix('.weight')]}.weight"


def add_llama_metadata(w, args: ModelArgs) -> None:
    """The `llama.*` hyperparameters llama.cpp reads, on a gguf.GGUFWriter."""
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_size)
    w.add_vocab_size(args.vocab_size)


def save_gguf(weights: Weights, path: str | os.PathLike, vocab: Vocab, dtype: str = "f32",
              name: str | None = None) -> Path:
    """Write `weights` and `vocab` as a GGUF file llama.cpp runs; matrices in `dtype` (f32, f16, q8_0, q4_0)."""
    gguf = _gguf()
    if dtype not in DTYPES:
        raise BabyLlamaError(f"unknown GGUF dtype '{dtype}' (choose {', '.join(DTYPES)})")
    args = weights.args
    if len(vocab.tokens) != args.vocab_size:
        raise BabyLlamaError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is "
                             f"{args.vocab_size}")
    path = Path(path)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[dtype]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]

    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    w.add_name(name or path.stem)
    w.add_file_type(file_type)
    add_llama_metadata(w, args)

    w.add_tokenizer_model("llama")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    kept = _block_tensors(weights, dtype)
    for key, t in to_state_dict(weights).items():
        if key in kept:  # already in the file's type: its bytes as they are
            w.add_tensor(gguf_name(key), np.ascontiguousarray(kept[key].data), raw_dtype=qtype)
        elif t.ndim == 1 or dtype == "f32":
            w.add_tensor(gguf_name(key), t)
        elif dtype == "f16" or t.shape[1] % BLOCK:
            w.add_tensor(gguf_name(key), t.astype(np.float16))
        else:
            w.add_tensor(gguf_name(key), QUANTIZERS[dtype](t).data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def _block_tensors(weights: Weights, kind: str) -> dict[str, BlockTensor]:
    """The model's matrices that are already `kind` blocks, under llama2.c names."""
    found = {"tok_embeddings.weight": weights.tok_embeddings, "output.weight": weights.wcls}
    for name, stack in weights.layer_matrices().items():
        found.update({layer_key(i, name): m for i, m in enumerate(stack)})
    return {k: m for k, m in found.items() if isinstance(m, BlockTensor) and m.kind == kind}


# ----------------------------------------------------------------------------------------------- reading


@dataclass
class ConversionNote:
    """What converting one llama.cpp type into one of babyllama's cost: the error it added, as the RMS of
    (converted - the file's dequantized weights) over the RMS of those weights, across `tensors` tensors."""

    source: str
    target: str
    tensors: int = 0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    @property
    def relative_rms_error(self) -> float:
        return (self.err_sq / self.ref_sq) ** 0.5 if self.ref_sq else 0.0

    def __str__(self) -> str:
        return (f"{self.tensors} {self.source} tensors converted to {self.target}: RMS error "
                f"{100 * self.relative_rms_error:.2f}% of the weights' RMS (on top of {self.source}'s own)")


def nearest_kind(qtype) -> str:
    """babyllama's block type nearest in bits per weight to a llama.cpp type (Q4_0 4.5, Q8_0 8.5)."""
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return "q8_0" if 8 * size / block >= 6.5 else "q4_0"


# rows dequantized at a time when converting: bounds the fp32 scratch (and the gguf package's temporaries, a
# few times that) to ~4 MB
_CONVERT_ELEMENTS = 1 << 20


def _convert(data: np.ndarray, qtype, cols: int, note: ConversionNote) -> BlockTensor:
    """A tensor of another llama.cpp type (rows of `cols` weights) as `note.target` blocks, a few rows at a time."""
    gguf = _gguf()
    rows = data.shape[0]
    out = np.empty((rows, cols // BLOCK * BLOCK_BYTES[note.target]), dtype=np.uint8)
    step = max(1, _CONVERT_ELEMENTS // cols)
    for r in range(0, rows, step):
        ref = np.asarray(gguf.quants.dequantize(data[r:r + step], qtype), dtype=np.float32).reshape(-1, cols)
        q = QUANTIZERS[note.target](ref)
        out[r:r + step] = q.data
        note.err_sq += float(np.square(q.dequantize() - ref, dtype=np.float64).sum())
        note.ref_sq += float(np.square(ref, dtype=np.float64).sum())
    note.tensors += 1
    return BlockTensor(note.target, out, cols)


def load_gguf(path: str | os.PathLike, max_seq_len: int | None = None, keep_quantized: bool = False,
              notes: list[ConversionNote] | None = None) -> tuple[Weights, Vocab | None]:
    """Read a llama-architecture GGUF file into `Weights` and its vocabulary (None when the file has none).
    By default every tensor is dequantized to fp32 (f32, f16, bf16 and the quantized types the gguf package
    reads). `keep_quantized`: Q8_0/Q4_0 tensors stay memory-mapped blocks, other quantized types are converted
    to the nearest of them (see the module's docstring), with one ConversionNote per converted type appended
    to `notes`."""
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise BabyLlamaError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise BabyLlamaError(f"{path}: not a readable GGUF file ({e})") from None
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise BabyLlamaError(f"{path}: unsupported architecture '{arch}' (only 'llama' GGUF files)")
    tensors = {t.name: t for t in reader.tensors}

    converted: dict[str, ConversionNote] = {}
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)

    def get(name: str) -> np.ndarray | BlockTensor:
        key = gguf_name(name)
        if key not in tensors:
            raise KeyError(name)
        t = tensors[key]
        kind = t.tensor_type.name.lower()
        if not keep_quantized or t.tensor_type in float_types or len(t.shape) != 2:
            return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        cols = int(t.shape[0])  # GGUF lists dimensions innermost first
        if kind in KINDS:
            return BlockTensor(kind, t.data, cols)
        note = converted.setdefault(kind, ConversionNote(t.tensor_type.name, nearest_kind(t.tensor_type)))
        return _convert(t.data, t.tensor_type, cols, note)

    def field(key: str, default=None):
        value = meta.get(f"{ARCH}.{key}", default)
        if value is None:
            raise BabyLlamaError(f"{path}: metadata {ARCH}.{key} is missing")
        return value

    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise BabyLlamaError(f"{path}: tensor token_embd.weight is missing")
    n_heads = int(field("attention.head_count"))
    args = ModelArgs(
        dim=int(field("embedding_length")), n_layers=int(field("block_count")), n_heads=n_heads,
        n_kv_heads=int(field("attention.head_count_kv", n_heads)), hidden_dim=int(field("feed_forward_length")),
        vocab_size=int(emb.shape[1]),  # GGUF lists dimensions innermost first: (dim, vocab)
        norm_eps=_shortest(field("attention.layer_norm_rms_epsilon", DEFAULT_NORM_EPS)),
        rope_theta=_shortest(field("rope.freq_base", DEFAULT_ROPE_THETA)),
        max_seq_len=int(max_seq_len or field("context_length")),
        shared_classifier="output.weight" not in tensors,
    )
    rope_dims = int(field("rope.dimension_count", args.head_size))
    if rope_dims != args.head_size:
        raise BabyLlamaError(f"{path}: partial rotary embedding ({rope_dims} of {args.head_size}) is not supported")
    weights = from_state_dict(args, get, str(path), display=gguf_name)
    if notes is not None:
        notes.extend(converted.values())

    vocab = None
    if "tokenizer.ggml.tokens" in meta:
        if meta.get("tokenizer.ggml.model") != "llama":
            raise BabyLlamaError(f"{path}: tokenizer '{meta.get('tokenizer.ggml.model')}' is not sentencepiece")
        tokens = list(meta["tokenizer.ggml.tokens"])
        vocab = Vocab(tokens, [float(s) for s in meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))],
                      [int(t) for t in meta.get("tokenizer.ggml.token_type", [1] * len(tokens))],
                      unk_id=int(meta.get("tokenizer.ggml.unknown_token_id", 0)),
                      bos_id=int(meta.get("tokenizer.ggml.bos_token_id", 1)),
                      eos_id=int(meta.get("tokenizer.ggml.eos_token_id", 2)))
    return weights, vocab


def _shortest(value: float) -> float:
    """GGUF stores eps and theta as float32: read 1e-6 back as 1e-6, not 9.99999997e-07."""
    return float(str(np.float32(value)))
