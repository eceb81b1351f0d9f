"""Whole decode against the memory speed of the moment, on a machine whose memory bandwidth switches between phases
within seconds (a `bench` row then meets several, and its figure and the probe's belong to different phases).

In one process: bench's bandwidth probe (every kernel thread reading 512 MiB), then a greedy decode of --tokens
positions of each format's model (bench's cached random-weight files: FMT a .bin file, FMT.gguf the GGUF file
llama.cpp reads, both on the default engine and threads; llama.cpp:FMT llama.cpp itself on FMT.gguf through
llama-cpp-python, on as many threads), each followed by the probe again, for --seconds. A decode's GB/s is
bench's (weight and KV-cache bytes a step reads times tok/s; llama.cpp's cache counted as f16, its default and
ours for quantized models); it is compared with the probes just before and after it, and counted only where
those two agree within --steady (the phase did not change under it). Prints a line per round, then per format
and phase (fast: the probes at least --fast GB/s, by default halfway between the probes' 10th and 90th
percentiles) the median share of the probe, and the tok/s ratio of each format to the first in rounds whose
every probe was steady and in one phase. BABYLLAMA_NATIVE_ARCH=avx2 times the AVX2 kernels.

    python benchmarks/decode_windows.py [--seconds 600] [--shape 110M] [--formats q8_0,q4_0] > windows.log
    python benchmarks/decode_windows.py --formats q8_0.gguf,q4_0.gguf,llama.cpp:q8_0,llama.cpp:q4_0
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from babyllama import bench, kernels_native
from babyllama.api import make_engine
from babyllama.errors import BabyLlamaError, missing_extra
from babyllama.loading import open_model


def probe(native, buf: np.ndarray, reads: int = 3) -> float:
    """GB/s of every kernel thread reading `buf` (bench.measure_bandwidth's reads: the faster stream count's median
    of `reads`)."""
    return max(bench.read_rates(native, buf, reads).values())


LLAMACPP = "llama.cpp:"  # a format's prefix: llama.cpp decodes the format's GGUF file


def check_args(args: argparse.Namespace) -> None:
    """The flags' mistakes, in one line each, before any model is built."""
    shapes = [bench.BUILTIN, *bench.SHAPES]
    if args.shape not in shapes:
        raise BabyLlamaError(f"unknown --shape {args.shape}; choose from {', '.join(shapes)}")
    for fmt in args.formats.split(","):
        name, dot, ext = fmt.removeprefix(LLAMACPP).partition(".")
        if name not in bench.FORMATS or (dot and (ext != "gguf" or fmt.startswith(LLAMACPP))):
            raise BabyLlamaError(f"unknown format {fmt!r} in --formats; choose from "
                                 f"{', '.join(f'{f}, {f}.gguf, {LLAMACPP}{f}' for f in bench.FORMATS)}")
    if LLAMACPP in args.formats and importlib.util.find_spec("llama_cpp") is None:
        raise missing_extra("the llama.cpp: formats (llama-cpp-python)", "bench")
    context = bench.context_of(args.shape)
    if not 2 <= args.tokens <= context - 2:
        raise BabyLlamaError(f"--tokens must be from 2 to {context - 2} ({args.shape}'s context less its two-token "
                             f"prompt), got {args.tokens}")
    if not 0 < args.steady < 1:
        raise BabyLlamaError(f"--steady must lie between 0 and 1, got {args.steady}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--shape", default="110M")
    ap.add_argument("--formats", default="q8_0,q4_0")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--steady", type=float, default=0.10, help="largest relative gap of the two probes around a decode")
    ap.add_argument("--fast", type=float, default=0.0, help="GB/s from which a probe is the fast phase "
                    "(default: halfway between the probes' 10th and 90th percentiles)")
    a = ap.parse_args()
    check_args(a)

    native = kernels_native.load()
    if native is None:
        raise BabyLlamaError("the native kernels are not built on this machine")
    directory = bench.cache_dir()
    formats = a.formats.split(",")
    models = {fmt: open_format(fmt, a.shape, a.tokens, directory) for fmt in formats}
    buf = np.ones(512 << 20, dtype=np.uint8)
    native.read_memory(buf)

    rounds = []  # per round: [probe, (fmt, tok/s, GB/s, probe after), ...]
    end = time.monotonic() + a.seconds
    while not rounds or time.monotonic() < end:
        before = probe(native, buf)
        line, entry = [f"{time.strftime('%H:%M:%S', time.gmtime())}  probe {before:5.1f}"], [before]
        for fmt in formats:
            decode, step = models[fmt]
            tps = decode()
            after = probe(native, buf)
            entry.append((fmt, tps, tps * step / 1e9, after))
            line.append(f"{fmt} {tps:6.1f} tok/s {tps * step / 1e9:5.1f} GB/s | probe {after:5.1f}")
        rounds.append(entry)
        print(" | ".join(line), flush=True)
    print()
    print("\n".join(summary(rounds, formats, a.steady, a.fast)))


def open_format(fmt: str, shape: str, tokens: int, directory) -> tuple[Callable[[], float], int]:
    """A format's decode (tok/s of a greedy decode of `tokens` positions) and the bytes its step reads, after one
    decode that touches the weights first (not a round)."""
    name, _, ext = fmt.removeprefix(LLAMACPP).partition(".")
    gguf = ext == "gguf" or fmt.startswith(LLAMACPP)
    path = (bench.gguf_file if gguf else bench.model_file)(shape, name, directory)
    weights = open_model(path).weights
    if fmt.startswith(LLAMACPP):
        try:  # first in a child: a llama.cpp that crashes here would end this process without a word
            bench.llamacpp_trial(path)
        except RuntimeError as e:
            raise BabyLlamaError(f"llama.cpp cannot decode {path.name} on this machine: {e}") from None
        llm = bench.open_llamacpp(path, weights.args.max_seq_len, None)
        step = bench.decode_bytes(weights) + bench.kv_read_bytes(weights.args, 2, tokens)
        del weights  # llama.cpp reads the file itself: ours need not stay mapped
        bench.llamacpp_decode_rate(llm, 8)
        return (lambda: bench.llamacpp_decode_rate(llm, tokens)), step
    engine = make_engine(weights)
    seq_len = weights.args.max_seq_len
    step = bench.decode_bytes(weights) + (bench.engine_kv_bytes(engine, weights.args, tokens) or 0)
    bench.decode_rate(engine, seq_len, 1, 8)
    return (lambda: bench.decode_rate(engine, seq_len, 1, tokens)), step


def phase(probes: list[float], steady: float, fast: float) -> str | None:
    """"fast" or "slow" where the probes agree within `steady` (relative to their mean) and lie on one side of
    `fast` GB/s; None where the memory changed phase between them."""
    if max(probes) - min(probes) > steady * statistics.mean(probes):
        return None
    return "fast" if min(probes) >= fast else "slow" if max(probes) < fast else None


def summary(rounds: list, formats: list[str], steady: float, fast: float = 0.0) -> list[str]:
    """The closing lines: the probes' median and fast count; per format and phase, the decodes' GB/s as a share
    of the mean of the probes around each (decodes between steady probes only); per format after the first,
    its tok/s over the first's in rounds whose probes were all steady and in one phase."""
    probes = [r[0] for r in rounds] + [d[3] for r in rounds for d in r[1:]]
    if not fast:  # between the two phases' speeds, whichever the machine spent more of the run in
        deciles = statistics.quantiles(probes, n=10) if len(probes) > 1 else probes * 9
        fast = (deciles[0] + deciles[-1]) / 2
    lines = [f"{len(rounds)} rounds, {len(probes)} probes: median {statistics.median(probes):.1f} GB/s, "
             f"{sum(p >= fast for p in probes)} at or above {fast:.1f} (fast phase)"]
    shares: dict[tuple[str, str], list[float]] = {}
    for r in rounds:
        before = r[0]
        for fmt, _, gbps, after in r[1:]:
            p = phase([before, after], steady, fast)
            if p:
                shares.setdefault((fmt, p), []).append(gbps / ((before + after) / 2))
            before = after
    for fmt in formats:
        for p in ("fast", "slow"):
            xs = shares.get((fmt, p))
            if xs:
                lines.append(f"{fmt} {p}: {len(xs)} decodes between steady probes, "
                             f"{100 * statistics.median(xs):.0f}% of the probe "
                             f"(range {100 * min(xs):.0f}-{100 * max(xs):.0f}%)")
    for fmt in formats[1:]:
        for p in ("fast", "slow"):
            ratios = [d[1] / r[1][1] for r in rounds if phase([r[0]] + [d[3] for d in r[1:]], steady, fast) == p
                      for d in r[1:] if d[0] == fmt]
            if ratios:
                lines.append(f"{fmt} / {formats[0]} tok/s, {p} rounds with steady probes: median "
                             f"{statistics.median(ratios):.2f}x over {len(ratios)} "
                             f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    return lines


if __name__ == "__main__":
    try:
        main()
    except BabyLlamaError as e:
        sys.exit(f"decode_windows.py: error: {e}")
