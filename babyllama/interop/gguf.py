"""llama.cpp's GGUF ⇄ `Weights` (+ vocabulary). Written with the `gguf` package's writer; read by `read_gguf`,
which checks every count, length, type and offset of the file before trusting it (the package's reader loops
or raises assorted errors on corrupt files). F32, F16, BF16, Q8_0 and Q4_0 tensors are read without the package (its
import alone takes ~60 ms of a run's start), and so are Q4_1, Q5_0, Q5_1 and Q2_K-Q6_K where the native kernels
convert them (kernels.c's convert_ggml_rows); other types are dequantized with its `quants`.

What goes in a file llama.cpp loads as architecture "llama":
  - metadata `llama.*`: context_length, embedding_length, block_count, feed_forward_length,
    attention.head_count, attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base,
    rope.dimension_count (= head size), vocab_size; general.file_type for the tensor type;
  - the vocabulary as `tokenizer.ggml.*`: model "llama" (sentencepiece), tokens, scores, token_type,
    bos/eos/unk ids, add_bos_token; `tokenizer.chat_template`: the Vocab's (an export writes the template its
    model takes, Llama 2's unless its card or `--chat-template` names another), in Jinja as chat_template.py has it;
  - tensors under llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output), `output`
    omitted when the classifier is tied to the embedding (llama.cpp then reuses token_embd).

Reading refuses what llama.cpp would run differently from the engine: rope scaling (a scaling factor, an
attention factor, rope_freqs factors other than ones), partial rotary embeddings, and special tokens other than
llama2.c's (BOS 1 prepended to every prompt, EOS 2, <unk> 0, a space before the text; no end-of-turn token).

Rotary order: llama.cpp runs LLM_ARCH_LLAMA with its "normal" RoPE, which rotates interleaved pairs
(x[2i], x[2i+1]) exactly as Meta, llama2.c and babyllama's engine do; that is why llama.cpp's
convert_hf_to_gguf.py un-permutes Hugging Face's q/k back to Meta's row order. `Weights` already holds
that order, so q/k are written unchanged (the Hugging Face permutation lives only in hf.py).

Tensor types: "f32", "f16", "bf16", "q8_0" or "q4_0" for the matrices (llama.cpp's block types: blocks of 32 with an
fp16 scale; babyllama's own Q8_0 .bin groups differ, so matrices are re-quantized from fp32, while Q4_0
matrices of a version-3 model are written as they are). Norm vectors stay
f32, as llama.cpp requires; a matrix whose rows do not split into 32-blocks falls back to f16, as
llama.cpp's converter does.

Reading quantized files (`load_gguf(..., keep_quantized=True)`, what running a GGUF model uses): Q8_0 and
Q4_0 tensors are the block layout babyllama's kernels run (quant.BlockTensor), so they stay views of the
memory-mapped file; every other llama.cpp type that the gguf package can dequantize (Q4_1, Q5_0, Q5_1,
Q2_K-Q6_K, the IQ types, ...) is converted on load to the nearest of the two by bits per weight (under 6.5:
Q4_0, else Q8_0; so Q6_K becomes Q8_0 and the rest Q4_0), a few rows at a time, never to fp32: by the native
kernels where they convert the type, else by the package's dequantizer and quant.py's quantizer (the same
blocks); the conversion's error is reported (`ConversionNote`). The conversion serves the native kernels alone:
for the PyTorch engine and export, which compute in fp32 anyway, those types are dequantized to fp32, the file's
own weights (`convert_other_types=False`). F16 matrices stay fp16 (the native kernels'
W_F16 reads them as the fp32 values they stand for), BF16 ones as their bits (formats.BF16Tensor, read by W_BF16);
other F32/F16/BF16 tensors become fp32 arrays.
"""

from __future__ import annotations

import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import memory, safeio
from ..chat_template import foreign_template_note
from ..config import DEFAULT_NORM_EPS, DEFAULT_ROPE_THETA, LIMITS, ModelArgs, checked_args
from ..errors import BabyLlamaError, missing_extra, note
from ..fields import Fields, is_int
from ..formats import (
    LAYER_NAMES,
    BF16Tensor,
    Matrix,
    Weights,
    bf16_to_f32,
    check_writable,
    dense,
    held_tensors,
    in_turn,
    matrix_arrays,
    to_bf16,
    to_f16,
)
from ..quant import BLOCK, BLOCK_BYTES, KINDS, QUANTIZERS, BlockTensor, quantize_q4_0_searched
from ..threads import worker_count
from ..tokenizer import BOS, BYTE, EOS, NORMAL, UNK, vocab_mismatch
from .state_dict import expected_shapes, from_state_dict
from .vocab import LLAMA2C_CONVENTION, Vocab

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
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
        raise missing_extra("reading and writing GGUF files", "interop") from None
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
    """Write `weights` and `vocab` as a GGUF file llama.cpp runs; matrices in `dtype` (f32, f16, bf16, q8_0, q4_0;
    bf16 rounded by formats.to_bf16, as `--quantize bf16` rounds)."""
    from ..chat_template import get_template

    gguf = _gguf()
    if dtype not in DTYPES:
        raise BabyLlamaError(f"unknown GGUF dtype '{dtype}' (choose {', '.join(DTYPES)})")
    args = weights.args
    if len(vocab.tokens) != args.vocab_size:
        raise vocab_mismatch("the tokenizer", len(vocab.tokens), args.vocab_size)
    path = Path(path)
    qtypes = {kind: gguf.GGMLQuantizationType[kind.upper()] for kind in DTYPES}
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]

    check_writable(args, path)
    held = held_tensors(weights)
    shapes = expected_shapes(args)
    kinds = {key: _written_kind(m, shapes[key], dtype) for key, m in held.items()}
    fell_back = sorted({shapes[key][1] for key, kind in kinds.items() if len(shapes[key]) == 2 and kind != dtype})
    if fell_back:
        matrices = [kind for key, kind in kinds.items() if len(shapes[key]) == 2]
        note(f"{matrices.count('f16')} of {len(matrices)} matrices written as f16: their rows (of "
             f"{', '.join(map(str, fell_back))}) do not split into {dtype}'s blocks of {BLOCK}")
        if dtype not in matrices:  # none is in dtype: the file is f16 (llama.cpp reads the type from here)
            file_type = gguf.LlamaFileType.MOSTLY_F16
    with safeio.pending(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        # GGUF strings are UTF-8: a file name's bytes that are not (a Latin-1 name) become U+FFFD
        w.add_name(name or os.fsencode(path.stem).decode("utf-8", "replace"))
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
        # without one llama.cpp's chat falls back to ChatML, a layout these models never saw
        w.add_chat_template(vocab.chat_template or get_template().jinja)

        # the tensors' descriptions first, then each tensor converted and written in turn: one at a time in memory
        for key, kind in kinds.items():
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtypes[kind]]
            w.add_tensor_info(gguf_name(key), shapes[key], np.dtype(np.float32),
                              math.prod(shapes[key]) // block_size * type_size, raw_dtype=qtypes[kind])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for key, m in in_turn(held, path):
            w.write_tensor_data(_written_data(m, kinds[key], gguf_name(key), dtype))
        w.close()
    return path


def _f16(t: np.ndarray, name: str, dtype: str) -> np.ndarray:
    """`t` rounded to fp16 (for `dtype` f16, or its fallback), refused in one line naming the tensor where a
    weight would become infinite."""
    try:
        return to_f16(t)
    except BabyLlamaError as e:
        why = "" if dtype == "f16" else f" (its rows of {t.shape[1]} do not split into {dtype} blocks: written as f16)"
        raise BabyLlamaError(f"tensor {name}{why}: {e}") from None


def _written_kind(m: Matrix, shape: tuple[int, ...], dtype: str) -> str:
    """The type a tensor is written in for `export --dtype dtype`: norm vectors f32 (llama.cpp requires it), a
    matrix already in that block type as it is, and one whose rows do not split into blocks of 32 f16 (as
    llama.cpp's converter does)."""
    if len(shape) == 1:
        return "f32"
    if isinstance(m, BlockTensor) and m.kind == dtype or dtype in ("f32", "f16", "bf16"):
        return dtype
    return "f16" if shape[1] % BLOCK else dtype


def _written_data(m: Matrix, kind: str, name: str, dtype: str) -> np.ndarray:
    """m's bytes in the file's `kind` (see _written_kind)."""
    from .. import kernels

    if isinstance(m, BlockTensor) and m.kind == kind:  # already in the file's type: its bytes as they are
        return np.ascontiguousarray(m.block_bytes())
    t = dense(m)
    if kind == "f32":
        return np.ascontiguousarray(t)
    if kind == "bf16":
        return to_bf16(t).bits
    if kind == "f16":
        return _f16(t, name, dtype)
    return kernels.quantize_blocks(t, kind).data


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
        tensors = f"{self.tensors} {self.source} tensor{'s' if self.tensors != 1 else ''}"
        return (f"{tensors} converted to {self.target}: RMS error "
                f"{100 * self.relative_rms_error:.2f}% of the weights' RMS (on top of {self.source}'s own)")


# Types whose weights, made Q4_0, try other scales than llama.cpp's (quant.quantize_q4_0_searched): their grids
# (5 bits, or 4 with an offset) put many values on Q4_0's rounding ties at its scale. Measured on random blocks
# (RMS error of the conversion): Q4_1 6.27 -> 5.65%, Q5_0 7.15 -> 6.46%, Q5_1 6.03 -> 5.75%, Q5_K 5.98 -> 5.76%;
# Q4_K 6.10 -> 6.00% is not worth the 2.5-3x conversion time (docs/speed-log.md), and Q2_K, Q3_K come out worse.
SEARCHED_Q4_0_SOURCES = ("Q4_1", "Q5_0", "Q5_1", "Q5_K")


def nearest_kind(qtype: TensorType) -> str:
    """babyllama's block type nearest in bits per weight to a llama.cpp type (Q4_0 4.5, Q8_0 8.5)."""
    return "q8_0" if 8 * qtype.type_bytes / qtype.block >= 6.5 else "q4_0"


# rows dequantized at a time when converting: bounds the fp32 scratch (and the gguf package's temporaries, a
# few times that) to ~4 MB
_CONVERT_ELEMENTS = 1 << 20


def _convert(data: np.ndarray, qtype: TensorType, cols: int, note: ConversionNote) -> BlockTensor:
    """A tensor of another llama.cpp type (rows of `cols` weights) as `note.target` blocks, a few rows at a time,
    on threads.worker_count() threads (NumPy lets go of the GIL in the dequantizer's and the quantizer's array
    operations). The blocks are the same whatever the threads; the error's sums are added in row order."""
    rows = data.shape[0]
    out = np.empty((rows, cols // BLOCK * BLOCK_BYTES[note.target]), dtype=np.uint8)
    step = max(1, _CONVERT_ELEMENTS // cols)
    from .. import kernels

    native = kernels.native_backend()
    searched = note.target == "q4_0" and qtype.name in SEARCHED_Q4_0_SOURCES

    def rows_from(r: int) -> tuple[float, float, tuple]:
        # the native kernels, where they convert this type: the same blocks in one pass over the rows
        done = native.convert_ggml(data[r:r + step], qtype.id, cols, note.target, out[r:r + step],
                                   searched) if native else None
        if done is not None:
            return done[1], done[2], ()
        ref = _dequantized(data[r:r + step], qtype).reshape(-1, cols)
        q = quantize_q4_0_searched(ref) if searched else QUANTIZERS[note.target](ref)
        out[r:r + step] = q.data
        return (float(np.square(q.dequantize() - ref, dtype=np.float64).sum()),
                float(np.square(ref, dtype=np.float64).sum()), (ref, q))

    starts = range(0, rows, step)
    workers = min(worker_count(), len(starts))
    with ThreadPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        # `_held`: a chunk's arrays live on until the next chunk's are made, so that glibc (at its defaults)
        # hands the same memory back instead of trimming it and faulting it in again (one thread 0.6x without)
        for err_sq, ref_sq, _held in (pool.map if pool else map)(rows_from, starts):
            note.err_sq += err_sq
            note.ref_sq += ref_sq
    note.tensors += 1
    return BlockTensor(note.target, out, cols)


# GGUF's metadata value types (gguf.GGUFValueType): the scalars' NumPy types, and the two variable-size kinds
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
            12: "<f8"}
_BOOL, _STRING, _ARRAY = 7, 8, 9
# the same types as struct formats: the header's scalars are read one at a time (a vocabulary's 32,000 string
# lengths, say), where NumPy's per-call cost would be most of a GGUF file's load time
_STRUCTS = {kind: struct.Struct("<" + {"u1": "B", "i1": "b", "u2": "H", "i2": "h", "u4": "I", "i4": "i", "f4": "f",
                                       "u8": "Q", "i8": "q", "f8": "d"}[code[1:]]) for kind, code in _SCALARS.items()}
MAX_KEYS = 1 << 16  # metadata entries
MAX_TENSORS = 16 * LIMITS["n_layers"] + 16
MAX_NAME = 1 << 16  # bytes of a key or tensor name
MAX_ARRAY = 1 << 22  # entries of one metadata array (vocabularies, merges)
MAX_DIMS = 4  # GGML_MAX_DIMS
# the arrays read into Python lists; the others (merges, chat templates' tables, ...) are checked and skipped
WANTED_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
# text that describes a model and changes nothing it computes: read with U+FFFD for bytes that are not UTF-8
# (llama.cpp runs such a file; a tool that wrote a Latin-1 name made no corrupt model)
DESCRIPTIVE_KEYS = ("general.name", "general.author", "general.description", "general.license",
                    "general.organization", "general.basename", "general.finetune", "general.url",
                    "general.source.", "general.base_model.", "general.tags", "general.languages",
                    "general.datasets", "general.quantized_by", "general.repo_url", "general.version")


@dataclass(frozen=True)
class TensorType:
    """A llama.cpp tensor type (ggml_type): its number in the file, its name, weights and bytes per block."""

    id: int
    name: str
    block: int
    type_bytes: int


# The types a model is run from without the gguf package (ggml.h's numbers; the package is imported, ~60 ms,
# only for the others; tests check these against it): those the kernels run, and those the native kernels
# convert (kernels.c's convert_ggml_rows; without them, these are dequantized by the package).
_OWN_TYPES = {t.id: t for t in (TensorType(0, "F32", 1, 4), TensorType(1, "F16", 1, 2),
                                TensorType(30, "BF16", 1, 2), TensorType(2, "Q4_0", BLOCK, BLOCK_BYTES["q4_0"]),
                                TensorType(8, "Q8_0", BLOCK, BLOCK_BYTES["q8_0"]),
                                TensorType(3, "Q4_1", 32, 20), TensorType(6, "Q5_0", 32, 22),
                                TensorType(7, "Q5_1", 32, 24), TensorType(10, "Q2_K", 256, 84),
                                TensorType(11, "Q3_K", 256, 110), TensorType(12, "Q4_K", 256, 144),
                                TensorType(13, "Q5_K", 256, 176), TensorType(14, "Q6_K", 256, 210))}


def tensor_type(kind: int) -> TensorType | None:
    """The tensor type numbered `kind` in a GGUF file; None where the gguf package does not know it."""
    if kind in _OWN_TYPES:
        return _OWN_TYPES[kind]
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType(kind)
        block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        return None
    return TensorType(kind, qtype.name, block, type_bytes)


def _dequantized(data: np.ndarray, qtype: TensorType) -> np.ndarray:
    """A tensor's weights as fp32: F32/F16/BF16 as they are viewed (_view), other types by the gguf package."""
    if qtype.name in ("F32", "F16"):
        return np.asarray(data, dtype=np.float32)
    if qtype.name == "BF16":
        return bf16_to_f32(data)
    gguf = _gguf()
    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType(qtype.id)), dtype=np.float32)


@dataclass
class GGUFTensor:
    """A tensor of a GGUF file, with the attributes of the gguf package's ReaderTensor that loading uses."""

    name: str
    tensor_type: TensorType
    shape: tuple[int, ...]  # innermost first, as GGUF lists them
    data_offset: int  # absolute, in the file
    n_bytes: int
    data: np.ndarray | None = None  # a read-only view of the mapped file (NumPy's order: shape reversed)


@dataclass
class Skipped:
    """A metadata array that was checked but not read (its length only)."""

    length: int

    def __repr__(self) -> str:  # what an error about the key shows: "must be an integer, got an array of 5 values"
        return f"an array of {self.length:,} values"


class _Walker:
    """Reads a GGUF header from a mapped file, checking every count and length against the bytes left before
    trusting it. (The gguf package's reader loops on an inflated count, raises assorted errors on a truncated
    one, and keeps a NumPy view per array entry, ~850 bytes each.)"""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.path, self.off = buf, path, 0
        self.bytes = buf.data  # the same bytes as a memoryview, read without NumPy's per-call cost

    def fail(self, what: str) -> BabyLlamaError:
        return BabyLlamaError(f"{self.path}: corrupt GGUF header: {what} (at byte {self.off})")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.off + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file")
        start = self.off
        self.off += n
        return start

    def scalar(self, kind: int, what: str):
        form = _STRUCTS[kind]
        value = form.unpack_from(self.bytes, self.take(form.size, what))[0]
        return bool(value) if kind == _BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def text(self, what: str, max_len: int | None = None, lenient: bool = False) -> str:
        return self.strings(1, what, True, max_len, lenient)[0]

    def strings(self, count: int, what: str, read: bool, max_len: int | None = None,
                lenient: bool = False) -> list[str]:
        """`count` strings in a row (a vocabulary's tokens: one loop, with one call per string for its length
        rather than a method call per check, reads a 32,000-token header in half the time), each a u64 length
        (at most `max_len`) and as many bytes of UTF-8 (`lenient`: bytes that are not read as U+FFFD); [] where
        not `read` (checked and stepped over only). A failure is reported at the byte take() would report it at."""
        mv, off, end, length = self.bytes, self.off, len(self.buf), _STRUCTS[10].unpack_from
        out: list[str] = []
        for _ in range(count):
            self.off = off
            if off + 8 > end:
                raise self.fail(f"the length of {what} runs past the end of the file")
            n = length(mv, off)[0]
            self.off = off = off + 8
            if max_len is not None and n > max_len:
                raise self.fail(f"{what} claims {n:,} bytes")
            if n > end - off:
                raise self.fail(f"{what} runs past the end of the file")
            self.off = off + n
            if read:
                try:
                    out.append(str(mv[off:off + n], "utf-8", "replace" if lenient else "strict"))
                except UnicodeDecodeError:
                    raise self.fail(f"{what} is not UTF-8") from None
            off += n
        return out

    def value(self, kind: int, what: str, read_array: bool = True, lenient: bool = False):
        """One metadata value: a scalar, a string (`lenient`: see strings), or an array of either (read into a
        list when `read_array`, else only checked and stepped over)."""
        if kind in _SCALARS:
            return self.scalar(kind, what)
        if kind == _STRING:
            return self.text(what, lenient=lenient)
        if kind != _ARRAY:
            raise self.fail(f"{what} has the unknown value type {kind}")
        item = self.u32(f"the item type of {what}")
        count = self.u64(f"the length of {what}")
        least = np.dtype(_SCALARS[item]).itemsize if item in _SCALARS else 8  # a string: its 8-byte length
        if item not in _SCALARS and item != _STRING:
            raise self.fail(f"{what} is an array of type {item}")
        if count > MAX_ARRAY or count * least > len(self.buf) - self.off:
            raise self.fail(f"{what} claims {count:,} entries, more than the file holds")
        if item == _STRING:
            strings = self.strings(count, what, read_array)
            return strings if read_array else Skipped(count)
        start = self.take(count * least, what)
        if not read_array:
            return Skipped(count)
        values = np.frombuffer(self.buf, _SCALARS[item], count, start)
        return (values != 0).tolist() if item == _BOOL else values.tolist()


def read_gguf(path: Path) -> tuple[dict, dict[str, GGUFTensor]]:
    """A GGUF file's metadata and tensors, everything checked before it is trusted: the header's counts and
    lengths, UTF-8 text, value and tensor types (integer tensors refused), shapes, and that the tensors lie
    inside the file, aligned, in order, without overlap or gaps. Tensor data stay memory-mapped."""
    size = safeio.file_size(path, "GGUF file")
    if size < 24:
        raise BabyLlamaError(f"{path}: not a readable GGUF file (only {size} bytes)")
    with safeio.open_regular(path, "GGUF file") as f, safeio.mapping(path):
        buf = np.memmap(f, dtype=np.uint8, mode="r")
    w = _Walker(buf, path)
    if buf[:4].tobytes() != b"GGUF":
        raise w.fail("no GGUF magic")
    w.take(4, "magic")
    version = w.u32("the version")
    if version not in (2, 3):
        raise BabyLlamaError(f"{path}: GGUF version {version} is not supported (2 and 3 are; big-endian files "
                             "are not)")
    n_tensors, n_keys = w.u64("the tensor count"), w.u64("the metadata count")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        raise w.fail(f"{n_tensors:,} tensors and {n_keys:,} metadata entries")
    meta = {}
    for i in range(n_keys):
        key = w.text(f"metadata key {i}", MAX_NAME)
        if key in meta:
            raise w.fail(f"metadata key {key} appears twice")
        meta[key] = w.value(w.u32(f"the type of {key}"), key, read_array=key in WANTED_ARRAYS,
                            lenient=key.startswith(DESCRIPTIVE_KEYS))
    alignment = meta.get("general.alignment", 32)
    if not is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise w.fail("general.alignment must be a power of two")
    tensors = [_tensor_info(w) for _ in range(n_tensors)]
    data_start = -(-w.off // alignment) * alignment
    _check_tiling(w, tensors, data_start, buf.size, alignment)  # the map's size: the file may have changed since
    for t in tensors:
        t.data = _view(buf, t)
    return meta, {t.name: t for t in tensors}


def _tensor_info(w: _Walker) -> GGUFTensor:
    name = w.text("a tensor name", MAX_NAME)
    n_dims = w.u32(f"the rank of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise w.fail(f"tensor {name} has {n_dims} dimensions")
    dims = tuple(w.u64(f"the shape of {name}") for _ in range(n_dims))
    kind = w.u32(f"the type of {name}")
    rel = w.u64(f"the offset of {name}")
    qtype = tensor_type(kind)
    if qtype is None:
        raise w.fail(f"tensor {name} has the unknown type {kind}")
    if qtype.name in ("I8", "I16", "I32", "I64"):
        raise BabyLlamaError(f"{w.path}: tensor {name} holds integers ({qtype.name}), not weights")
    if any(d < 1 or d > 1 << 32 for d in dims) or math.prod(dims) > 1 << 40:
        raise w.fail(f"tensor {name} has the shape {list(dims)}")
    if dims[0] % qtype.block:
        raise w.fail(f"tensor {name}: rows of {dims[0]} do not split into {qtype.name} blocks of {qtype.block}")
    return GGUFTensor(name, qtype, dims, rel, math.prod(dims) // qtype.block * qtype.type_bytes)


def _check_tiling(w: _Walker, tensors: list[GGUFTensor], data_start: int, size: int, alignment: int) -> None:
    """Tensor data starts at `data_start`; each tensor at an aligned offset, the next right after it (after
    alignment padding), the last one ending within the file. Offsets become absolute."""
    names = set()
    expected = 0
    for t in sorted(tensors, key=lambda t: t.data_offset):
        if t.name in names:
            raise BabyLlamaError(f"{w.path}: tensor {t.name} appears twice")
        names.add(t.name)
        if t.data_offset != expected:
            what = "overlaps the tensor before it" if t.data_offset < expected else "leaves a gap before it"
            raise BabyLlamaError(f"{w.path}: tensor {t.name} at data offset {t.data_offset} {what} (expected "
                                 f"{expected}); the file is corrupt")
        expected = -(-(t.data_offset + t.n_bytes) // alignment) * alignment
        t.data_offset += data_start
        if t.data_offset + t.n_bytes > size:
            raise BabyLlamaError(f"{w.path}: tensor {t.name} ends at byte {t.data_offset + t.n_bytes:,}, past the "
                                 f"end of the file ({size:,} bytes): truncated or corrupt")
    if tensors and size - (data_start + expected) >= alignment:
        raise BabyLlamaError(f"{w.path}: {size - data_start - expected:,} bytes after the last tensor; the file is "
                             "corrupt")


def _view(buf: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """The tensor's bytes as the gguf package's reader lays them out: float types as their dtype (BF16 as
    uint16 bits), the others as uint8 rows of blocks (what gguf.quants.dequantize takes)."""
    shape = tuple(reversed(t.shape))
    floats: dict[str, type[np.generic]] = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
                                           "BF16": np.uint16}  # bfloat16 as its bits (see BF16Tensor)
    dtype = floats.get(t.tensor_type.name)
    if dtype is None:
        dtype, shape = np.uint8, (*shape[:-1], shape[-1] // t.tensor_type.block * t.tensor_type.type_bytes)
    return buf[t.data_offset:t.data_offset + t.n_bytes].view(dtype).reshape(shape)


def load_gguf(path: str | os.PathLike, max_seq_len: int | None = None, keep_quantized: bool = False,
              notes: list[ConversionNote | str] | None = None, quantize: str | None = None,
              convert_other_types: bool = True) -> tuple[Weights, Vocab | None]:
    """Read a llama-architecture GGUF file into `Weights` and its vocabulary (None when the file has none).
    By default every tensor is dequantized to fp32 (f32, f16, bf16 and the quantized types the gguf package
    reads). `keep_quantized`: Q8_0/Q4_0 tensors stay memory-mapped blocks, F16 and BF16 matrices mapped (fp16
    arrays, BF16Tensors: the native kernels read both as fp32), other quantized types are converted to the
    nearest of Q8_0/Q4_0 (see the module's docstring) where `convert_other_types`, else dequantized to fp32 (the
    file's own weights, for what computes in fp32 anyway: the PyTorch engine, export), with one ConversionNote
    per converted type appended to `notes`, and a line there when the file's chat template is not Llama 2's
    (chat_template.foreign_template_note).
    `quantize` (config.QUANTIZE_KINDS, what `--quantize` asks): every F32/F16/BF16 matrix is quantized as soon as
    it is read and its file bytes handed back (from_state_dict), so that a large file never needs memory for its
    fp32 copy."""
    path = Path(path)
    meta, tensors = read_gguf(path)
    fields = Fields(meta, str(path))
    arch = meta.get("general.architecture")
    if arch is None:
        raise BabyLlamaError(f"{path}: general.architecture is missing (only 'llama' GGUF files, which say so)")
    if arch != ARCH:
        raise BabyLlamaError(f"{path}: unsupported architecture {arch!r} (only 'llama' GGUF files)")
    splits = meta.get("split.count")
    if isinstance(splits, int) and splits > 1:  # the other tensors are in the other files
        raise BabyLlamaError(f"{path}: one of {splits} files of a split GGUF model; merge them into one first "
                             "(llama.cpp's llama-gguf-split --merge FIRST-FILE OUT.gguf)")

    converted: dict[str, ConversionNote] = {}
    dequantized: dict[str, int] = {}  # type -> tensors read as fp32 where they could have been converted
    maps = memory.read_only_file_maps()

    def get(name: str) -> Matrix:
        key = gguf_name(name)
        if key not in tensors:
            raise KeyError(name)
        t = tensors[key]
        data = t.data
        assert data is not None  # read_gguf maps every tensor
        kind = t.tensor_type.name.lower()
        try:
            with np.errstate(all="ignore"):  # NaN scales give NaN weights, refused by from_state_dict
                if keep_quantized and t.tensor_type.name in ("F16", "BF16") and len(t.shape) == 2:
                    # mapped, run as it is (the kernels read fp16 and bf16 as fp32: W_F16, W_BF16) or quantized
                    return BF16Tensor(data) if t.tensor_type.name == "BF16" else data
                # asked for another type (`quantize`), or not asked to convert, a type of no kernel's is read as the
                # file's own weights, not through the nearest of ours: a Q5_0 file asked for Q8_0 keeps Q5_0's precision
                of_no_kernel = kind not in KINDS and t.tensor_type.name not in _FLOAT_TYPES
                if not keep_quantized or t.tensor_type.name in _FLOAT_TYPES or len(t.shape) != 2 or \
                        (of_no_kernel and (quantize is not None or not convert_other_types)):
                    if keep_quantized and of_no_kernel and quantize is None:  # said beside what was mapped
                        dequantized[t.tensor_type.name] = dequantized.get(t.tensor_type.name, 0) + 1
                    dense = _dequantized(data, t.tensor_type)  # F32: the mapped view itself
                    if quantize is not None and dense is not data:  # a converted copy, quantized next: the
                        memory.release_mapped(data, maps=maps)      # file's bytes are read once
                    return dense
                cols = int(t.shape[0])  # GGUF lists dimensions innermost first
                if kind in KINDS:
                    return BlockTensor(kind, data, cols)
                note = converted.setdefault(kind, ConversionNote(t.tensor_type.name, nearest_kind(t.tensor_type)))
                blocks = _convert(data, t.tensor_type, cols, note)
                memory.release_mapped(data, maps=maps)  # read once: memory holds the file and its conversion
                return blocks                           # together for one tensor at a time
        except (NotImplementedError, ValueError) as e:  # types the package cannot dequantize
            raise BabyLlamaError(f"{path}: cannot read tensor {key} of type {t.tensor_type.name} ({e})") from None

    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise BabyLlamaError(f"{path}: tensor token_embd.weight is missing")
    if len(emb.shape) != 2:
        raise BabyLlamaError(f"{path}: tensor token_embd.weight has the shape {list(emb.shape)}, not a matrix")
    llama = Fields(meta, str(path), prefix=f"{ARCH}.")
    n_heads = llama.int("attention.head_count", hi=LIMITS["n_heads"])
    context = max_seq_len or llama.int("context_length", hi=LIMITS["max_seq_len"])
    args = checked_args(
        str(path), dim=llama.int("embedding_length", hi=LIMITS["dim"]),
        n_layers=llama.int("block_count", hi=LIMITS["n_layers"]), n_heads=n_heads,
        n_kv_heads=llama.int("attention.head_count_kv", n_heads, hi=LIMITS["n_kv_heads"]),
        hidden_dim=llama.int("feed_forward_length", hi=LIMITS["hidden_dim"]),
        vocab_size=int(emb.shape[1]),  # GGUF lists dimensions innermost first: (dim, vocab)
        norm_eps=_shortest(llama.float("attention.layer_norm_rms_epsilon", DEFAULT_NORM_EPS)),
        rope_theta=_shortest(llama.float("rope.freq_base", DEFAULT_ROPE_THETA)),
        max_seq_len=context, shared_classifier="output.weight" not in tensors,
    )
    _check_vocab_size(llama.int("vocab_size", args.vocab_size, hi=LIMITS["vocab_size"]), args, path)
    _check_rotary_dimension(llama.int("rope.dimension_count", args.head_size), args, path)
    _check_plain_rope(llama, tensors, path)
    known = {gguf_name(k) for k in expected_shapes(args)}
    unexpected = sorted(set(tensors) - known - {"output.weight"} - _IGNORED)
    if unexpected:
        raise BabyLlamaError(f"{path}: unexpected tensor {unexpected[0]} (block_count says {args.n_layers} layers; "
                             "not a plain Llama model?)")
    vocab = _read_vocab(fields, path)  # checked before the weights are read: a refused file costs no load
    weights = from_state_dict(args, get, str(path), display=gguf_name, quantize=quantize)
    # The checks read every tensor's pages; the file's bytes that decode steps will not stream (the sources of
    # tensors converted on load, an embedding table apart from the classifier: a row per token) are handed back.
    streamed = {id(a) for m in (weights.wcls, *(m for ms in weights.layer_matrices().values() for m in ms))
                for a in matrix_arrays(m)}  # blocks, or a classifier kept as the file holds it (F16, BF16, F32)
    memory.release_mapped(*(t.data for t in tensors.values() if t.data is not None and id(t.data) not in streamed))
    if notes is not None:
        notes.extend(converted.values())
        notes.extend(f"{n} {kind} tensor{'s' if n > 1 else ''} dequantized to fp32" for kind, n in dequantized.items())
        notes.extend(foreign_template_note(meta.get("tokenizer.chat_template"), "the file"))
        notes.extend(end_token_note(vocab))
    return weights, vocab


_FLOAT_TYPES = ("F32", "F16", "BF16")  # read as fp32 arrays, but for F16 and BF16 matrices kept as they are
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency RoPE factors (llama.cpp divides each frequency by one)
_IGNORED = {ROPE_FREQS}  # once _check_plain_rope has found it all ones: plain RoPE, nothing to load


def _check_vocab_size(declared: int, args: ModelArgs, path: Path) -> None:
    """llama.vocab_size, where the file has it, must be the embedding's row count (which sizes the model): a
    file that says otherwise was put together wrong (llama.cpp refuses it too), whichever of the two is right."""
    if declared != args.vocab_size:
        raise BabyLlamaError(f"{path}: llama.vocab_size is {declared:,} but tensor token_embd.weight has "
                             f"{args.vocab_size:,} rows (one per token)")


def _check_rotary_dimension(rope_dims: int, args: ModelArgs, path: Path) -> None:
    """The engine rotates every dimension of a head: rope.dimension_count must be the head size."""
    if rope_dims > args.head_size:
        raise BabyLlamaError(f"{path}: the rotary dimension (rope.dimension_count {rope_dims}) is larger than the "
                             f"head size {args.head_size} (embedding_length {args.dim} / head_count {args.n_heads})")
    if rope_dims != args.head_size:
        raise BabyLlamaError(f"{path}: partial rotary embedding ({rope_dims} of {args.head_size}) is not supported")


def _check_plain_rope(llama: Fields, tensors: dict[str, GGUFTensor], path: Path) -> None:
    """Refuse what llama.cpp applies to RoPE beyond plain rotation, which the engine does not run: a scaling
    factor other than 1 under any scaling type but "none" (linear, yarn, ...; the factor is rope.scaling.factor,
    else the older rope.scale_linear, 0 meaning 1, as llama.cpp reads them), an attention factor other than 1
    (it scales the rotated q and k), or per-frequency factors (rope_freqs.weight) other than all ones."""
    scaling = llama.str("rope.scaling.type", "linear")  # llama.cpp's default when the key is absent
    factor = llama.float("rope.scaling.factor", None, positive=False)
    if factor is None:
        factor = llama.float("rope.scale_linear", 0.0, positive=False)
    if scaling != "none" and factor not in (0.0, 1.0):
        raise BabyLlamaError(f"{path}: rope scaling '{scaling}' with factor {factor:g} is not supported "
                             "(only plain RoPE)")
    attn_factor = llama.float("rope.scaling.attn_factor", 1.0, positive=False)
    if attn_factor != 1.0:
        raise BabyLlamaError(f"{path}: rope.scaling.attn_factor {attn_factor:g} is not supported (only plain RoPE)")
    freqs = tensors.get(ROPE_FREQS)
    if freqs is not None and freqs.data is not None and not np.all(_dequantized(freqs.data, freqs.tensor_type) == 1):
        raise BabyLlamaError(f"{path}: tensor {ROPE_FREQS} scales RoPE's frequencies (Llama 3.1's rope scaling), "
                             "which is not supported (only plain RoPE)")


def _read_vocab(fields: Fields, path: Path) -> Vocab | None:
    """The sentencepiece vocabulary the file carries, each array checked against the token list."""
    if not fields.has("tokenizer.ggml.tokens"):
        return None
    model = fields.str("tokenizer.ggml.model", "")
    if model != "llama":
        raise BabyLlamaError(f"{path}: tokenizer {model!r} is not sentencepiece ('llama')")
    tokens = fields.list("tokenizer.ggml.tokens", max_len=LIMITS["vocab_size"])
    n = len(tokens)
    if not all(isinstance(t, str) for t in tokens):
        raise BabyLlamaError(f"{path}: tokenizer.ggml.tokens must be a list of strings")
    scores = fields.list("tokenizer.ggml.scores", [0.0] * n)
    types = fields.list("tokenizer.ggml.token_type", [NORMAL] * n)
    for key, values in (("scores", scores), ("token_type", types)):
        if len(values) != n:
            raise BabyLlamaError(f"{path}: tokenizer.ggml.{key} has {len(values):,} entries for {n:,} tokens")
    # a GGUF array holds one type: NumPy reads the lists as numbers only if they are (bools and strings not)
    score_values, type_values = np.asarray(scores), np.asarray(types)
    if score_values.dtype.kind not in "iuf" or not np.isfinite(score_values).all():
        raise BabyLlamaError(f"{path}: tokenizer.ggml.scores must be finite numbers")
    if (type_values.dtype.kind not in "iuf" or (type_values % 1 != 0).any() or (type_values < NORMAL).any()
            or (type_values > BYTE).any()):
        raise BabyLlamaError(f"{path}: tokenizer.ggml.token_type must hold token types {NORMAL} to {BYTE}")
    ids = {key: fields.int(f"tokenizer.ggml.{key}_token_id", default, lo=0, hi=n - 1)
           for key, default in (("unknown", UNK), ("bos", BOS), ("eos", EOS))}
    _check_llama2c_specials(fields, ids, path)
    template = fields.data.get("tokenizer.chat_template")  # not a string: no template babyllama could know
    return Vocab(tokens, score_values.astype(float).tolist(), type_values.astype(int).tolist(), unk_id=ids["unknown"],
                 bos_id=ids["bos"], eos_id=ids["eos"], chat_template=template if isinstance(template, str) else None)


# tokens llama.cpp ends generation at by their text alone, as llama-cpp-python 0.3 reads a llama-architecture
# file's vocabulary (checked with llama_vocab_is_eog): chat and code models' end markers
LLAMACPP_END_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<end_of_turn>", "<|endoftext|>",
                                "<|end_of_text|>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>", "<|return|>",
                                "<|call|>", "<|file_sep|>", "<|repo_name|>", "<fim-pad>", "[EOS]"})


def _check_llama2c_specials(fields: Fields, ids: dict[str, int], path: Path) -> None:
    """The engine runs llama2.c's convention: BOS (id 1) before every prompt and nothing after it, EOS (id 2) the
    end of a chat reply, <unk> id 0 (what a character without a piece or byte token becomes, and what decoding
    shows as " ⁇ "), and sentencepiece's dummy prefix (a space before the text). llama.cpp follows the file's own
    special tokens and prefix flag instead, and ends generation at the end-of-turn tokens a file names too, so a
    file whose settings differ would run differently here: refused, naming what differs (absent keys mean
    llama2.c's values). Tokens llama.cpp takes for ends of turn by their text alone are noted (end_token_note)."""
    differs = [f"tokenizer.ggml.{key}_token_id {ids[key]}" for key, want in (("unknown", UNK), ("bos", BOS),
                                                                              ("eos", EOS)) if ids[key] != want]
    for key in ("eot", "eom"):  # end of turn / of message: llama.cpp ends generation there too
        end = fields.data.get(f"tokenizer.ggml.{key}_token_id")
        if end is not None and end != EOS:
            differs.append(f"tokenizer.ggml.{key}_token_id {end!r} (llama.cpp ends generation there)")
    if not fields.bool("tokenizer.ggml.add_bos_token", True):
        differs.append("tokenizer.ggml.add_bos_token false")
    if fields.bool("tokenizer.ggml.add_eos_token", False):
        differs.append("tokenizer.ggml.add_eos_token true")
    if not fields.bool("tokenizer.ggml.add_space_prefix", True):  # llama.cpp would encode "Hi" without " Hi"'s space
        differs.append("tokenizer.ggml.add_space_prefix false")
    if differs:
        raise BabyLlamaError(f"{path}: {', '.join(differs)}: {LLAMA2C_CONVENTION}")


def end_token_note(vocab: Vocab | None) -> list[str]:
    """A note where the vocabulary holds a token llama.cpp ends generation at by its text (a ChatML fine-tune's
    <|im_end|>, which a sentencepiece model's user-defined symbols may hold too): babyllama ends at EOS only."""
    ends = [f"{t!r} (id {i})" for i, t in enumerate(vocab.tokens if vocab else []) if t in LLAMACPP_END_TEXTS]
    if not ends:
        return []
    return [f"the vocabulary holds {', '.join(ends[:3])}, at which llama.cpp ends generation; babyllama ends it at "
            f"EOS (id {EOS}) only"]


def _shortest(value: float) -> float:
    """GGUF stores eps and theta as float32: read 1e-6 back as 1e-6, not 9.99999997e-07."""
    return float(str(np.float32(value)))
