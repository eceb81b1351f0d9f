"""`babyllama bench`: decode, prefill and batched speed (fp32, Q8_0, Q4_0) beside the plain baseline, llama2.c,
llama.cpp and the memory bandwidth."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil

from ..errors import BabyLlamaError, missing_extra, say
from ..threads import usable_cpus
from .common import add_compile, add_kv_cache, add_mmap, add_threads, non_empty_path, positive_int

DEFAULT_FORMATS = "fp32,q8_0,q4_0"
MAX_BUSY_PER_CPU = 4  # co-runners beyond a few per CPU measure the scheduler, not a busy laptop


def add(sub: argparse._SubParsersAction) -> None:
    about = ("measure decode/prefill/batched speed (fp32, Q8_0, Q4_0) against the plain NumPy baseline, llama2.c "
             "and llama.cpp, with the machine's memory bandwidth")
    p = sub.add_parser("bench", help=about,
                       description=f"{about[0].upper()}{about[1:]}. Random-weight models of the tinyllamas shapes "
                                   "are built once (cached); every row runs in a fresh process, each model's rows "
                                   "--rounds times in turn, and the medians are reported.")
    p.add_argument("--shapes", default="builtin,15M,42M,110M",
                   help="comma-separated, of builtin (the trained built-in model), 15M, 42M, 110M, 1B (TinyLlama's "
                        "shape, for GPUs); default %(default)s")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated weight formats ({DEFAULT_FORMATS}; fp32 with --device cpu or cuda); f16, "
                        "bf16: llama.cpp's F16 or BF16 GGUF file (babyllama on it, and llama.cpp with --llamacpp)")
    p.add_argument("--device", default="numpy",
                   help="numpy (the NumPy engine), or cpu / cuda for the PyTorch engine (fp32 files only)")
    add_compile(p)
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="times each model's rows are measured in turn, each in a fresh process; the median over "
                        "the rounds is reported, so that rows compared with each other are measured close in "
                        "time on a machine whose speed drifts (3)")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="runs per figure within one round's process, at least (more while they last under 1 s "
                        "in all); their median is the round's figure (1)")
    p.add_argument("--tokens", type=positive_int, default=256, help="tokens decoded per run (256)")
    p.add_argument("--plain-tokens", type=positive_int, default=None,
                   help="tokens decoded per run on the slow plain baseline (32, at most --tokens)")
    p.add_argument("--plain-repeats", type=positive_int, default=None,
                   help="runs per figure on the plain baseline, at least, as --repeats (1)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences decoded together (8)")
    p.add_argument("--prompt-len", type=positive_int, default=256, help="prompt length for prefill (256)")
    p.add_argument("--no-plain", action="store_true", help="skip the plain NumPy baseline rows")
    add_mmap(p, "babyllama's .bin rows: ", "GGUF rows map their files as always")
    add_kv_cache(p)
    p.add_argument("--cache-dir", default=None, type=non_empty_path,
                   help="where random models are cached ($BABYLLAMA_BENCH_DIR, else $BABYLLAMA_CACHE/bench or "
                        "~/.cache/babyllama/bench)")
    p.add_argument("--output", default=None, type=non_empty_path,
                   help="also write the table (markdown) to this file")
    p.add_argument("--reference", default=None, metavar="RUN", type=non_empty_path,
                   help="llama2.c's run.c executable: timed on version-0 files of the same fp32 models, with a "
                        "tokenizer (`RUN MODEL -z TOK -n TOKENS -t 0 -i a`, its 'achieved tok/s' line)")
    p.add_argument("--reference-q", default=None, metavar="RUNQ", type=non_empty_path,
                   help="llama2.c's runq.c executable: timed the same way on the version-2 (Q8_0) files")
    p.add_argument("--llamacpp", action="store_true",
                   help="also time llama.cpp (llama-cpp-python) on GGUF files of the same models (f32, q8_0, q4_0)")
    p.add_argument("--gguf", action="store_true",
                   help="also time babyllama on GGUF files of the same models, Q8_0 and Q4_0 (llama.cpp's blocks as "
                        "stored: the files --llamacpp times llama.cpp on)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="start N spinning co-runner processes for the measurements (a busy machine)")
    p.add_argument("--thread-settings", default=None, metavar="LIST",
                   help="comma-separated thread settings measured in turn: default (every thread variable "
                        "dropped: the pool decides) or a count; e.g. default,1,2 (default: --threads N or "
                        "OMP_NUM_THREADS=N as the one setting N, else default)")
    p.add_argument("--bandwidth-mib", type=positive_int, default=None,
                   help="MiB read for the memory-bandwidth figure (512; the NumPy engine's rows)")
    add_threads(p)
    p.set_defaults(func=cmd_bench)


def _names(value: str) -> list[str]:
    """A comma-separated flag's names, each once, in order: a name given twice would be measured twice."""
    return list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))


def _thread_settings(given: str | None, threads: int | None) -> tuple[str, ...]:
    """The thread settings the rows run with: --thread-settings, else the one count --threads or OMP_NUM_THREADS
    gives (the rows' children get exactly the variables their setting names, so a count set any other way would
    reach the header and not the rows), else "default"."""
    from ..threads import check_count, explicit_threads

    if given is None:
        count = explicit_threads()  # --threads N has set OMP_NUM_THREADS=N by now
        return (str(count),) if count else ("default",)
    if threads is not None:
        raise BabyLlamaError("bench: give --threads N or --thread-settings LIST, not both (--threads N is "
                             "--thread-settings N)")
    settings = tuple(_names(given))
    if not settings or any(s != "default" and not (s.isdigit() and int(s) > 0) for s in settings):
        raise BabyLlamaError(f"--thread-settings takes 'default' and positive counts, got {given!r}")
    for s in settings:
        if s != "default":
            check_count(int(s), "--thread-settings")
    return settings


def _check_plain_and_probe_flags(args: argparse.Namespace, torch_engine: bool, defaults: type) -> None:
    """The plain baseline's flags and the bandwidth probe's, refused where no such row runs (--no-plain; the
    PyTorch engine has neither), then given their defaults (bench.Plan's)."""
    plain_flags = [f for f, v in (("--plain-tokens", args.plain_tokens), ("--plain-repeats", args.plain_repeats))
                   if v is not None]
    if plain_flags and (args.no_plain or torch_engine):
        why = "--no-plain" if args.no_plain else f"--device {args.device} (the PyTorch engine has no plain rows)"
        raise BabyLlamaError(f"{' and '.join(plain_flags)} set the plain baseline's rows, which {why} leaves out")
    if args.bandwidth_mib is not None and torch_engine:
        raise BabyLlamaError(f"--bandwidth-mib sizes the memory-bandwidth probe of the NumPy engine's rows: --device "
                             f"{args.device} measures none")
    for name in ("plain_tokens", "plain_repeats", "bandwidth_mib"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(defaults, name))


def reference_path(exe: str) -> str | None:
    """The absolute path of the program --reference names (the one checked is the one timed): a path as given,
    a bare name the file of that name in the current folder, else the one on PATH; None for no executable
    file."""
    if os.sep not in exe and not os.path.isfile(exe):
        exe = shutil.which(exe) or exe
    return os.path.abspath(exe) if os.path.isfile(exe) and os.access(exe, os.X_OK) else None


def cmd_bench(args: argparse.Namespace) -> int:
    from .. import bench, safeio
    from ..printer import require_stdout

    shapes = _names(args.shapes)
    unknown = [s for s in shapes if s not in bench.SHAPES and s != bench.BUILTIN]
    if unknown or not shapes:
        raise BabyLlamaError(f"unknown shape(s) {', '.join(unknown) or '(none)'}; choose from "
                             f"{bench.BUILTIN}, {', '.join(bench.SHAPES)}")
    from ..api import check_device, check_kv_cache

    check_kv_cache(args.kv_cache, args.device)  # first: a flag clash needs no PyTorch to be told
    check_device(args.device, args.compile)  # here, as one line, rather than in a child process
    torch_engine = args.device != "numpy"
    given = args.formats if args.formats is not None else "fp32" if torch_engine else DEFAULT_FORMATS
    fmts = tuple(_names(given))
    known = (*bench.FORMATS, *bench.GGUF_ONLY_FORMATS)
    if not fmts or any(f not in known for f in fmts):
        raise BabyLlamaError(f"--formats takes {', '.join(known)}, got {given!r}")
    if torch_engine and fmts != ("fp32",):  # the rows of other formats would be left out without a word
        raise BabyLlamaError(f"--device {args.device} runs the PyTorch engine on fp32 files only: --formats fp32 "
                             "(the default with --device)")
    if args.gguf and not set(bench.GGUF_FORMATS) & set(fmts):
        raise BabyLlamaError(f"--gguf times babyllama on {' and '.join(bench.GGUF_FORMATS)} GGUF files: add one of "
                             "them to --formats")
    settings = _thread_settings(args.thread_settings, args.threads)
    _check_plain_and_probe_flags(args, torch_engine, bench.Plan)
    cpus = usable_cpus()
    if not 0 <= args.busy <= MAX_BUSY_PER_CPU * cpus:
        raise BabyLlamaError(f"--busy must be from 0 to {MAX_BUSY_PER_CPU * cpus} ({MAX_BUSY_PER_CPU} co-runners for "
                             f"each of the {cpus} CPUs this process may use), got {args.busy}")
    for shape in shapes:  # a longer prompt or decode would be cut to the context, and its figure made up
        context = bench.context_of(shape)
        for flag, n in (("--prompt-len", args.prompt_len), ("--tokens", args.tokens),
                        ("--plain-tokens", 0 if args.no_plain or torch_engine else args.plain_tokens)):
            if n > context:
                raise BabyLlamaError(f"{flag} {n} is longer than the {shape} model's context ({context} tokens)")
    cache = bench.cache_dir(args.cache_dir)
    output = safeio.output_file(args.output, "bench table") if args.output else None  # before hours of measuring
    if output is not None and output.suffix in (".bin", ".gguf") and cache.resolve() in output.resolve().parents:
        raise BabyLlamaError(f"--output {args.output} would be a model file in the bench's model cache ({cache}), "
                             "which the bench reads its models from: write the table elsewhere")
    if output is None:
        require_stdout("the table")
    if args.llamacpp and importlib.util.find_spec("llama_cpp") is None:  # its rows run it in child processes
        raise missing_extra("bench --llamacpp (llama-cpp-python is missing)", "bench")
    references = {}
    for name, flag, exe in (("run.c", "--reference", args.reference), ("runq.c", "--reference-q", args.reference_q)):
        if exe is None:
            continue
        path = reference_path(exe)
        if path is None:
            where = "" if os.sep in exe else " here or on PATH"
            raise BabyLlamaError(f"{flag} {exe}: not an executable file{where}")
        needs = bench.REFERENCES[name][0]  # a reference row sits beside babyllama's on the same format
        if needs not in fmts:
            raise BabyLlamaError(f"{flag} times {name} on {needs} files: add {needs} to --formats")
        references[name] = path
    machine = bench.describe_machine()
    plan = bench.Plan(shapes, fmts, args.repeats, args.tokens, args.batch, args.prompt_len,
                      ("fast",) if args.no_plain else bench.PATHS, args.plain_tokens, args.plain_repeats, references,
                      args.llamacpp, args.mmap, args.device, args.compile, settings, args.busy,
                      args.bandwidth_mib, args.kv_cache, args.rounds, args.gguf)
    rows, bandwidth = bench.run(plan, cache, log=say)
    busy = f"; {args.busy} busy co-runner process(es) during the measurements" if args.busy else ""
    text = f"Machine: {machine}{busy}\n\n" + bench.table(rows, args.batch, args.prompt_len, bandwidth)
    if bench.BUILTIN in shapes and args.device == "numpy":
        t = bench.startup()
        text += (f"\nStart-up: `babyllama run` with the built-in model, 2 positions, kernels already compiled: "
                 f"{t['run_ms']:.0f} ms wall per process (median of 5; a bare `python -c pass`: "
                 f"{t['python_ms']:.0f} ms)\n")
    if output is not None:  # first: the measurement is kept whatever becomes of stdout
        safeio.write_text(output, text)
    print(text)
    failed = sum(1 for r in rows if r.error)
    if failed:  # the table stands, with the reasons under it; a script running bench learns of them too
        say(f"babyllama: error: {failed} of {len(rows)} rows failed (listed under the table)", logging.ERROR)
        return 1
    return 0
