"""Whole greedy decodes of one model with the int8 rows' software prefetch distances taking turns in one process
(csrc/kernels.c's kernel_prefetch_bytes sets them between decodes): what a distance is worth for a model whose
weights stream from memory, or stay in the last-level cache, without the drift between processes and between a
VM's phases that separate runs compare as much as the distances.

    python benchmarks/prefetch_distances.py MODEL [--distances 0,2048,6144] [--rounds 9] [--tokens 256]

Each round decodes --tokens positions once per distance (set for cached and streaming weights alike); prints the
distance a decode step of the model takes by default, the CPU's two distances and its last-level cache's size, then
per distance the median tok/s over the rounds and each round's.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys

from babyllama import kernels_native
from babyllama.api import make_engine
from babyllama.bench import decode_rate
from babyllama.errors import BabyLlamaError
from babyllama.loading import open_model

MAX_DISTANCE = 1 << 20  # bytes: far past any useful distance, and what the hook's callers never need


def distances(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated byte counts, got {text!r}") from None
    if not all(0 <= v <= MAX_DISTANCE for v in values):
        raise argparse.ArgumentTypeError(f"distances lie in [0, {MAX_DISTANCE}] bytes, got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a model file babyllama reads (.bin, GGUF)")
    ap.add_argument("--distances", type=distances, default=[0, 2048, 6144], help="bytes ahead, comma-separated")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    if args.rounds < 1 or args.tokens < 2:
        ap.error("--rounds must be from 1 and --tokens from 2")
    native = kernels_native.load()
    if native is None:
        sys.exit("prefetch_distances.py: error: the C kernels are not available here (see `babyllama bench`'s "
                 "machine line)")
    try:
        weights = open_model(args.model).weights
    except BabyLlamaError as e:
        sys.exit(f"prefetch_distances.py: error: {e}")
    if args.tokens > weights.args.max_seq_len - 2:
        ap.error(f"--tokens {args.tokens} is past the model's context ({weights.args.max_seq_len})")
    lib = native.lib
    lib.kernel_prefetch_bytes.restype = ctypes.c_int64
    lib.kernel_prefetch_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.kernel_step_prefetch.restype = ctypes.c_int64
    lib.kernel_step_prefetch.argtypes = [ctypes.c_void_p]
    engine = make_engine(weights, "numpy", False, False, "auto")
    seq_len = weights.args.max_seq_len
    decode_rate(engine, seq_len, 1, 16)  # the first steps build the plan and warm the caches
    plan = native.step_plan(weights, engine.cos, engine.sin)  # only its sizes are read
    lib.kernel_llc_bytes.restype = ctypes.c_int64
    step, llc = lib.kernel_step_prefetch(ctypes.addressof(plan.struct)), lib.kernel_llc_bytes()
    print(f"{native.isa()}: a decode step of this model prefetches {step} bytes ahead by default (for weights in the "
          f"cache {lib.kernel_prefetch_bytes(1, -1)}, from memory {lib.kernel_prefetch_bytes(0, -1)}; last-level "
          f"cache {llc >> 20} MiB{'' if llc else ': not known here'})")
    rates: dict[int, list[float]] = {d: [] for d in args.distances}
    for _ in range(args.rounds):
        for d in args.distances:
            lib.kernel_prefetch_bytes(0, d)  # weights from memory
            lib.kernel_prefetch_bytes(1, d)  # and from the cache
            rates[d].append(decode_rate(engine, seq_len, 1, args.tokens))
    for d, r in rates.items():
        print(f"{d:7d} bytes: {statistics.median(r):9.1f} tok/s (rounds: {' '.join(f'{x:.1f}' for x in r)})")


if __name__ == "__main__":
    main()
