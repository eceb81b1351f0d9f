"""llama.cpp's quantized GGUF files as babyllama runs them: load time, peak RSS beside the file's size, and
greedy decode speed, each in a fresh process: the resident memory after decoding (also as the growth over the
process's after its imports, beside the size of the KV cache, which transparent huge pages may make resident
whole), and the peak (the gguf package's reader holds the file's metadata, vocabulary included, as Python
objects while it parses).

    python benchmarks/gguf_files.py [--shape 110M] [--types Q4_0,Q8_0,Q4_K_M,Q6_K] [--tokens 128] [--dir DIR]

The random-weight model of the bench shape is exported as an f32 GGUF (babyllama export) and quantized by
llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize) into each type; Q4_0 and Q8_0 run
memory-mapped as they are, the others are converted on load (see babyllama/interop/gguf.py). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from babyllama.bench import peak_rss_mib

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from babyllama.engine import Engine
from babyllama.generate import generate
from babyllama.interop.gguf import load_gguf
from babyllama.sampler import Sampler
baseline = rss_mib()
notes = []
w, _ = load_gguf(sys.argv[1], keep_quantized=True, notes=notes)
engine = Engine(w)
loaded = time.perf_counter() - t0
n = int(sys.argv[2])
gen = generate(engine, [1, 3], n, Sampler(0.0), stop_ids=frozenset())
next(gen)
start = time.perf_counter()
count = sum(1 for _ in gen)
speed = count / (time.perf_counter() - start)
kv_mib = engine.new_cache().k.nbytes * 2 / 2**20
print(json.dumps({"load_s": loaded, "decode": speed, "rss_mib": rss_mib(), "peak_mib": peak_rss_mib(),
                  "baseline_mib": baseline, "kv_cache_mib": kv_mib, "kinds": w.kinds(),
                  "notes": [str(x) for x in notes]}))
"""


HEADER = ("| model | GGUF type | file MiB | runs as | load s | RSS after decoding MiB (over the imports'; the KV "
          "cache's size) | peak RSS MiB | decode tok/s | conversion |")


def quantized_file(directory: Path, shape: str, ftype: str) -> Path:
    """Where llama.cpp's `ftype` file of the shape's model is cached: named like bench's own files of it (the
    built-in model's keyed on its content), so that a retrained model is never measured through an old file, and
    marked as llama.cpp's (bench's own q4_0.gguf differs from llama.cpp's Q4_0 only in case: one file where names
    ignore case)."""
    from babyllama import bench

    return directory / f"{bench.model_stem(shape)}-llamacpp-{ftype}.gguf"


def failed_row(shape: str, ftype: str, reason: str) -> str:
    """A table row for a file that could not be made or run: the reason, and a dash in every other cell."""
    cells = [shape, ftype, "–", f"failed: {reason}"]
    return "| " + " | ".join(cells + ["–"] * (HEADER.count("|") - 1 - len(cells))) + " |"


def check_args(args: argparse.Namespace) -> None:
    """The flags' mistakes, in one line each, before any model is built."""
    from babyllama import bench
    from babyllama.errors import BabyLlamaError

    shapes = [bench.BUILTIN, *bench.SHAPES]
    if args.shape not in shapes:
        raise BabyLlamaError(f"unknown --shape {args.shape}; choose from {', '.join(shapes)}")
    from quality import check_gguf_types

    check_gguf_types(args.types, "--types")
    if args.dir is not None and not args.dir.strip():
        raise BabyLlamaError("--dir is empty: give a folder, or leave --dir out for the bench cache")
    context = bench.context_of(args.shape)
    if not 2 <= args.tokens <= context:  # the first token is not timed: at least one more
        raise BabyLlamaError(f"--tokens must be from 2 to the {args.shape} model's context ({context}), got "
                             f"{args.tokens}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="110M")
    ap.add_argument("--types", default="Q4_0,Q8_0,Q4_K_M,Q6_K")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where the GGUF files go (default: the bench cache)")
    args = ap.parse_args()
    check_args(args)

    from quality import llamacpp_quantize

    from babyllama import bench

    directory = bench.cache_dir(args.dir)
    f32 = bench.gguf_file(args.shape, "fp32", directory)
    print(HEADER)
    print("|" + " --- |" * (HEADER.count("|") - 1))
    failed = 0
    for ftype in [t for t in args.types.split(",") if t]:
        path = quantized_file(directory, args.shape, ftype)
        if not path.exists():
            print(f"quantizing {path.name} with llama.cpp ...", file=sys.stderr, flush=True)
            try:
                llamacpp_quantize(f32, path, ftype)
            except (RuntimeError, AttributeError) as e:  # AttributeError: a type llama-cpp-python does not name
                print(failed_row(args.shape, ftype, str(e)))
                failed += 1
                continue
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.tokens)], capture_output=True,
                             text=True)
        if out.returncode != 0:
            lines = out.stderr.strip().splitlines()
            print(failed_row(args.shape, ftype, lines[-1] if lines else f"exit status {out.returncode}"))
            failed += 1
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rss = f"{r['rss_mib']:.0f} ({r['rss_mib'] - r['baseline_mib']:.0f}; {r['kv_cache_mib']:.0f})"
        print(f"| {args.shape} | {ftype} | {path.stat().st_size / 2**20:.0f} | {r['kinds']} | {r['load_s']:.2f} | "
              f"{rss} | {r['peak_mib']:.0f} | {r['decode']:.1f} | {'; '.join(r['notes']) or '–'} |", flush=True)
    if failed:  # the table stands, the failures in its rows; a script running this learns of them too
        raise BabyLlamaError(f"{failed} row(s) failed")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    from babyllama.errors import BabyLlamaError

    try:
        main()
    except BabyLlamaError as e:
        sys.exit(f"gguf_files.py: error: {e}")
