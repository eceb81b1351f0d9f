"""The C kernels (csrc/kernels.c), compiled on first use with the system C compiler and called through ctypes.

Why C: decode multiplies a few activation rows by every weight matrix, and the fastest way to do Q8_0
on x86 without VNNI is the AVX2 byte multiply-add (maddubs), which neither NumPy nor numba can emit;
fp32 decode just needs the weights streamed at full memory bandwidth on every core. The shared library
is built once per machine and source version (cached under ~/.cache/babyllama/native or
$BABYLLAMA_CACHE/native); without a compiler, or with BABYLLAMA_NATIVE=0, `load()` returns None and
kernels.py falls back to numba, then NumPy.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .formats import QTensor, Weights

SOURCE = Path(__file__).parent / "csrc" / "kernels.c"
# tried in order: a compiler without OpenMP (Apple's clang) still gets single-threaded kernels
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])


class _Mat(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("s", ctypes.c_void_p), ("rows", ctypes.c_int64), ("row0", ctypes.c_int64)]


class _Fusion(ctypes.Structure):
    _fields_ = [("norm_w", ctypes.c_void_p), ("eps", ctypes.c_float), ("gate", ctypes.c_void_p),
                ("accumulate", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("qkv", _Mat * 3), ("wo", _Mat), ("w13", _Mat * 2), ("w2", _Mat), ("rms_att", ctypes.c_void_p),
                ("rms_ffn", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in
                ("n_layers", "dim", "hidden_dim", "n_heads", "kv_heads", "head_size", "gs")] + \
               [("eps", ctypes.c_float), ("layers", ctypes.POINTER(_Layer)), ("embeddings", ctypes.c_void_p),
                ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("n_positions", ctypes.c_int64),
                ("cls", _Mat), ("cls_gs", ctypes.c_int64), ("rms_final", ctypes.c_void_p)]


class ModelPlan:
    """A model described to C once (see `NativeKernels.describe`); holds the arrays behind its pointers so
    that they stay valid."""

    def __init__(self, weights: Weights, rope: tuple[np.ndarray, np.ndarray], struct: _Model, layers: ctypes.Array):
        self.weights, self.rope, self.struct, self.layers = weights, rope, struct, layers


# forward_step's return codes: which of its index arrays held a value outside its table
STEP_ERRORS = {1: "token ids must lie in [0, vocab_size)", 2: "positions must lie in [0, seq_len)",
               3: "slots must lie in [0, the cache's slots)", 4: "rows must index the step's tokens"}


def cache_root() -> Path:
    base = os.environ.get("BABYLLAMA_CACHE") or Path.home() / ".cache" / "babyllama"
    return Path(base) / "native"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(directory: Path | None = None) -> Path | None:
    """The shared library for this source, compiled with the first flag set that works and cached; None
    without a compiler or when every flag set fails (the caller falls back). A failed attempt leaves a
    marker so that later runs do not pay for it again."""
    cc = compiler()
    if cc is None:
        return None
    source = SOURCE.read_bytes()
    directory = directory or cache_root()
    for flags in FLAG_SETS:
        key = hashlib.sha256(source + " ".join([cc, *flags]).encode()).hexdigest()[:16]
        lib, failed = directory / f"kernels-{key}.so", directory / f"kernels-{key}.failed"
        if lib.exists():
            return lib
        if failed.exists():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        # compile to a temporary name and rename: concurrent first runs never load a half-written library
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        cmd = [cc, *flags, "-shared", "-fPIC", str(SOURCE), "-o", tmp, "-lm"]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            os.replace(tmp, lib)
            return lib
        os.unlink(tmp)
        failed.write_text(" ".join(cmd) + "\n")
    return None


_char_view = ctypes.c_char.from_buffer


def _address(a: np.ndarray) -> int:
    """Where a's data starts (a is contiguous). The buffer route is 5x faster than __array_interface__,
    which matters at ~40 calls per layer, but needs a writable array (weights are read-only maps)."""
    if a.flags.writeable:
        return ctypes.addressof(_char_view(a))
    return a.__array_interface__["data"][0]


class NativeKernels:
    """The library's two products behind the interface of kernels_numba. A call's weights are described
    to C once (pointers, rows, where each result goes) and the description is reused while the same
    arrays come back, which they do every token: building it costs more than a small product."""

    MAX_PLANS = 4096

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.compiler = compiler() or "cc"  # what built it (for the bench's description)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.lib.matmul_f32.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr]
        self.lib.matmul_q8.argtypes = [ptr, i64, i64, i64, ptr, ctypes.c_int, ptr, ptr]
        self.lib.rmsnorm.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ptr]
        self.lib.attention_step.argtypes = [ptr] * 9 + [i64] * 5 + [ptr]
        self.lib.swiglu.argtypes = [ptr, ptr, i64, ptr]
        self.lib.dequantize_q8.argtypes = [ptr, ptr, i64, i64, i64, ptr]
        self.lib.forward_step.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, ptr]
        self.lib.forward_step.restype = ctypes.c_int
        self.lib.kernel_threads.restype = ctypes.c_int
        self.path = path
        self._plans: dict[tuple[int, ...], tuple[tuple, ctypes.Array, list[tuple[int, int]]]] = {}

    @staticmethod
    def _describe_matrices(mats: ctypes.Array, ws: Sequence) -> list[tuple[int, int]]:
        """Fill mats with ws's pointers and shapes, stacked one result after another; returns each one's
        (first row, end row) in the stacked result."""
        bounds, row0 = [], 0
        for m, w in zip(mats, ws, strict=True):
            q, s = (w.q, w.s) if isinstance(w, QTensor) else (w, None)
            if not (q.flags.c_contiguous and (s is None or s.flags.c_contiguous)):
                raise ValueError("weights must be C-contiguous")
            if s is None and q.dtype != np.float32:
                raise ValueError("fp32 weights must be float32")
            m.w, m.s, m.rows, m.row0 = _address(q), None if s is None else _address(s), q.shape[0], row0
            bounds.append((row0, row0 + q.shape[0]))
            row0 += q.shape[0]
        return bounds

    def _plan(self, ws: Sequence) -> tuple[ctypes.Array, list[tuple[int, int]]]:
        """(C descriptions of ws, each one's (first row, end row) in the stacked result). Results are laid
        out one matrix after another, each (n_tok, rows) and contiguous, so the caller's views need no copy."""
        key = tuple(id(w) for w in ws)
        plan = self._plans.get(key)
        if plan is not None and all(a is b for a, b in zip(plan[0], ws)):
            return plan[1], plan[2]
        mats = (_Mat * len(ws))()
        bounds = self._describe_matrices(mats, ws)
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.clear()
        self._plans[key] = (tuple(ws), mats, bounds)  # holding ws keeps their ids from being reused
        return mats, bounds

    @staticmethod
    def _outputs(bounds: list[tuple[int, int]], n_tok: int) -> tuple[np.ndarray, list[np.ndarray]]:
        out = np.empty(n_tok * bounds[-1][1], dtype=np.float32)
        return out, [out[n_tok * a:n_tok * b].reshape(n_tok, b - a) for a, b in bounds]

    def matmul(self, x: np.ndarray, ws: Sequence, norm: tuple[np.ndarray, float] | None = None,
               gate: np.ndarray | None = None, into: np.ndarray | None = None) -> list[np.ndarray]:
        """x @ w.T for each w in ws (all fp32 or all Q8_0 of one group size), in one call. Fused forms for a
        decode step: norm=(weight, eps) multiplies rmsnorm(x) * weight instead of x; gate=g multiplies
        silu(x) * g; into=y (one matrix) adds the product into y in place and returns [y]."""
        x = _contiguous(x)
        mats, bounds = self._plan(ws)
        if into is not None:
            if len(ws) != 1 or not (into.flags.c_contiguous and into.dtype == np.float32 and into.flags.writeable):
                raise ValueError("into= takes one matrix and a writable contiguous float32 array")
            out, views = into, [into]
        else:
            out, views = self._outputs(bounds, x.shape[0])
        fusion = None
        if norm is not None or gate is not None or into is not None:
            # the locals keep any contiguous copies alive through the call
            norm_w = None if norm is None else _contiguous(norm[0])
            gate = None if gate is None else _contiguous(gate)
            fusion = _Fusion(None if norm_w is None else _address(norm_w), 0.0 if norm is None else norm[1],
                             None if gate is None else _address(gate), into is not None)
        n_tok, n = x.shape
        if isinstance(ws[0], QTensor):
            self.lib.matmul_q8(_address(x), n_tok, n, ws[0].group_size, mats, len(ws), _address(out),
                               None if fusion is None else ctypes.byref(fusion))
        else:
            self.lib.matmul_f32(_address(x), n_tok, n, mats, len(ws), _address(out),
                                None if fusion is None else ctypes.byref(fusion))
        return views

    def matmul_f32_many(self, x: np.ndarray, ws: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.matmul(x, ws)

    def matmul_q8_many(self, x: np.ndarray, ws: Sequence[QTensor]) -> list[np.ndarray]:
        return self.matmul(x, ws)

    def dequantize(self, w: QTensor) -> np.ndarray:
        """w as fp32 (QTensor.dequantize, on every thread)."""
        q, s = np.ascontiguousarray(w.q), np.ascontiguousarray(w.s)
        out = np.empty(q.shape, dtype=np.float32)
        self.lib.dequantize_q8(_address(q), _address(s), q.shape[0], q.shape[1], w.group_size, _address(out))
        return out

    def threads(self) -> int:
        return self.lib.kernel_threads()

    # ------------------------------------------------------------ the rest of a decode step (engine.py)

    def rmsnorm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        x, weight = _contiguous(x), _contiguous(weight)
        out = np.empty_like(x)
        self.lib.rmsnorm(_address(x), _address(weight), x.shape[0], x.shape[1], eps, _address(out))
        return out

    def attention_step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                       keys: np.ndarray, values: np.ndarray, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """RoPE on q (N, n_heads, hs) and k (N, kv_heads, hs), k and v into one layer's cache keys/values
        (slots, kv_heads, seq_len, hs) at (slots[i], positions[i]), then each token's causal attention over
        its slot: (N, n_heads * hs). q and k are rotated in place (when contiguous float32; else copies are);
        the cache arrays must be writable and contiguous."""
        if not all(c.flags.c_contiguous and c.dtype == np.float32 and c.flags.writeable for c in (keys, values)):
            raise ValueError("the cache must be writable contiguous float32 arrays")
        q, k, v, cos, sin = (_contiguous(a) for a in (q, k, v, cos, sin))
        slots = np.ascontiguousarray(slots, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        n, n_heads, hs = q.shape
        out = np.empty((n, n_heads * hs), dtype=np.float32)
        self.lib.attention_step(_address(q), _address(k), _address(v), _address(cos), _address(sin), _address(keys),
                                _address(values), _address(slots), _address(positions), n, n_heads, keys.shape[1],
                                keys.shape[2], hs, _address(out))
        return out

    def swiglu(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        a, b = _contiguous(a), _contiguous(b)
        out = np.empty_like(a)
        self.lib.swiglu(_address(a), _address(b), a.size, _address(out))
        return out

    def describe(self, w: Weights, cos: np.ndarray, sin: np.ndarray) -> ModelPlan:
        """w and its RoPE tables cos/sin (positions, hs/2) for `forward_step` (built once per model: it holds
        pointers)."""
        a = w.args
        layers = (_Layer * a.n_layers)()
        for i, ly in enumerate(layers):
            self._describe_matrices(ly.qkv, [w.wq[i], w.wk[i], w.wv[i]])
            self._describe_matrices(ly.w13, [w.w1[i], w.w3[i]])
            self._describe_matrices(_one(ly.wo), [w.wo[i]])
            self._describe_matrices(_one(ly.w2), [w.w2[i]])
            ly.rms_att, ly.rms_ffn = _address(_checked(w.rms_att[i])), _address(_checked(w.rms_ffn[i]))
        struct = _Model(a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.head_size, w.group_size,
                        a.norm_eps, layers)
        struct.embeddings = _address(_checked(w.tok_embeddings))
        struct.cos, struct.sin, struct.n_positions = _address(_checked(cos)), _address(_checked(sin)), len(cos)
        self._describe_matrices(_one(struct.cls), [w.wcls])
        struct.cls_gs = w.wcls.group_size if isinstance(w.wcls, QTensor) else 0
        struct.rms_final = _address(_checked(w.rms_final))
        return ModelPlan(w, (cos, sin), struct, layers)

    def forward_step(self, plan: ModelPlan, tokens: np.ndarray, positions: np.ndarray, slots: np.ndarray,
                     keys: np.ndarray, values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """A decode-sized step in one call: tokens (N,) embedded, every transformer block (RoPE at each
        token's position, keys/values written into the cache arrays (L, slots, kv_heads, seq_len, hs) at
        (slots[i], positions[i]), each token attending over its slot up to its position), then the final
        norm and the classifier for the step's rows `rows`: logits (len(rows), vocab)."""
        if not all(c.flags.c_contiguous and c.dtype == np.float32 and c.flags.writeable for c in (keys, values)):
            raise ValueError("the cache must be writable contiguous float32 arrays")
        tokens, positions, slots, rows = (np.ascontiguousarray(a, dtype=np.int64)
                                          for a in (tokens, positions, slots, rows))
        n = len(tokens)
        if not (len(positions) == len(slots) == n):
            raise ValueError("tokens, positions and slots must have one entry per token")
        logits = np.empty((len(rows), plan.weights.args.vocab_size), dtype=np.float32)
        err = self.lib.forward_step(ctypes.byref(plan.struct), _address(tokens), n, _address(slots),
                                    _address(positions), _address(keys), _address(values), keys.shape[1],
                                    keys.shape[3], _address(rows), len(rows), _address(logits))
        if err:  # checked in C before anything is read or written: NumPy's min/max cost more than the step
            raise ValueError(STEP_ERRORS[err])
        return logits


def _one(mat: _Mat) -> ctypes.Array:
    """A struct's single matrix field as the one-element array that `_describe_matrices` fills."""
    return (_Mat * 1).from_address(ctypes.addressof(mat))


def _checked(a: np.ndarray) -> np.ndarray:
    """a itself, which C will read through a stored pointer: it must not be a temporary copy."""
    if not (a.flags.c_contiguous and a.dtype == np.float32):
        raise ValueError("arrays that C reads through stored pointers must be contiguous float32")
    return a


def _contiguous(a: np.ndarray) -> np.ndarray:
    return a if a.flags.c_contiguous and a.dtype == np.float32 else np.ascontiguousarray(a, dtype=np.float32)


def load() -> NativeKernels | None:
    """The native kernels, or None (the caller falls back) when disabled (BABYLLAMA_NATIVE=0), when no
    compiler works, when the cache folder is not writable, or when the cached library cannot be loaded (it
    is then removed, to be rebuilt next time)."""
    if os.environ.get("BABYLLAMA_NATIVE", "1") == "0":
        return None
    try:
        path = build()
    except OSError:  # e.g. a read-only home: run without the kernels rather than fail
        return None
    if path is None:
        return None
    try:
        return NativeKernels(path)
    except OSError:  # a truncated or foreign library in the cache
        path.unlink(missing_ok=True)
        return None
