"""The `babyllama` command: argument parsing and dispatch only. Each subcommand is a thin call into the
modules that do the work, imported when the subcommand runs so that `babyllama run` stays light."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import BabyLlamaError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------------------------------ run


def add_run(sub) -> None:
    p = sub.add_parser("run", help="generate text or chat with a llama2.c model (run.c's flags)",
                       description="Generate text from a llama2.c .bin model, like llama2.c's ./run.")
    add_model_flags(p)
    p.add_argument("-m", dest="mode", choices=("generate", "chat"), default="generate", help="mode")
    p.add_argument("-y", dest="system", default=None, help="system prompt in chat mode")
    p.add_argument("--quantize", choices=("q8_0",), default=None, help="quantize fp32 weights on load")
    p.add_argument("--batch-file", default=None, metavar="FILE",
                   help="generate for every line of FILE at once (one prompt per line); sequence i uses seed+i")
    p.add_argument("--context-shift", action="store_true",
                   help="when seq_len is reached, keep the first --n-keep tokens and slide the rest (-n may "
                        "exceed seq_len)")
    p.add_argument("--n-keep", type=int, default=None, help="tokens kept by --context-shift (default: the prompt)")
    p.add_argument("--rotate-keys", action="store_true",
                   help="with --context-shift: move the cached keys/values and re-rotate the keys instead of "
                        "recomputing the kept window (faster; the kept entries still carry the dropped context)")
    p.add_argument("--draft", default=None, metavar="SMALL.bin",
                   help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft-k", type=int, default=4, help="tokens drafted per round with --draft (4)")
    p.add_argument("--plain", action="store_true", help="use the unoptimized reference engine (for comparison)")
    p.add_argument("--device", default="numpy",
                   help="numpy (the default engine), or cpu / cuda / cuda:N for the PyTorch model (bf16 on cuda)")
    add_compile(p)
    add_threads(p)
    p.set_defaults(func=cmd_run)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model (Llama 2's [INST] template; = run -m chat)",
                       description="Chat with a llama2.c model: user turns from stdin, answers streamed.")
    add_model_flags(p)
    p.add_argument("-y", dest="system", default=None, help="system prompt (asked for on stdin when absent)")
    p.add_argument("--quantize", choices=("q8_0",), default=None, help="quantize fp32 weights on load")
    p.add_argument("--device", default="numpy", help="numpy, or cpu / cuda for the PyTorch model")
    add_compile(p)
    add_threads(p)
    p.set_defaults(func=cmd_run, mode="chat", batch_file=None, context_shift=False, n_keep=None, rotate_keys=False,
                   draft=None, draft_k=4, plain=False)


def add_compile(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="with --device cpu/cuda: compile the decode step with torch.compile (CUDA graphs on cuda)")


def add_model_flags(p) -> None:
    """The model, its tokenizer and run.c's sampling flags: what `run` and `chat` share."""
    p.add_argument("checkpoint", nargs="?", help="model .bin (default: the built-in story model)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin (default: beside the model, else built-in)")
    p.add_argument("--no-mmap", action="store_true",
                   help="read the weights into memory instead of mapping the file (faster decode, full RSS)")
    add_sampling_flags(p)


def add_sampling_flags(p) -> None:
    """run.c's generation flags, shared by `run` and `sample`."""
    p.add_argument("-t", dest="temperature", type=float, default=1.0, help="temperature, 0 = greedy (1.0)")
    p.add_argument("-p", dest="topp", type=float, default=0.9, help="top-p in [0,1], 1 = off (0.9)")
    p.add_argument("-s", dest="seed", type=int, default=0, help="random seed (default: time)")
    p.add_argument("-n", dest="steps", type=int, default=256, help="positions to run, 0 = seq_len (256)")
    p.add_argument("-i", dest="prompt", default=None, help="input prompt")


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="threads for BLAS and numba (default: OMP_NUM_THREADS/OPENBLAS_NUM_THREADS, else all)")


def _check_sampling_flags(args) -> None:
    if args.temperature < 0:
        raise BabyLlamaError(f"temperature (-t) must be >= 0, got {args.temperature}")
    if not 0.0 <= args.topp <= 1.0:
        raise BabyLlamaError(f"top-p (-p) must be in [0, 1], got {args.topp}")
    if args.steps < 0:
        raise BabyLlamaError(f"steps (-n) must be >= 0, got {args.steps}")
    if args.seed < 0:
        raise BabyLlamaError(f"seed (-s) must be >= 0, got {args.seed}")


def _text_arg(value: str | None, flag: str) -> str:
    """Command-line text must be valid UTF-8 (Python keeps undecodable bytes as lone surrogates)."""
    if value is None:
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BabyLlamaError(f"{flag} is not valid UTF-8 text") from None
    return value


def cmd_run(args) -> int:
    from .api import clamp_steps, load
    from .sampler import Sampler

    _check_sampling_flags(args)
    prompt = _text_arg(args.prompt, "prompt (-i)")
    system = _text_arg(args.system, "system prompt (-y)") if args.system is not None else None
    _check_speed_flags(args)
    model = load(args.checkpoint, args.tokenizer, quantize=args.quantize, plain=args.plain, device=args.device,
                 mmap=not args.no_mmap, compile=args.compile)
    if args.context_shift and args.mode == "generate" and not args.batch_file and not args.draft:
        steps = args.steps or model.args.max_seq_len  # -n may go past seq_len
    else:
        steps = clamp_steps(args.steps, model.args.max_seq_len)
    sampler = Sampler(args.temperature, args.topp, args.seed or None)
    if args.mode == "chat":
        from .chat import chat
        return chat(model, sampler, steps, prompt or None, system)
    if args.batch_file:
        return _generate_batch(model, args, steps)
    if args.draft:
        return _generate(model, sampler, prompt, steps, draft=_load_draft(args), draft_k=args.draft_k)
    return _generate(model, sampler, prompt, steps, context_shift=args.context_shift, n_keep=args.n_keep,
                     rotate_keys=args.rotate_keys)


def _check_speed_flags(args) -> None:
    exclusive = [name for name, on in (("--batch-file", args.batch_file), ("--draft", args.draft),
                                       ("--context-shift", args.context_shift)) if on]
    if len(exclusive) > 1:
        raise BabyLlamaError(f"{' and '.join(exclusive)} cannot be combined")
    if exclusive and args.mode == "chat":
        raise BabyLlamaError(f"{exclusive[0]} works in generate mode only (-m generate)")
    if args.draft_k < 1:
        raise BabyLlamaError(f"--draft-k must be >= 1, got {args.draft_k}")
    if args.rotate_keys and not args.context_shift:
        raise BabyLlamaError("--rotate-keys works with --context-shift only")
    if args.n_keep is not None and args.n_keep < 0:
        raise BabyLlamaError(f"--n-keep must be >= 0, got {args.n_keep}")


def _load_draft(args):
    from . import formats
    from .api import make_engine

    weights = formats.load(args.draft, mmap=not args.no_mmap)
    if args.quantize:
        weights = weights.quantize()
    return make_engine(weights, args.device, args.plain, args.compile)


def _generate_batch(model, args, steps: int) -> int:
    """Every line of --batch-file is a prompt; all are generated together, then printed in order, each
    after a delimiter line `=== sequence I/N (K tokens, stop|length) ===`."""
    from .generate import generate_batch
    from .sampler import Sampler

    try:
        with open(args.batch_file, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f]
    except FileNotFoundError:
        raise BabyLlamaError(f"batch file not found: {args.batch_file}") from None
    except UnicodeDecodeError:
        raise BabyLlamaError(f"batch file {args.batch_file} is not valid UTF-8 text") from None
    except OSError as e:
        raise BabyLlamaError(f"cannot read batch file {args.batch_file}: {e.strerror}") from None
    while prompts and prompts[-1] == "":
        prompts.pop()
    if not prompts:
        raise BabyLlamaError(f"batch file {args.batch_file} has no prompts")
    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    base = args.seed or int(time.time())
    samplers = [Sampler(args.temperature, args.topp, base + i) for i in range(len(prompts))]
    start = time.perf_counter()
    seqs = generate_batch(model.engine, ids, steps, samplers)
    elapsed = time.perf_counter() - start
    out = sys.stdout.buffer
    for i, (p, seq) in enumerate(zip(ids, seqs)):
        out.write(f"=== sequence {i + 1}/{len(seqs)} ({len(seq.generated)} tokens, {seq.stop_reason}) ===\n"
                  .encode())
        out.write(_decode_run(tok, p[: steps + 1] + seq.generated))
        out.write(b"\n")
    out.flush()
    total = sum(len(s.generated) for s in seqs)
    print(f"achieved tok/s: {total / elapsed:f} (aggregate over {len(seqs)} sequences, prefill included)",
          file=sys.stderr)
    return 0


def _decode_run(tok, ids: list[int]) -> bytes:
    """Text of a token run as run.c prints it (each piece decoded after its predecessor)."""
    return b"".join(tok.decode_piece(prev, nxt) for prev, nxt in zip(ids, ids[1:]))


def _generate(model, sampler, prompt: str, steps: int, draft=None, draft_k: int = 4, context_shift: bool = False,
              n_keep: int | None = None, rotate_keys: bool = False) -> int:
    from .generate import generate

    tok = model.tokenizer
    out = sys.stdout.buffer
    ids = tok.encode(prompt, bos=True)
    for prev, nxt in zip(ids[: steps], ids[1: steps + 1]):  # run.c echoes the prompt as it feeds it
        out.write(tok.decode_piece(prev, nxt))
    out.flush()
    prev, start, n = ids[-1], None, 0
    if draft is not None:
        from .speculative import SpecStats, speculative_generate
        stats = SpecStats()
        stream = speculative_generate(model.engine, draft, ids, steps, sampler, k=draft_k, stats=stats)
    else:
        stream = generate(model.engine, ids, steps, sampler, context_shift=context_shift, n_keep=n_keep,
                          rotate_keys=rotate_keys)
    for nxt in stream:
        out.write(tok.decode_piece(prev, nxt))
        out.flush()
        prev, n = nxt, n + 1
        if start is None:
            start = time.perf_counter()  # like run.c, time from the end of the first step
    out.write(b"\n")
    out.flush()
    if start is not None and n > 1:
        print(f"achieved tok/s: {(n - 1) / (time.perf_counter() - start):f}", file=sys.stderr)
    if draft is not None:
        print(f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted "
              f"({100 * stats.acceptance:.1f}%), {stats.rounds} target passes for {n} tokens", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ bench


def add_bench(sub) -> None:
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
    from . import bench

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
    from .api import check_device
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


# ----------------------------------------------------------------------------------------------- eval


def add_eval(sub) -> None:
    p = sub.add_parser(
        "eval", help="loss, perplexity and bits per byte of a model on a text file of stories",
        description="Score a model on held-out text. The file is split into stories on lines that are exactly "
        "<|endoftext|> (TinyStories layout; a file without them is one document); each story is stripped and "
        "encoded with BOS, as pretokenize does, and every token after BOS is predicted once. Stories longer "
        "than the context are cut into consecutive windows of at most seq_len tokens (a later window starts "
        "without the earlier context). Prints mean loss per predicted token (nats), perplexity = exp(loss), "
        "and bits per byte = total nats / ln 2 / UTF-8 bytes of the stories: tokenizer-independent, so models "
        "with different vocabularies compare.")
    p.add_argument("checkpoint", nargs="?",
                   help="model .bin, or a training checkpoint (ckpt.pt or its run folder; needs torch) "
                   "(default: the built-in story model)")
    p.add_argument("--data", required=True, help="text file to score (e.g. TinyStories valid.txt)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin (default: beside the model, else built-in)")
    p.add_argument("--max-stories", type=int, default=None, help="score only the first N stories")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="stop after the story in which N predicted tokens are reached (stories stay whole)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's seq_len)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json

    from .api import BUILTIN_MODEL, load
    from .evaluate import evaluate

    model = load(args.checkpoint, args.tokenizer)
    r = evaluate(model.engine, model.tokenizer, args.data, seq_len=args.seq_len, max_documents=args.max_stories,
                 max_tokens=args.max_tokens)
    if args.json:
        print(json.dumps({"model": str(args.checkpoint or BUILTIN_MODEL), "data": args.data, **r.to_dict()}))
        return 0
    seq_len = args.seq_len or model.args.max_seq_len
    print(f"model       {args.checkpoint or BUILTIN_MODEL}")
    print(f"data        {args.data}: {r.documents:,} stories, {r.bytes:,} bytes")
    print(f"tokens      {r.tokens:,} predicted in {r.windows:,} windows of <= {seq_len}")
    print(f"loss        {r.loss:.4f} nats/token")
    print(f"perplexity  {r.perplexity:.3f}")
    print(f"bits/byte   {r.bits_per_byte:.4f}")
    return 0


# ------------------------------------------------------------------------------------ models, download


def add_models(sub) -> None:
    p = sub.add_parser("models", help="list the built-in model and the public llama2.c checkpoints",
                       description="The models babyllama knows by name, with their shape, reported val loss, "
                       "size and where to get them.")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    from .catalog import table

    print(table())
    return 0


def add_download(sub) -> None:
    p = sub.add_parser("download", help="download a public checkpoint and its tokenizer (see babyllama models)",
                       description="Fetch a known model into DIR/NAME/ (model .bin + tokenizer.bin), resuming an "
                       "interrupted download. Needs internet; files already there are kept.")
    p.add_argument("name", help="model name, e.g. stories15M (babyllama models lists them)")
    p.add_argument("--dir", default="models", help="download folder (default: ./models)")
    p.add_argument("--url-base", default=None,
                   help="fetch from this mirror instead (same relative paths as the Hugging Face repo)")
    p.set_defaults(func=cmd_download)


def cmd_download(args) -> int:
    from .catalog import find
    from .download import download_model

    path = download_model(find(args.name), args.dir, args.url_base)
    print(f"{path}\nrun it: babyllama run {path}")
# ------------------------------------------------------------------------------------------------ data


def add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare training data: download, train-vocab, pretokenize",
                       description="Prepare training data (llama2.c's tinystories.py).")
    steps = p.add_subparsers(dest="data_command", metavar="STEP", parser_class=Parser, required=True)

    d = steps.add_parser("download", help="download and unpack TinyStories (or another .tar.gz with --url)")
    d.add_argument("--url", default=None, help="archive URL (default: TinyStories_all_data.tar.gz on Hugging Face)")
    d.add_argument("--sha256", default=None, help="expected sha256 of the archive (default: what the server says)")
    d.add_argument("--data-dir", default="data", help="where the archive and its contents go (data)")
    d.set_defaults(func=cmd_data_download)

    v = steps.add_parser("train-vocab", help="train a sentencepiece BPE vocabulary (llama2.c's settings)")
    v.add_argument("--vocab-size", type=int, required=True, help="number of tokens, e.g. 4096")
    v.add_argument("--input", default=DEFAULT_INPUT, help=f"text/jsonl/json file or folder ({DEFAULT_INPUT})")
    v.add_argument("--data-dir", default="data", help="where tok{N}.model and tok{N}.bin go (data)")
    v.add_argument("--max-chars", type=int, default=200_000_000, help="characters of input to learn from")
    v.set_defaults(func=cmd_data_train_vocab)

    t = steps.add_parser("pretokenize", help="encode documents into uint16 token shards, BOS before each")
    t.add_argument("--input", default=DEFAULT_INPUT, help=f"text/jsonl/json file or folder ({DEFAULT_INPUT})")
    t.add_argument("--vocab-size", type=int, default=0, help="use data/tok{N}.model from train-vocab")
    t.add_argument("--tokenizer", default=None, help="a sentencepiece .model or tokenizer.bin instead")
    t.add_argument("--data-dir", default="data", help="where tok{N}.model is looked up (data)")
    t.add_argument("--out-dir", default=None, help="shard folder (default: DATA_DIR/tok{N})")
    t.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    t.set_defaults(func=cmd_data_pretokenize)


DEFAULT_INPUT = "data/TinyStories_all_data"


def cmd_data_download(args) -> int:
    from pathlib import Path

    from .train.download import TINYSTORIES_URL, download, extract

    url = args.url or TINYSTORIES_URL
    name = Path(url.split("?")[0]).name or "download.tar.gz"
    archive = download(url, Path(args.data_dir) / name, args.sha256)
    stem = name[: -len(".tar.gz")] if name.endswith(".tar.gz") else Path(name).stem
    out = extract(archive, Path(args.data_dir) / stem)
    print(f"unpacked into {out}")
    return 0


def cmd_data_train_vocab(args) -> int:
    from .train.vocab import train_vocab

    model, binary = train_vocab(args.input, args.vocab_size, args.data_dir, args.max_chars)
    print(f"wrote {model} and {binary}")
    return 0


def cmd_data_pretokenize(args) -> int:
    from pathlib import Path

    from .train.data import pretokenize

    if args.tokenizer:
        tokenizer = Path(args.tokenizer)
    elif args.vocab_size:
        tokenizer = Path(args.data_dir) / f"tok{args.vocab_size}.model"
        if not tokenizer.is_file():
            raise BabyLlamaError(f"{tokenizer} not found: run `babyllama data train-vocab "
                                 f"--vocab-size {args.vocab_size}` first")
    else:
        raise BabyLlamaError("give --vocab-size N (a vocabulary from train-vocab) or --tokenizer PATH")
    out = Path(args.out_dir) if args.out_dir else Path(args.data_dir) / f"tok{args.vocab_size or 'enizer'}"
    meta = pretokenize(args.input, tokenizer, out, workers=args.workers or None)
    print(f"wrote {meta['tokens']:,} tokens in {len(meta['shards']['train'])} train and "
          f"{len(meta['shards']['val'])} val shards to {out}")
    return 0


# ------------------------------------------------------------------------------------------------ train


def add_train(sub) -> None:
    from .train.config import FIELDS, TrainConfig

    p = sub.add_parser("train", help="train a model with PyTorch (torchrun for DDP/FSDP)",
                       description="Train a Llama 2 model (llama2.c's train.py). Settings come from the "
                                   "defaults, then CONFIG (TOML or JSON), then --key=value flags. Run under "
                                   "`torchrun --nproc_per_node=N` to train on N devices with DDP.")
    p.add_argument("config", nargs="?", help="config file (.toml or .json) with key = value settings")
    knobs = p.add_argument_group("settings (--key=value)")
    for name in FIELDS:
        knobs.add_argument(f"--{name}", dest=f"cfg_{name}", metavar=type(getattr(TrainConfig, name)).__name__.upper(),
                           default=None, help=f"(default {getattr(TrainConfig, name)!r})")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .train.config import resolve_config
    from .train.loop import train

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    train(resolve_config(args.config, overrides))
    return 0


# ------------------------------------------------------------------------------------------------ sample


def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a training checkpoint with PyTorch",
                       description="Generate from a checkpoint (llama2.c's sample.py), with run's sampling flags.")
    p.add_argument("--checkpoint", required=True, help="ckpt.pt (or the folder holding it)")
    p.add_argument("-z", dest="tokenizer", help="tokenizer.bin (default: beside the checkpoint)")
    add_sampling_flags(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from pathlib import Path
    from types import SimpleNamespace

    _check_sampling_flags(args)
    prompt = _text_arg(args.prompt, "prompt (-i)")
    try:
        import torch

        from .model import TorchEngine
        from .train.checkpoint import CKPT_NAME, load_model
    except ImportError:
        raise BabyLlamaError("sample needs torch: pip install 'babyllama[train]'") from None
    from .api import clamp_steps, find_tokenizer
    from .sampler import Sampler
    from .tokenizer import Tokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise BabyLlamaError("--device cuda requested but no CUDA GPU is available")
    model = load_model(args.checkpoint)
    ckpt = Path(args.checkpoint)
    ckpt = ckpt / CKPT_NAME if ckpt.is_dir() else ckpt
    tok_path = args.tokenizer or find_tokenizer(ckpt, model.args.vocab_size)
    tokenizer = Tokenizer.load(tok_path, model.args.vocab_size)
    runner = SimpleNamespace(engine=TorchEngine(model, device), tokenizer=tokenizer)
    steps = clamp_steps(args.steps, model.args.max_seq_len)
    return _generate(runner, Sampler(args.temperature, args.topp, args.seed or None), prompt, steps)


# ------------------------------------------------------------------------------------------------ export


def add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="convert models: .bin, Meta, Hugging Face -> .bin (v0/v1/v2), Hugging Face, GGUF",
        description="Convert a model from one format to another. OUT is a .bin file (--to bin, versions 0/1/2 "
                    "as llama2.c's export.py), a Hugging Face directory (--to hf) or a .gguf file (--to gguf); "
                    "without --to it is guessed from OUT's name (.bin, .gguf, else a directory).")
    p.add_argument("output", metavar="OUT", help="file or directory to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="CKPT", help="a babyllama training checkpoint (ckpt.pt or its folder)")
    src.add_argument("--model", metavar="FILE", help="a llama2.c/babyllama .bin (any version) or a .gguf file")
    src.add_argument("--meta-llama", metavar="DIR", help="Meta's checkpoint folder (params.json, consolidated.*.pth)")
    src.add_argument("--hf", nargs="+", metavar="DIR_OR_FILES",
                     help="a Hugging Face Llama folder, or its weight files with config.json beside them")
    p.add_argument("--to", choices=("bin", "hf", "gguf"), help="output format (default: from OUT's name)")
    p.add_argument("--version", type=int, choices=(0, 1, 2), default=None,
                   help=".bin version: 0 legacy fp32, 1 fp32, 2 Q8_0 (default 1)")
    p.add_argument("--group-size", type=int, default=None, help="Q8_0 group size for version 2 (64, or less)")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default=None, help="GGUF tensor type (default f32)")
    p.add_argument("--tokenizer", metavar="TOK", help="sentencepiece .model or tokenizer.bin to go with the model "
                   "(default: the source's own tokenizer.model / tokenizer.bin when there is one)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length to record (default: the source's; Meta checkpoints: 4096)")
    p.set_defaults(func=cmd_export)

    t = sub.add_parser("export-tokenizer", help="convert a sentencepiece .model into llama2.c's tokenizer.bin")
    t.add_argument("model", help="the sentencepiece .model")
    t.add_argument("-o", "--output", default=None, help="the .bin to write (default: MODEL with .bin)")
    t.set_defaults(func=cmd_export_tokenizer)


def cmd_export(args) -> int:
    from .export import export, infer_target, load_source, report

    if args.max_seq_len is not None and args.max_seq_len <= 0:
        raise BabyLlamaError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    src = load_source(checkpoint=args.checkpoint, model=args.model, meta_llama=args.meta_llama, hf=args.hf,
                      max_seq_len=args.max_seq_len)
    to = infer_target(args.output, args.to)
    written = export(src, args.output, to, version=args.version, group_size=args.group_size, dtype=args.dtype,
                     tokenizer=args.tokenizer)
    report(written, src.weights)
    return 0


def cmd_export_tokenizer(args) -> int:
    from .export import export_tokenizer

    print(f"wrote {export_tokenizer(args.model, args.output)}")
    return 0


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> Parser:
    from . import __version__

    parser = Parser(prog="babyllama", description="The Llama 2 stack for small models.")
    parser.add_argument("--version", action="version", version=f"babyllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_run(sub)
    add_chat(sub)
    add_eval(sub)
    add_models(sub)
    add_download(sub)
    add_data(sub)
    add_train(sub)
    add_sample(sub)
    add_export(sub)
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        from .threads import configure
        configure(getattr(args, "threads", None))
        return args.func(args) or 0
    except BabyLlamaError as e:
        print(f"babyllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`): not an error worth a traceback
        return 0


if __name__ == "__main__":
    sys.exit(main())
