"""`babyllama bench`: decode, prefill and batched throughput, side by side in one run on one machine: babyllama
(fp32, Q8_0, Q4_0) against the plain NumPy baseline and, when given, the real references (llama2.c's run.c
and runq.c, llama.cpp through llama-cpp-python), next to the machine's memory bandwidth measured in the
same run.

Models: the built-in story model ("builtin": trained, so its sampled decode means something) and random-weight
models of the tinyllamas shapes (vocab 32000), built once and cached as .bin files under $BABYLLAMA_CACHE/bench or
~/.cache/babyllama/bench (--cache-dir or $BABYLLAMA_BENCH_DIR: elsewhere): version 1 (fp32), 2 (Q8_0), 3 (Q4_0),
plus the version 0 file and a tokenizer.bin that run.c reads, and GGUF files for llama.cpp. Each (model, engine,
thread setting) is measured in a fresh subprocess so that its peak RSS is its own. The rows of a model are
measured --rounds times in turn (a VM's speed drifts by tens of percent within minutes: each round sees every row
once, so rows compared with each other are measured close in time), and every figure is the median over the rounds
of the median of the runs in one process: at least --repeats, and more while they last under a second in all (a
tiny model's run takes milliseconds). `--busy N` starts N spinning co-runner processes for the measurements (a
busy laptop); `--thread-settings default,1,2` measures each thread setting in turn. Each row records the CPU
time a VM's host took from the machine while it ran (StealMeter), which nothing else inside a VM shows.
"""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .config import LLAMA2_VOCAB_SIZE, ModelArgs
from .errors import BabyLlamaError, first_line, say
from .safeio import cache_folder, output_dir
from .threads import STARTING_ENVIRONMENT, usable_cpus

if TYPE_CHECKING:
    from .formats import Weights
    from .kernels_native import NativeKernels

SHAPES: dict[str, dict[str, Any]] = {
    "15M": dict(dim=288, n_layers=6, n_heads=6, hidden_dim=768, max_seq_len=256),
    "42M": dict(dim=512, n_layers=8, n_heads=8, hidden_dim=1376, max_seq_len=1024),
    "110M": dict(dim=768, n_layers=12, n_heads=12, hidden_dim=2048, max_seq_len=1024),
    # TinyLlama-1.1B's shape (grouped-query attention): a 1B-class model for GPU runs (4.4 GB fp32 file)
    "1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
}
BUILTIN = "builtin"  # the trained built-in model (babyllama/assets/model.bin) and its tokenizer
FORMATS = {"fp32": 1, "q8_0": 2, "q4_0": 3}
# formats that only a GGUF file holds (F16, BF16: 16-bit weights), measured on babyllama's GGUF row and
# llama.cpp's, on the same file
GGUF_ONLY_FORMATS = ("f16", "bf16")
FORMAT_LABELS = {"fp32": "fp32", "q8_0": "Q8_0", "q4_0": "Q4_0", "f16": "F16", "bf16": "BF16"}
# the llama2.c programs and the file versions they read: run.c version 0 (fp32), runq.c version 2 (Q8_0)
REFERENCES = {"run.c": ("fp32", 0), "runq.c": ("q8_0", 2)}
GGUF_TYPES = {"fp32": "f32", "q8_0": "q8_0", "q4_0": "q4_0", "f16": "f16", "bf16": "bf16"}
# babyllama's rows on the GGUF files llama.cpp reads (`--gguf`): llama.cpp's Q8_0 and Q4_0 blocks as stored
GGUF_ENGINE = "babyllama (GGUF)"
GGUF_FORMATS = ("q8_0", "q4_0")
PATHS = ("plain", "fast")
# A co-runner says it runs, then spins until its parent is gone: a bench ended by SIGKILL (nothing of it runs
# to stop them) would otherwise leave them spinning for good. The parent is looked at every 0.1 s, the clock
# in between (vDSO: no system call), so the loop stays on the CPU.
BUSY_CODE = """import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C (the terminal's, to the whole group) is the bench's to take
parent = int(sys.argv[1])  # the bench's pid: it may have ended before this line runs
os.write(1, b'1')
os.close(1)
while os.getppid() == parent:
    until = time.monotonic() + 0.1
    while time.monotonic() < until:
        pass
"""


def shape_args(name: str) -> ModelArgs:
    return ModelArgs(vocab_size=LLAMA2_VOCAB_SIZE, **SHAPES[name])


def context_of(shape: str) -> int:
    """The context (max_seq_len) of a shape's model: the longest prompt its prefill can time."""
    if shape == BUILTIN:
        from . import formats
        from .loading import BUILTIN_MODEL

        return formats.read_header(BUILTIN_MODEL)[0].max_seq_len
    return shape_args(shape).max_seq_len


def cache_dir(override: str | None = None) -> Path:
    """Where the bench models are cached: `override` (--cache-dir), else $BABYLLAMA_BENCH_DIR, else the "bench"
    folder of babyllama's cache ($BABYLLAMA_CACHE/bench or ~/.cache/babyllama/bench), made where missing."""
    base = override or os.environ.get("BABYLLAMA_BENCH_DIR") or cache_folder("bench")
    return output_dir(Path(base).expanduser(), "bench model cache")  # "~" in a variable: see cache_folder


def random_model(args: ModelArgs, seed: int = 0) -> Weights:
    """Random weights of `args`' shape (std 0.02 like a fresh init, norm gains 1)."""
    import numpy as np

    from .formats import Weights

    rng = np.random.default_rng(seed)
    L, d, V = args.n_layers, args.dim, args.vocab_size

    def r(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    emb = r(V, d)
    ones = np.ones((L, d), dtype=np.float32)
    mats = {name: r(L, *shape) for name, shape in args.matrix_shapes().items()}  # drawn in llama2.c's file order
    return Weights(args, emb, rms_att=ones, rms_ffn=ones.copy(), rms_final=np.ones(d, dtype=np.float32), **mats,
                   wcls=emb)


def _source_weights(shape: str):
    from . import formats

    if shape == BUILTIN:
        from .loading import BUILTIN_MODEL
        return formats.load(BUILTIN_MODEL)
    return random_model(shape_args(shape))


def model_stem(shape: str) -> str:
    """The cached files' name stem: "random-SHAPE", or for the built-in model one keyed on its file's sha256, so
    that a retrained built-in model is never measured through an older one's cached copies."""
    if shape != BUILTIN:
        return f"random-{shape}"
    import hashlib

    from .loading import BUILTIN_MODEL
    return f"builtin-{hashlib.sha256(Path(BUILTIN_MODEL).read_bytes()).hexdigest()[:12]}"


def model_file(shape: str, fmt: str, directory: Path, version: int | None = None) -> Path:
    """The cached model file for (shape, fmt) in `version` (default: fp32 1, Q8_0 2, Q4_0 3), built on first use."""
    from . import formats, kernels

    version = FORMATS[fmt] if version is None else version
    suffix = "" if version == FORMATS[fmt] else f"-v{version}"
    path = directory / f"{model_stem(shape)}-{fmt}{suffix}.bin"
    if not path.exists():
        say(f"building {path.name} ...")
        formats.save(_source_weights(shape), path, version=version, quantize_q4=kernels.q4_0_blocks)
    return path


def tokenizer_file(shape: str, directory: Path) -> Path:
    """A tokenizer.bin for the shape's models: the built-in one, or for the random models (vocab 32000) one of
    llama2.c's layout (<unk>, <s>, </s>, 256 bytes, a space, letters, then filler pieces) that run.c can load."""
    if shape == BUILTIN:
        from .loading import BUILTIN_TOKENIZER
        return BUILTIN_TOKENIZER
    from .tokenizer import BIN_PIECES, BOS, EOS, Tokenizer

    path = directory / f"tokenizer-{LLAMA2_VOCAB_SIZE}.bin"
    if not path.exists():
        pieces = [b"<unk>", BIN_PIECES[BOS].encode(), BIN_PIECES[EOS].encode()]
        pieces += [f"<0x{i:02X}>".encode() for i in range(256)]
        pieces += [b" "] + [bytes([c]) for c in range(ord("a"), ord("z") + 1)]
        pieces += [f"tok{i}".encode() for i in range(LLAMA2_VOCAB_SIZE - len(pieces))]
        Tokenizer(pieces, [0.0] * 259 + [-float(i) for i in range(LLAMA2_VOCAB_SIZE - 259)]).save(path)
    return path


def gguf_file(shape: str, fmt: str, directory: Path) -> Path:
    """The shape's model as a GGUF file of the format's type (for llama.cpp), built on first use."""
    from .interop.gguf import save_gguf
    from .interop.vocab import load_vocab

    path = directory / f"{model_stem(shape)}-{fmt}.gguf"
    if not path.exists():
        say(f"building {path.name} ...")
        save_gguf(_source_weights(shape), path, load_vocab(tokenizer_file(shape, directory)), GGUF_TYPES[fmt])
    return path


# ------------------------------------------------------------------------------ one measurement (child)


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


# A figure's runs in one process (or of one reference program) last at least this long in all: the built-in
# model decodes 256 tokens in ~50 ms, and one interruption of a few milliseconds moved a single run by 30%.
MIN_SECONDS = 1.0
MAX_RUNS = 100


def runs_of(run: Callable[[], float], repeats: int, min_seconds: float = MIN_SECONDS) -> list[float]:
    """What `run` returns over `repeats` calls, and more calls (at most MAX_RUNS) while they have taken less
    than `min_seconds` in all."""
    values: list[float] = []
    start = time.perf_counter()
    while len(values) < repeats or (time.perf_counter() - start < min_seconds and len(values) < MAX_RUNS):
        values.append(run())
    return values


def median_of_runs(run: Callable[[], float], repeats: int, min_seconds: float = MIN_SECONDS) -> float:
    """The median of runs_of(run, repeats, min_seconds)."""
    return _median(runs_of(run, repeats, min_seconds))


def peak_rss_mib() -> float:
    """This process's peak resident memory (MiB): VmHWM, which starts afresh at exec (ru_maxrss keeps the
    parent's size at fork, so a child of a large process would report at least that), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_bytes(weights: Weights) -> int:
    """Weight bytes a decode step reads: every layer matrix and the classifier (one embedding row aside)."""
    from .formats import matrix_arrays

    mats = [weights.wcls, *(m for stack in weights.layer_matrices().values() for m in stack)]
    return sum(a.nbytes for m in mats for a in matrix_arrays(m))


def kv_read_bytes(args: ModelArgs, value_bytes: float, n_tok: int) -> int:
    """KV cache bytes a decode step reads, on average over a run of n_tok steps from the start of a sequence:
    the keys and values of every layer and kv head at the (n_tok + 5) / 2 positions a step of the run attends
    to on average (its first timed step sits at position 2). value_bytes per cached value: 4 (f32), 2 (f16),
    or a Q8_0 row's bytes over its values."""
    return int(2 * args.n_layers * args.kv_dim * value_bytes * (n_tok + 5) / 2)


TTFT_PROMPT = 16  # prompt tokens of the time-to-first-token figure (fewer when --prompt-len is shorter)


def prefill_prompt(vocab_size: int, prompt_len: int) -> list[int]:
    """The prompt every engine's prefill row is timed on: BOS and `prompt_len` - 1 fixed random ids (not 0-2,
    the special tokens)."""
    import numpy as np

    return [1] + np.random.default_rng(0).integers(3, vocab_size, prompt_len - 1).tolist()


def decode_rate(engine, seq_len: int, n_seq: int, n_tok: int, temperature: float = 0.0, topp: float = 1.0) -> float:
    """Decode tok/s of `n_seq` sequences of `n_tok` positions each from two-token prompts [BOS, 3 + i], timed from
    their second step like run.c (the first step, prompt and first sample, is not counted)."""
    from .generate import Batch, Sequence
    from .sampler import Sampler

    b = Batch(engine, n_seq, seq_len=seq_len)
    seqs = [b.add(Sequence([1, 3 + i], Sampler(temperature, topp, 7 + i), min(seq_len, n_tok + 2), frozenset()))
            for i in range(n_seq)]
    b.step()
    start, n = time.perf_counter(), 0
    while not all(s.done for s in seqs):
        n += len(b.step())
    return n / (time.perf_counter() - start)


def measure(path: Path, plain: bool, repeats: int, tokens: int, batch: int, prompt_len: int,
            mmap: bool | None = None, device: str = "numpy", compile: bool = False, sampled: bool = False,
            kv_cache: str = "auto") -> dict:
    """Time one model file on one path (the NumPy engine, or the PyTorch one on `device`); returns medians
    (tok/s, ms), peak RSS (MiB) and the weight bytes a decode step reads. `sampled`: also decode with
    run.c's default sampling (-t 1 -p 0.9), which is only representative on a trained model."""
    from .api import make_engine
    from .generate import Batch, Sequence
    from .loading import open_model
    from .sampler import Sampler

    if device != "numpy":  # torch and the CUDA context load once per process: in no shape's TTFT
        import torch

        if device.startswith("cuda"):
            torch.cuda.init()
    t0 = time.perf_counter()
    # a .bin file, or a GGUF file's tensors as `run --device` reads them
    weights = open_model(path, mmap=mmap, convert_other_types=device == "numpy").weights
    engine = make_engine(weights, device, plain, compile, kv_cache)
    seq_len = weights.args.max_seq_len
    prompt = prefill_prompt(weights.args.vocab_size, prompt_len)

    def first_token() -> float:
        b = Batch(engine, 1, seq_len=seq_len)  # the whole context's cache, made before the clock runs
        b.add(Sequence(prompt[:TTFT_PROMPT], Sampler(0.0), seq_len))
        b.step()
        return time.perf_counter()

    ttft = first_token() - t0  # load (memory map) + engine + the prompt's first tokens + first sample

    def decode(n_seq: int, n_tok: int, temperature: float = 0.0, topp: float = 1.0) -> float:
        return decode_rate(engine, seq_len, n_seq, n_tok, temperature, topp)

    def prefill() -> float:
        b = Batch(engine, 1, max_tokens_per_step=prompt_len, seq_len=seq_len)
        b.add(Sequence(list(prompt), Sampler(0.0), seq_len))
        start = time.perf_counter()
        b.step()
        return prompt_len / (time.perf_counter() - start)

    if compile:  # compilation happens on the first decode step of each batch size: not part of the timings
        decode(1, 4)
        decode(batch, 4)
    n_tok = min(tokens, seq_len - 2)
    res = {"ttft_ms": 1000 * ttft}
    decodes = runs_of(lambda: decode(1, n_tok), repeats)
    res["decode"] = _median(decodes)
    if sampled:
        res["sampled"] = median_of_runs(lambda: decode(1, n_tok, 1.0, 0.9), repeats)
    res["prefill"] = median_of_runs(prefill, repeats)
    res["batch"] = median_of_runs(lambda: decode(batch, max(8, n_tok // 4)), repeats)
    res["rss_mib"] = peak_rss_mib()
    res["decode_tokens"] = n_tok
    res["repeats"] = len(decodes)  # decode runs made: at least `repeats`
    res["decode_bytes"] = decode_bytes(weights)
    # the PyTorch engine (fp32 files only): the weights as it holds them, bf16 on CUDA
    model = getattr(engine, "model", None)
    if model is not None:
        res["decode_bytes"] = res["decode_bytes"] * model.output.weight.element_size() // 4
    kv = engine_kv_bytes(engine, weights.args, n_tok)
    if kv is not None:
        res["kv_bytes"] = kv
    return res


def engine_kv_bytes(engine, args: ModelArgs, n_tok: int) -> int | None:
    """kv_read_bytes for the NumPy engine's cache type; None for the PyTorch engine (its cache is not counted)."""
    kv = getattr(engine, "kv_dtype", None)
    if kv is None:
        return None
    return kv_read_bytes(args, kv.itemsize / (1 if kv.names is None else args.head_size), n_tok)


def open_llamacpp(path: Path, n_ctx: int, threads: int | None, n_batch: int = 8):
    """llama.cpp (llama-cpp-python) on a GGUF file, `threads` (default: the usable CPUs) for decode and batches."""
    from llama_cpp import Llama

    n_threads = threads or usable_cpus()
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                 n_threads_batch=n_threads, verbose=False)


def llamacpp_decode_rate(llm, tokens: int) -> float:
    """llama.cpp's greedy decode of `tokens` positions from [BOS, 3]: tok/s from the second generated token, as
    decode_rate times babyllama's."""
    llm.reset()
    gen = llm.generate([1, 3], top_k=1, top_p=1.0, temp=0.0, reset=True)
    next(gen)
    start, n = time.perf_counter(), 0
    for _ in gen:
        n += 1
        if n >= tokens - 2:
            break
    return n / (time.perf_counter() - start)


def measure_llamacpp(path: Path, repeats: int, tokens: int, threads: int | None, prompt_len: int = 256) -> dict:
    """llama.cpp on a GGUF file: greedy decode of `tokens` positions (llamacpp_decode_rate), and the prefill of
    the `prompt_len`-token prompt `measure` gives babyllama (the same ids), in one batch; medians of
    runs_of(..., repeats)."""
    llm = open_llamacpp(path, max(tokens, prompt_len) + 8, threads, n_batch=max(prompt_len, 8))
    prompt = prefill_prompt(llm.n_vocab(), prompt_len)

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        return prompt_len / (time.perf_counter() - start)

    decodes = runs_of(lambda: llamacpp_decode_rate(llm, tokens), repeats)
    return {"decode": _median(decodes), "prefill": median_of_runs(prefill, repeats), "decode_tokens": tokens,
            "repeats": len(decodes)}


PROBE_STREAMS = (1, 4)  # a thread reads 64 KiB as one stream (as a product reads its rows) or as four interleaved


def read_rates(native, buf, reads: int) -> dict[int, float]:
    """GB/s of every kernel thread reading `buf` (already in memory) as each of PROBE_STREAMS streams, the median
    of `reads` reads each, the stream counts taking turns so that both meet the same moments of a VM's memory. Some
    CPUs' prefetchers serve several streams a core much faster than one (docs/speed-log.md), so the larger rate is
    what the memory can deliver."""
    if reads < 1:
        raise ValueError(f"the bandwidth probe takes at least one read, got {reads}")
    times: dict[int, list[float]] = {k: [] for k in PROBE_STREAMS}
    for _ in range(reads):
        for streams, taken in times.items():
            start = time.perf_counter()
            native.read_memory(buf, streams)
            taken.append(time.perf_counter() - start)
    return {k: buf.nbytes / _median(t) / 1e9 for k, t in times.items()}


def whole_pages(nbytes: int) -> int:
    """`nbytes` rounded up to whole 4 KiB pages (at least one), as read_memory takes buffers."""
    return -(-max(nbytes, 1) // 4096) * 4096


def buffer_rates(native, nbytes: int, reads: int) -> dict[int, float]:
    """read_rates of a fresh buffer of whole_pages(nbytes), read once first so that its pages are in memory."""
    import numpy as np

    buf = np.ones(whole_pages(nbytes), dtype=np.uint8)
    native.read_memory(buf)
    return read_rates(native, buf, reads)


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Read `mib` MiB (already in memory) on every kernel thread as one stream and as four: the faster one's GB/s
    (the median of `repeats` after a warm-up read), and both. What decode can reach at most, as every weight is
    read once per token."""
    from . import kernels_native

    native = kernels_native.load()
    if native is None:
        return {}
    rates = buffer_rates(native, mib << 20, repeats)
    return {"gbps": max(rates.values()), "streams": {str(k): v for k, v in rates.items()},
            "threads": native.threads(), "mib": mib}


SIZED_READ_BYTES = 256 << 20  # a same-size probe reads its buffer this many bytes' worth of times, at least


def measure_sized_reads(sizes: list[int], repeats: int = 5) -> dict:
    """GB/s of reading a buffer of each of `sizes` bytes whole, again and again, on every kernel thread (one stream
    and four, the faster median; at least `repeats` reads and SIZED_READ_BYTES in all): what a decode step that
    reads that many bytes a token can get at most from wherever they stay between tokens, a cache for a small
    model and memory for a large one. Which sizes a cache holds is measured, not taken from the cache's nominal
    size (a VM's sysfs named a 480 MiB last-level cache that read a 128 MiB buffer at memory's speed)."""
    from . import kernels_native

    native = kernels_native.load()
    if native is None:
        return {}
    rates = {}
    for size in sizes:
        reads = min(max(repeats, -(-SIZED_READ_BYTES // whole_pages(size))), 1000)
        rates[str(size)] = max(buffer_rates(native, size, reads).values())
    return {"sized": rates}


def _child(spec: dict) -> dict:
    kind = spec.pop("kind")
    if kind == "bandwidth":
        return measure_bandwidth(**spec)
    if kind == "sized":
        return measure_sized_reads(**spec)
    if kind == "llamacpp":
        return measure_llamacpp(Path(spec.pop("path")), **spec)
    from .memory import keep_freed_memory

    keep_freed_memory()  # as the `babyllama` command runs
    return measure(Path(spec.pop("path")), **spec)


# ---------------------------------------------------------------------------------- the table (parent)


def compiler_description(cc: str) -> str:
    """The compiler's version line, with the options a $CC of several words adds (CC="gcc -m64")."""
    from .kernels_native import cc_command, compiler_version

    words = cc_command(cc)
    options = " ".join(words[1:])
    return (compiler_version(cc) or words[0]) + (f", with {options}" if options else "")


def kernels_description() -> str:
    """Which kernel backend the fast rows use, and with what."""
    from . import kernels

    k = kernels.backend()
    if k.name == "native":
        native = cast("NativeKernels", k)
        amx = ", AMX for prompts" if native.amx() else ""
        return (f"native C ({compiler_description(native.compiler)}, {native.isa()}{amx}, pool of {native.threads()} "
                "threads)")
    why = _why_not_native()
    if k.name == "numba":
        import numba
        return f"numba {numba.__version__} ({why})"
    if why.startswith("BABYLLAMA_"):  # chosen
        return f"NumPy ({why})"
    import importlib.util

    return f"NumPy only ({why}; {'numba did not load' if importlib.util.find_spec('numba') else 'no numba'})"


def _why_not_native() -> str:
    """Why the C kernels are not the backend: a setting, no compiler, or a build or load that failed (whose
    reason was said on stderr)."""
    from . import kernels, kernels_native

    chosen = os.environ.get(kernels.KERNELS_VARIABLE, "").strip()
    if chosen and chosen.lower() != "native":
        return f"{kernels.KERNELS_VARIABLE}={chosen}"
    if kernels_native.switched_off():
        return "BABYLLAMA_NATIVE=0"
    if kernels_native.compiler() is None:
        return "no C compiler"
    return "the C kernels did not build or load: see the line above"


def describe_machine() -> str:
    import numpy as np

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nb = kernels_description()
    blas = ""
    try:
        cfg = np.show_config(mode="dicts")
        blas = " " + cfg["Build Dependencies"]["blas"]["name"] + " " + cfg["Build Dependencies"]["blas"]["version"]
    except Exception:  # noqa: BLE001 - older numpy: no dict mode; the description is informative only
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    # the environment bench started in (not what babyllama set since); each row's own thread setting is in its row
    threads = ", ".join(f"{k}={v}" for k, v in STARTING_ENVIRONMENT.items())
    return (f"{cpu}, {os.cpu_count()} logical CPUs; Python {platform.python_version()}, NumPy {np.__version__}"
            f"{blas}; kernels: {nb}; thread variables at start: {threads or 'none set'}; load average at start "
            f"{' '.join(f'{x:.2f}' for x in load)}")


@dataclass
class Row:
    """One table row: a model (shape, format) on one engine with one thread setting."""

    shape: str
    fmt: str
    engine: str  # "babyllama", "plain NumPy", "run.c", "runq.c", "llama.cpp", "babyllama --device cuda", ...
    threads: str = "default"
    result: dict = field(default_factory=dict)
    error: str | None = None  # a failed measurement, in one line

    @property
    def is_ours(self) -> bool:
        """babyllama on the model's own file (the rows the references are compared with)."""
        return self.engine.startswith("babyllama") and not self.on_gguf

    @property
    def is_plain(self) -> bool:
        """The plain NumPy baseline (its label grows with the run's flags, --kv-cache among them)."""
        return self.engine.startswith("plain NumPy")

    @property
    def on_gguf(self) -> bool:
        """babyllama on the GGUF file llama.cpp reads."""
        return self.engine.startswith(GGUF_ENGINE)


def cpu_ticks(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(stolen, total) CPU time of all CPUs since boot, in ticks, from Linux's /proc/stat: stolen is time a
    virtual machine's host ran other work while this machine's CPUs wanted to run. None where it cannot be read."""
    try:
        with open(path) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu" or not all(x.isdigit() for x in fields[1:9]):
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest: in user)
    return ticks[7], sum(ticks)


def stolen_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of CPU time stolen between two cpu_ticks() readings (None without both, or no time between)."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


class StealMeter:
    """Measures the CPU time a VM's host took while a row was measured (`share`, None where unknown): a host
    that runs other work on this machine's CPUs slows a row as a co-runner would, and nothing inside the
    machine shows it but this."""

    def __enter__(self) -> StealMeter:
        self.share: float | None = None
        self.start = cpu_ticks()
        return self

    def __exit__(self, *exc) -> None:
        self.share = stolen_share(self.start, cpu_ticks())

    def record(self, row: Row) -> None:
        """Keep the share in the row's result, as the round's figure beside its speed."""
        if self.share is not None and row.result:
            row.result["steal"] = self.share


def _thread_env(setting: str) -> dict:
    """The environment for one thread setting: "default" drops every thread variable, N sets them all to N."""
    from .threads import BLAS_VARS

    env = {k: v for k, v in os.environ.items() if k not in (*BLAS_VARS, "NUMBA_NUM_THREADS")}
    if setting != "default":
        env.update({k: setting for k in (*BLAS_VARS, "NUMBA_NUM_THREADS")})
    return env


def _run_child(spec: dict, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "babyllama.bench", "--child", json.dumps(spec)], capture_output=True,
                         text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(child_failure(out.returncode, out.stderr))
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_failure(returncode: int, output: str) -> str:
    """Why a measuring process failed, in one line: the last line of its `output` (an error's), or the signal that
    killed it (a crash inside a native library prints no error: its last line is whatever it logged before, named
    as such)."""
    lines = output.strip().splitlines()
    if returncode >= 0:
        return lines[-1][:200] if lines else f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}" + (f" (the last line it printed: {lines[-1][:160]})" if lines else "")


def llamacpp_trial(path: Path) -> None:
    """llama.cpp decoding a few tokens of `path` in a child process: RuntimeError saying why where it cannot (some
    builds of llama-cpp-python crash on some CPUs, which in the caller's process would end it without a word)."""
    try:
        _run_child({"kind": "llamacpp", "path": str(path), "repeats": 1, "tokens": 8, "threads": None,
                    "prompt_len": 8})
    except RuntimeError as e:
        raise RuntimeError(llamacpp_failure(str(e))) from None


def llamacpp_failure(reason: str) -> str:
    """Why llama.cpp failed, with the known cause where its process crashed on a CPU with AMX: PyPI's
    llama-cpp-python builds llama.cpp for the CPU it is installed on, and on Sapphire Rapids-class Xeons its AMX
    products segfault (ggml-org/llama.cpp#20824)."""
    from .kernels_native import cpu_flags

    if reason.startswith("killed by") and "amx_int8" in (cpu_flags() or set()):
        return (f"{reason}; llama.cpp's AMX products crash on some Xeons: build llama-cpp-python without them "
                "(docs/speed.md, How to measure)")
    return reason


REFERENCE_TIMEOUT = 600.0  # seconds one reference run may take: far above the seconds 110M fp32 takes for 256 tokens


def reference_decode(exe: str, model: Path, tokenizer: Path, tokens: int, repeats: int,
                     env: dict | None = None) -> float:
    """Median "achieved tok/s" of llama2.c's run.c/runq.c (or a program with their command line) decoding
    `tokens` positions greedily after a one-letter prompt, with `tokenizer` (runs as median_of_runs makes
    them); RuntimeError with the program's last line when it fails."""
    def decode() -> float:
        cmd = [exe, str(model), "-z", str(tokenizer), "-n", str(tokens), "-t", "0", "-i", "a"]
        try:  # a program that waits for input or hangs would stop the whole benchmark
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, errors="replace",
                                 stdin=subprocess.DEVNULL, timeout=REFERENCE_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"it ran past {REFERENCE_TIMEOUT:.0f} s and was stopped") from None
        found = [line for line in out.stderr.splitlines() if line.startswith("achieved tok/s:")]
        if out.returncode != 0:
            raise RuntimeError(child_failure(out.returncode, out.stderr if out.stderr.strip() else out.stdout))
        if not found:  # its last line would read as the reason it failed, when it only ran
            raise RuntimeError("it printed no 'achieved tok/s:' line on stderr, as llama2.c's run.c does")
        value = found[-1].split(":", 1)[1].strip()
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not (math.isfinite(rate) and rate > 0):  # a figure the table would print as if measured
            raise RuntimeError(f"its 'achieved tok/s:' line gives {value[:40]!r}, not a speed")
        return rate

    return median_of_runs(decode, repeats)


@dataclass
class Plan:
    """What one `bench` run measures."""

    shapes: list[str]
    formats: tuple[str, ...] = tuple(FORMATS)
    repeats: int = 1  # runs per figure in one process, at least (median_of_runs)
    tokens: int = 256
    batch: int = 8
    prompt_len: int = 256
    paths: tuple[str, ...] = PATHS
    plain_tokens: int = 32
    plain_repeats: int = 1
    references: dict[str, str] = field(default_factory=dict)  # "run.c"/"runq.c" -> executable
    llamacpp: bool = False
    mmap: bool | None = None  # None: formats.load's default (read small files, map large ones)
    device: str = "numpy"
    compile: bool = False
    thread_settings: tuple[str, ...] = ("default",)
    busy: int = 0
    bandwidth_mib: int = 512
    kv_cache: str = "auto"  # the NumPy engine's KV cache type (config.KV_CACHE_TYPES)
    rounds: int = 3  # times each model's rows are measured in turn (the plain baseline once)
    gguf: bool = False  # also babyllama on the GGUF files of the quantized formats (GGUF_FORMATS)


class Busy:
    """N co-runner processes spinning on the CPU while the measurements run (a busy laptop)."""

    def __init__(self, n: int):
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Busy:
        self.procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE, str(os.getpid())], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL)  # (a Ctrl-C before the line above: no traceback)
                      for _ in range(self.n)]
        for p in self.procs:  # Popen returns before the interpreter has even started: measure once they spin
            assert p.stdout is not None
            p.stdout.read(1)
            p.stdout.close()
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
            p.wait()


def startup(repeats: int = 5) -> dict:
    """Wall milliseconds (medians) of a whole `babyllama run` process with the built-in model and 2 positions
    (interpreter, imports, loading, the first tokens), after one unmeasured run that compiles and caches the
    kernels if needed; beside a bare interpreter's start."""
    def wall(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return 1000 * (time.perf_counter() - start)

    run_cmd = [sys.executable, "-m", "babyllama", "run", "-n", "2", "-t", "0"]
    wall(run_cmd)
    return {"run_ms": _median([wall(run_cmd) for _ in range(repeats)]),
            "python_ms": _median([wall([sys.executable, "-c", "pass"]) for _ in range(repeats)])}


def run(plan: Plan, directory: Path, log=print) -> tuple[list[Row], dict]:
    """Measure every row of `plan`: (rows, bandwidth). The bandwidth is measured first, before any co-runner
    starts, and without co-runners again before each shape's rows (bandwidth["shapes"]): a VM's bandwidth
    drifts over minutes, and each decode figure is compared with the one measured beside it. On a PyTorch
    device (cpu, cuda) only fp32 files are measured and there is no plain row."""
    def probe() -> dict:
        return _bandwidth_probe(plan)

    bandwidth = {} if plan.device != "numpy" else probe()
    formats = plan.formats if plan.device == "numpy" else ("fp32",)
    paths = plan.paths if plan.device == "numpy" else ("fast",)
    rows: list[Row] = []
    with Busy(plan.busy):
        for shape in plan.shapes:
            rounds, probes = [], []
            for n in range(plan.rounds):
                if bandwidth.get("gbps") and not plan.busy:
                    beside = probe().get("gbps")
                    if beside:
                        probes.append(beside)
                if plan.rounds > 1:
                    log(f"round {n + 1} of {plan.rounds}")
                rounds.append(_shape_rows(plan, shape, formats, paths, n == 0, directory, log))
            if probes:
                bandwidth.setdefault("shapes", {})[shape] = _median(probes)
            merged = merge_rounds(rounds)
            if probes:
                bandwidth.setdefault("sized", {}).update(_sized_probe(plan, merged))
            rows += merged
    return rows, bandwidth


def token_bytes(result: dict) -> int:
    """The bytes a row's decode reads per token: its weights, and its KV cache at the run's average position."""
    return int(result.get("decode_bytes", 0) + result.get("kv_bytes", 0))


def _sized_probe(plan: Plan, rows: list[Row]) -> dict:
    """Reads of each measured row's bytes per token (measure_sized_reads), with the first thread setting's
    environment as the bandwidth probe: {str(bytes): GB/s}."""
    sizes = sorted({token_bytes(r.result) for r in rows if not r.error and r.result.get("decode_bytes")})
    if not sizes:
        return {}
    try:
        return _run_child({"kind": "sized", "sizes": sizes}, _thread_env(plan.thread_settings[0])).get("sized", {})
    except RuntimeError:  # no memory for a size: those rows show the bandwidth's share alone
        return {}


def _bandwidth_probe(plan: Plan) -> dict:
    """The memory bandwidth, read with the first thread setting's environment (the rows' own, not whatever the
    parent's environment holds); the setting is named in the table's header."""
    setting = plan.thread_settings[0]
    try:
        result = _run_child({"kind": "bandwidth", "mib": plan.bandwidth_mib}, _thread_env(setting))
    except RuntimeError as e:  # its child failed (no memory for --bandwidth-mib): every figure's yardstick
        raise BabyLlamaError(f"the memory-bandwidth probe ({plan.bandwidth_mib} MiB) failed: {first_line(e)[:200]}"
                             " (a smaller --bandwidth-mib fits)") from None
    return {**result, "setting": setting} if result else result


def _shape_rows(plan: Plan, shape: str, formats, paths, first: bool, directory: Path, log) -> list[Row]:
    """One round of a model's rows: each format and thread setting, the references beside ours."""
    rows: list[Row] = []
    for fmt in formats:
        for setting in plan.thread_settings:
            env = _thread_env(setting)
            rows += _references(plan, shape, fmt, setting, env, directory, log)
            for path_name in paths if fmt not in GGUF_ONLY_FORMATS else ():
                if path_name == "plain" and (setting != plan.thread_settings[0] or not first):
                    continue  # the reference path is single-threaded NumPy and slow: measured once
                rows.append(_ours(plan, shape, fmt, setting, path_name, env, directory, log))
            if plan.gguf and fmt in GGUF_FORMATS or fmt in GGUF_ONLY_FORMATS:
                rows.append(_ours(plan, shape, fmt, setting, "fast", env, directory, log, gguf=True))
    return rows


def merge_rounds(rounds: list[list[Row]]) -> list[Row]:
    """One row per (model, engine, thread setting) over the rounds that measured it, in the first round's order:
    the median of each figure (runs: their total), or the first failure where a round failed."""
    by_key: dict[tuple, list[Row]] = {}
    for measured in rounds:
        for r in measured:
            by_key.setdefault((r.shape, r.fmt, r.engine, r.threads), []).append(r)
    shares, q4_over_q8 = default_shares(rounds), q4_shares(rounds)
    merged = []
    for (shape, fmt, engine, threads), seen in by_key.items():
        row = Row(shape, fmt, engine, threads)
        failures = [r.error for r in seen if r.error]
        if failures:
            row.error = failures[0]
        else:
            row.result = {key: _merged_figure(key, [r.result.get(key) for r in seen]) for key in seen[0].result}
            row.result["rounds"] = len(seen)
            steals = [r.result["steal"] for r in seen if "steal" in r.result]
            if steals:
                row.result["steals"] = steals
            if threads == "default" and (shape, fmt, engine) in shares:
                row.result["default_shares"] = shares[(shape, fmt, engine)]
            if fmt == "q4_0" and (shape, engine, threads) in q4_over_q8:
                row.result["q4_shares"] = q4_over_q8[(shape, engine, threads)]
        merged.append(row)
    return merged


def default_shares(rounds: list[list[Row]]) -> dict[tuple, list[float]]:
    """Per (model, format, engine), round by round: the default thread setting's decode speed over the fastest
    explicit setting's in the same round (rows measured seconds apart, where the rounds lie minutes apart)."""
    shares: dict[tuple, list[float]] = {}
    for measured in rounds:
        speeds: dict[tuple, dict[str, float]] = {}
        for r in measured:
            if not r.error and r.result.get("decode"):
                speeds.setdefault((r.shape, r.fmt, r.engine), {})[r.threads] = r.result["decode"]
        for key, by_setting in speeds.items():
            explicit = [v for t, v in by_setting.items() if t != "default"]
            if "default" in by_setting and explicit:
                shares.setdefault(key, []).append(by_setting["default"] / max(explicit))
    return shares


def q4_shares(rounds: list[list[Row]]) -> dict[tuple, list[float]]:
    """Per (model, engine, thread setting), round by round: Q4_0's decode speed over Q8_0's in the same round
    (rows seconds apart, where the rounds lie minutes apart and a VM's speed moves between them)."""
    shares: dict[tuple, list[float]] = {}
    for measured in rounds:
        speeds = {(r.shape, r.engine, r.threads, r.fmt): r.result["decode"] for r in measured
                  if not r.error and r.result.get("decode")}
        for (shape, engine, threads, fmt), speed in speeds.items():
            q8 = speeds.get((shape, engine, threads, "q8_0"))
            if fmt == "q4_0" and q8:
                shares.setdefault((shape, engine, threads), []).append(speed / q8)
    return shares


def _merged_figure(key: str, values: list) -> Any:
    """One result entry over the rounds: runs add up, figures take their median, anything else the first's."""
    if key == "repeats":
        return sum(values)
    if all(isinstance(v, (int, float)) for v in values):
        return _median(values)
    return values[0]


def _ours(plan: Plan, shape: str, fmt: str, setting: str, path_name: str, env: dict, directory: Path, log,
          gguf: bool = False) -> Row:
    """babyllama's row on the model's file (`gguf`: on the GGUF file llama.cpp reads, always mapped)."""
    # the plain baseline always maps the file; a GGUF file is always mapped (--mmap applies to .bin files only)
    mmap = None if gguf else True if path_name == "plain" else plan.mmap
    flag = {None: "", True: " --mmap", False: " --no-mmap"}[mmap]
    engine = "plain NumPy" if path_name == "plain" else (GGUF_ENGINE if gguf else "babyllama") + flag
    if plan.device != "numpy":
        engine += f" --device {plan.device}" + (" --compile" if plan.compile else "")
    if plan.kv_cache != "auto":
        engine += f" --kv-cache {plan.kv_cache}"
    row = Row(shape, fmt, engine, "1" if path_name == "plain" else setting)
    if path_name == "plain":  # the single-threaded reference path: BLAS (its only threads) held to one
        env = _thread_env("1")
    fast = path_name == "fast"
    try:
        path = gguf_file(shape, fmt, directory) if gguf else model_file(shape, fmt, directory)
    except (BabyLlamaError, OSError) as e:  # the rows already measured are still reported
        row.error = f"its model file could not be built: {e}"
        return row
    spec = {"kind": "ours", "path": str(path), "plain": not fast,
            "repeats": plan.repeats if fast else plan.plain_repeats,
            "tokens": plan.tokens if fast else min(plan.tokens, plan.plain_tokens), "batch": plan.batch,
            "prompt_len": plan.prompt_len, "mmap": mmap, "device": plan.device, "compile": plan.compile,
            "sampled": shape == BUILTIN, "kv_cache": plan.kv_cache}
    log(f"measuring {shape} {fmt} {engine} (threads {row.threads}) ...")
    try:
        with StealMeter() as stolen:
            row.result = _run_child(spec, env)
        stolen.record(row)
    except RuntimeError as e:
        row.error = str(e)
    return row


def _references(plan: Plan, shape: str, fmt: str, setting: str, env: dict, directory: Path, log) -> list[Row]:
    from . import formats

    rows = []
    for name, exe in plan.references.items():
        ref_fmt, version = REFERENCES[name]
        if ref_fmt != fmt:
            continue
        row = Row(shape, fmt, name, setting)
        log(f"measuring {shape} {fmt} {name} ({exe}, threads {setting}) ...")
        try:
            model = model_file(shape, fmt, directory, version)
            tokenizer = tokenizer_file(shape, directory)
            with StealMeter() as stolen:
                speed = reference_decode(exe, model, tokenizer, plan.tokens, plan.repeats, env)
            weights = formats.load(model)  # run.c and runq.c keep their KV cache in fp32
            row.result = {"decode": speed, "decode_bytes": decode_bytes(weights),
                          "kv_bytes": kv_read_bytes(weights.args, 4, plan.tokens)}
            stolen.record(row)
        except (RuntimeError, OSError, BabyLlamaError) as e:  # BabyLlamaError: its model file not written
            row.error = f"{name} ({exe}) failed: {e}"
        rows.append(row)
    if plan.llamacpp and fmt in GGUF_TYPES:
        row = Row(shape, fmt, "llama.cpp", setting)
        log(f"measuring {shape} {fmt} llama.cpp (threads {setting}) ...")
        try:
            spec = {"kind": "llamacpp", "path": str(gguf_file(shape, fmt, directory)), "repeats": plan.repeats,
                    "tokens": plan.tokens, "threads": None if setting == "default" else int(setting),
                    "prompt_len": plan.prompt_len}
            with StealMeter() as stolen:
                row.result = _run_child(spec, env)
            stolen.record(row)
        except (RuntimeError, OSError, BabyLlamaError) as e:
            row.error = f"llama.cpp failed: {llamacpp_failure(str(e))}"
        rows.append(row)
    return rows


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[Row], batch: int, prompt_len: int, bandwidth: dict | None = None) -> str:
    """The rows as a markdown table, the bandwidth line above it and the notes and ratios below."""
    lines = []
    bw = (bandwidth or {}).get("gbps")
    beside = (bandwidth or {}).get("shapes") or {}
    if bw:
        assert bandwidth is not None  # bw came from it
        where = ("; beside each model's rows: " + ", ".join(f"{k} {v:.1f}" for k, v in beside.items()) +
                 " GB/s (each row's % is of its model's figure)") if beside else ""
        setting = bandwidth.get("setting", "default")
        rates = bandwidth.get("streams") or {}
        streams = (", each 64 KiB as " + ", ".join(f"{k} stream{'s' * (k != '1')} {v:.1f}" for k, v in rates.items())
                   + " GB/s, the faster") if rates else ""
        threads = bandwidth["threads"]
        lines.append(f"Memory bandwidth (this run, thread setting {setting}: {threads} thread{'s' * (threads != 1)} "
                     f"reading {bandwidth['mib']} MiB{streams}): "
                     f"**{bw:.1f} GB/s** at the start{where}\n")
    sized = (bandwidth or {}).get("sized") or {}
    share_head = "% of bandwidth / of a same-size read" if sized else "% of bandwidth"
    head = (f"| model | weights | engine | threads | decode tok/s | decode GB/s ({share_head}) | sampled tok/s "
            f"| prefill tok/s | B={batch} decode tok/s | TTFT ms | peak RSS MiB |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    errors = []
    for r in rows:
        res = r.result
        if r.error:
            errors.append(f"{r.shape} {FORMAT_LABELS[r.fmt]} {r.engine}: {r.error}")
            lines.append(f"| {r.shape} | {FORMAT_LABELS[r.fmt]} | {r.engine} | {r.threads} | failed (see below) |"
                         + " – |" * 6)
            continue
        decode = res.get("decode")
        read = token_bytes(res)
        gbps = decode * read / 1e9 if decode and res.get("decode_bytes") else None
        limits = [x for x in (beside.get(r.shape, bw), sized.get(str(read))) if x]
        share = (f"{gbps:.1f} (" + " / ".join(f"{100 * gbps / x:.0f}%" for x in limits) + ")" if gbps and limits
                 else _cell(gbps, ".1f"))
        lines.append(f"| {r.shape} | {FORMAT_LABELS[r.fmt]} | {r.engine} | {r.threads} | {_cell(decode, '.1f')} | "
                     f"{share} | {_cell(res.get('sampled'), '.1f')} | {_cell(res.get('prefill'), '.0f')} | "
                     f"{_cell(res.get('batch'), '.1f')} | {_cell(res.get('ttft_ms'), '.0f')} | "
                     f"{_cell(res.get('rss_mib'), '.0f')} |")
    plain = [r for r in rows if r.is_plain and r.result]
    plain_note = (f" (plain rows: {plain[0].result['decode_tokens']} tokens, {plain[0].result['repeats']} "
                  "run(s), the reference path being slow)" if plain else "")
    rounds = max((r.result.get("rounds", 1) for r in rows if r.result and not r.is_plain), default=1)
    rounds_note = (f"Each figure: the median of {rounds} rounds, a model's rows measured in turn in each, of "
                   f"the median of runs lasting at least {MIN_SECONDS:g} s in all. " if rounds > 1 else "")
    notes = (f"{rounds_note}decode: greedy, one sequence, tokens after the first{plain_note}; GB/s: bytes read per "
             "token (the weights, and the KV cache at the run's average position) x decode tok/s; sampled: -t 1 -p 0.9 "
             f"(trained model only); prefill: one {prompt_len}-token prompt in "
             f"one forward pass; B={batch}: aggregate tok/s of {batch} sequences decoded together; TTFT: load + "
             f"engine set-up + {min(TTFT_PROMPT, prompt_len)}-token prompt + first token, in process. threads: "
             "default (the pool decides), "
             "or N set explicitly (--thread-settings, --threads or OMP_NUM_THREADS; the plain rows: 1). "
             "KV cache: f16 for Q8_0/Q4_0 weights, f32 for fp32, "
             "F16 and BF16, unless the engine column names --kv-cache.")
    if sized:
        notes += (" same-size read: every kernel thread reading a buffer of the row's bytes per token again and "
                  "again, measured after the model's rounds: where those bytes stay in a cache between tokens, "
                  "decode reads them from there, passing the memory's bandwidth, and this share is the one "
                  "that tells how near the reads' limit it is.")
    text = "\n".join(lines) + "\n\n" + notes + "\n"
    ratios = _ratios(rows)
    if ratios:
        text += "\n" + ratios + "\n"
    steal = _steal_note(rows)
    if steal:
        text += "\n" + steal + "\n"
    if errors:
        text += "\nFailed:\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    return text


STEAL_NOTED = 0.05  # rounds with less stolen CPU time than this are not named (calm VMs' hosts take 0-3%)


def _steal_note(rows: list[Row]) -> str:
    """The CPU time a VM's host took while the rows ran (StealMeter), round by round for the rows where it
    reached STEAL_NOTED in some round: those rounds ran on less CPU than the others. Empty where not measured."""
    steals = [(r, r.result.get("steals") or ([r.result["steal"]] if "steal" in r.result else [])) for r in rows
              if r.result]
    measured = [x for _, values in steals for x in values]
    if not measured:
        return ""
    head = "Hypervisor steal (/proc/stat: CPU time this machine's host gave to other work) while the rows ran"
    hit = [f"{r.shape} {FORMAT_LABELS[r.fmt]} {r.engine}" + ("" if r.threads == "default" else f" ({r.threads}t)")
           + " " + ", ".join(f"{100 * x:.0f}" for x in values) + "%"
           for r, values in steals if max(values, default=0) >= STEAL_NOTED]
    if not hit:
        return f"{head}: under {100 * STEAL_NOTED:.0f}% in every round (at most {100 * max(measured):.1f}%)."
    return (f"{head}, round by round where it reached {100 * STEAL_NOTED:.0f}%: " + "; ".join(hit) + ". Those "
            "rounds ran on less CPU than the rest, as beside a co-runner: compare rows within a round, or measure "
            "again.")


def _ratios(rows: list[Row]) -> str:
    """babyllama's decode speed over each reference's, per model, format and thread setting (and its prefill
    speed, where the reference measured one: llama.cpp); and its Q4_0
    decode over its Q8_0 decode, beside how many times fewer bytes Q4_0 reads, its weights alone and with the
    KV cache (the most it could gain where decode is bound by reading them)."""
    ours = {(r.shape, r.fmt, r.threads): r.result for r in rows if r.is_ours and r.result.get("decode")}
    lines = [f"{what} speed of babyllama / reference: " + "; ".join(parts)
             for what in ("decode", "prefill") if (parts := _versus(rows, ours, what))]
    on_gguf = {(r.shape, r.fmt, r.threads): r.result for r in rows if r.on_gguf and r.result.get("decode")}
    lines += [f"{what} speed of babyllama / llama.cpp on the same GGUF file: " + "; ".join(parts)
              for what in ("decode", "prefill")
              if (parts := _versus([r for r in rows if r.engine == "llama.cpp"], on_gguf, what))]
    shares = [f"{r.shape} {FORMAT_LABELS[r.fmt]} {100 * _median(r.result['default_shares']):.0f}% "
              f"({100 * min(r.result['default_shares']):.0f}–{100 * max(r.result['default_shares']):.0f}%)"
              for r in rows if r.is_ours and r.result.get("default_shares")]
    if shares:
        lines.append("babyllama's default threads / the faster explicit setting, round by round (median, lowest–"
                     "highest): " + "; ".join(shares))
    q4 = [f"{shape} {ours[(shape, 'q4_0', t)]['decode'] / ours[(shape, 'q8_0', t)]['decode']:.2f}x"
          + ("" if t == "default" else f" ({t}t)") + _spread(ours[(shape, "q4_0", t)].get("q4_shares", []))
          + f" (weight bytes {_fewer(ours, shape, t, 'decode_bytes'):.2f}x fewer, with the KV cache "
          f"{_fewer(ours, shape, t, 'decode_bytes', 'kv_bytes'):.2f}x)"
          for shape, fmt, t in ours if fmt == "q4_0" and (shape, "q8_0", t) in ours]
    if q4:
        lines.append("babyllama Q4_0 / Q8_0 decode: " + "; ".join(q4))
    return "\n".join(lines)


def _spread(per_round: list[float]) -> str:
    """', round by round lo–hi x' for ratios taken in each of several rounds; nothing for one round or none."""
    return f", round by round {min(per_round):.2f}–{max(per_round):.2f}x" if len(per_round) > 1 else ""


def _versus(rows: list[Row], ours: dict, key: str) -> list[str]:
    """babyllama's figure `key` over each reference row's, where both measured it: 'shape format vs engine Nx'."""
    return [f"{r.shape} {FORMAT_LABELS[r.fmt]} vs {r.engine}" + ("" if r.threads == "default" else f" ({r.threads}t)")
            + f" {ours[(r.shape, r.fmt, r.threads)][key] / r.result[key]:.2f}x" for r in rows
            if not r.is_ours and not r.on_gguf and not r.is_plain and r.result.get(key)
            and ours.get((r.shape, r.fmt, r.threads), {}).get(key)]


def _fewer(ours: dict, shape: str, threads: str, *keys: str) -> float:
    """How many times fewer of the bytes `keys` add up to Q4_0's decode step reads than Q8_0's."""
    q8, q4 = ours[(shape, "q8_0", threads)], ours[(shape, "q4_0", threads)]
    return sum(q8.get(k, 0) for k in keys) / sum(q4.get(k, 0) for k in keys)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(_child(json.loads(sys.argv[2]))))
