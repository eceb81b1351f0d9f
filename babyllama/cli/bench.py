"""`babyllama bench`: speed of random models of the tinyllamas shapes."""

from __future__ import annotations

import os

from ..errors import BabyLlamaError
from .common import add_compile, add_threads


def add(sub) -> None:
    p = sub.add_parser("bench", help="measure decode/prefill/batched speed on random models of the "
                                     "tinyllamas shapes, against the plain NumPy baseline")
    p.add_argument("--shapes", default="15M,42M,110M",
                   help="comma-separated, of 15M, 42M, 110M, 1B (TinyLlama's shape, for GPUs); default %(default)s")
    p.add_argument("--device", default="numpy",
                   help="numpy (the NumPy engine), or cpu / cuda for the PyTorch engine (fp32 files only)")
    add_compile(p)
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported (3)")
    p.add_argument("--tokens", type=int, default=256, help="tokens decoded per run (256)")
    p.add_argument("--plain-tokens", type=int, default=32,
                   help="tokens decoded per run on the slow plain baseline (32)")
    p.add_argument("--plain-repeats", type=int, default=1, help="runs per figure on the plain baseline (1)")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (8)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt length for prefill (256)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain NumPy baseline rows")
    p.add_argument("--no-mmap", action="store_true", help="babyllama rows read the weights into memory (run --no-mmap)")
    p.add_argument("--cache-dir", default=None, help="where random models are cached "
                                                     "(~/.cache/babyllama/bench, or $BABYLLAMA_BENCH_DIR)")
    p.add_argument("--output", default=None, help="also write the table (markdown) to this file")
    p.add_argument("--reference", default=None, metavar="EXE",
                   help="also time a llama2.c-style executable (run.c/runq.c, or benchmarks/llama2c_ref) on the "
                        "same model files: `EXE MODEL -n TOKENS -i 3`, reading its 'achieved tok/s' line")
    add_threads(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .. import bench

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in bench.SHAPES]
    if unknown or not shapes:
        raise BabyLlamaError(f"unknown shape(s) {', '.join(unknown) or '(none)'}; choose from "
                             f"{', '.join(bench.SHAPES)}")
    for name in ("repeats", "tokens", "plain_tokens", "plain_repeats", "batch", "prompt_len"):
        if getattr(args, name) < 1:
            raise BabyLlamaError(f"--{name.replace('_', '-')} must be >= 1")
    machine = bench.describe_machine()
    paths = ("fast",) if args.no_plain else bench.PATHS
    if args.reference and not (os.path.isfile(args.reference) and os.access(args.reference, os.X_OK)):
        raise BabyLlamaError(f"--reference {args.reference}: not an executable file")
    from ..api import check_device
    check_device(args.device, args.compile)  # here, as one line, rather than in a child process
    rows = bench.run(shapes, args.repeats, args.tokens, args.batch, args.prompt_len,
                     bench.cache_dir(args.cache_dir), paths, args.plain_tokens, args.plain_repeats, args.reference,
                     mmap=not args.no_mmap, device=args.device, compile=args.compile)
    text = f"Machine: {machine}\n\n" + bench.table(rows, args.batch, args.prompt_len)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    return 0
