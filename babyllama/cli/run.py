"""`babyllama run` and `babyllama chat`: generate text or chat (run.c's flags, and more)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, cast

from ..config import DEFAULT_PARALLEL, QUANTIZE_KINDS
from ..errors import BabyLlamaError, counted, say, warn
from .common import (
    QUANTIZE_HELP,
    add_chat_template,
    add_compile,
    add_mmap,
    add_model_flags,
    add_sampling_flags,
    add_threads,
    chat_template,
    check_sampling_flags,
    controls,
    make_sampler,
    non_empty_path,
    steps_flag,
    text_arg,
)

if TYPE_CHECKING:
    from ..api import Model
    from ..engine import Engine
    from ..sampler import Sampler
    from ..tokenizer import Tokenizer

DRAFT_K = 4


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="generate text or chat with a model (run.c's flags)",
                       description="Generate text from a model, like llama2.c's ./run.")
    add_model_flags(p, default="the built-in story model, or with -m chat the built-in chat model")
    add_sampling_flags(p, chat_mode=True)
    p.add_argument("-m", "--mode", dest="mode", choices=("generate", "chat"), default="generate",
                   help="generate (continue the prompt) or chat (as `babyllama chat`: -i is the first user turn, "
                        "the others come from stdin, -n budgets each reply) (generate)")
    p.add_argument("-y", "--system", dest="system", default=None, help="system prompt in chat mode")
    add_chat_template(p)
    add_engine_flags(p)
    p.add_argument("--batch-file", default=None, metavar="FILE", type=non_empty_path,
                   help="generate for every line of FILE at once (one prompt per line; an empty line is an empty "
                        "prompt, a story from BOS); sequence i uses seed+i")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help=f"with --batch-file: sequences generated together, each with its own KV cache; the "
                        f"others wait for a free slot ({DEFAULT_PARALLEL})")
    p.add_argument("--context-shift", action="store_true",
                   help="when seq_len is reached, keep the first --n-keep tokens and slide the rest (-n may "
                        "exceed seq_len)")
    p.add_argument("--n-keep", type=int, default=None,
                   help="tokens kept by --context-shift, at most half the context (default: the prompt, up to that)")
    p.add_argument("--rotate-keys", action="store_true",
                   help="with --context-shift: move the cached keys/values and re-rotate the keys instead of "
                        "recomputing the kept window (faster; the kept entries still carry the dropped context)")
    p.add_argument("--draft", default=None, metavar="SMALL.bin", type=non_empty_path,
                   help="speculative decoding with this draft model (same tokenizer)")
    p.add_argument("--draft-k", type=int, default=None, help=f"tokens drafted per round with --draft ({DRAFT_K})")
    p.add_argument("--plain", action="store_true", help="use the unoptimized reference engine (for comparison)")
    p.set_defaults(func=cmd_run)

    c = sub.add_parser("chat", help="chat with a model (Llama 2's [INST] template)",
                       description="Chat with a model: user turns from stdin, replies streamed. Each reply may "
                                   "use up to -n / --max-new-tokens tokens (0: as many as the context holds); the "
                                   "oldest turns slide out when the conversation outgrows the context.")
    add_model_flags(c, default="the built-in chat model (the story model fine-tuned to follow requests)")
    add_sampling_flags(c, per_reply=True)
    c.add_argument("-y", "--system", dest="system", default=None,
                   help="system prompt (asked for on stdin only when stdin is a terminal)")
    add_chat_template(c)
    add_engine_flags(c)
    c.set_defaults(func=cmd_run, mode="chat", batch_file=None, parallel=None, context_shift=False,
                   n_keep=None, rotate_keys=False, draft=None, draft_k=None, plain=False)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_KINDS, default=None, help=QUANTIZE_HELP)
    add_mmap(p)
    p.add_argument("--device", default="numpy",
                   help="numpy (the default engine), or cpu / cuda / cuda:N for the PyTorch model (bf16 on cuda)")
    add_compile(p)
    add_threads(p)


def load_model(args: argparse.Namespace) -> Model:
    """The model the flags name, with one line on stderr when it was converted from another format."""
    from ..adapter import OtherBase
    from ..api import load
    from ..loading import builtin_chat_model

    path = args.checkpoint
    if path is None and getattr(args, "mode", None) == "chat":  # chat, and run -m chat
        path = builtin_chat_model()
    try:
        model = load(path, args.tokenizer, quantize=getattr(args, "quantize", None),
                     plain=getattr(args, "plain", False), device=getattr(args, "device", "numpy"),
                     mmap=getattr(args, "mmap", None), compile=getattr(args, "compile", False),
                     lora=args.lora, kv_cache=args.kv_cache)
    except OtherBase:
        if args.checkpoint is not None or path is None:
            raise
        # the adapter's base was left out, not quantized: the built-in chat model is no copy of any base
        raise BabyLlamaError(f"{args.lora} was not trained on the built-in chat model, which chat runs when no MODEL "
                             f"is named: name the model it was trained on (babyllama chat MODEL --lora {args.lora})"
                             ) from None
    if model.source_kind != "bin" or args.lora:
        say(f"babyllama: {model.description}")
    if getattr(args, "device", "numpy") == "numpy" and not getattr(args, "plain", False):
        from ..kernels import backend

        backend()  # chosen now (BABYLLAMA_KERNELS checked), not at the first token: after the prompt is printed
    return model


def cmd_run(args: argparse.Namespace) -> int:
    from ..api import clamp_steps

    check_sampling_flags(args, zero_new_tokens=args.mode == "chat")
    prompt = text_arg(args.prompt, "prompt (-i)")
    system = text_arg(args.system, "system prompt (-y)") if args.system is not None else None
    check_speed_flags(args)
    template = None
    if args.mode == "chat":  # the flag's, else the one the model was tuned on (its card's): checked before loading
        from ..loading import builtin_chat_model, model_card

        needed = () if args.lora or args.chat_template else ("chat_template",)  # what the card is read for
        template = chat_template(args, model_card(args.checkpoint or str(builtin_chat_model()), strict=needed))
    elif args.chat_template is not None:
        raise BabyLlamaError("--chat-template is for chat (-m chat)")
    model = load_model(args)
    sampler = make_sampler(args, args.seed or None, model.args.vocab_size)
    if args.mode == "chat":
        from ..chat import chat

        max_new = args.max_new_tokens if args.max_new_tokens is not None else steps_flag(args)
        return chat(model, sampler, max_new, prompt or None, system, raw=args.raw_bytes, template=template)
    check_n_keep(args.n_keep, model.args.max_seq_len)
    steps = steps_flag(args)
    if args.context_shift:  # -n may go past seq_len; with --max-new-tokens alone, that bounds the output
        steps = steps or (sys.maxsize if args.max_new_tokens is not None else model.args.max_seq_len)
    else:
        # --max-new-tokens bounds the run on its own (-n then defaults to the context): -n is no promise there
        if args.steps is not None and args.steps > model.args.max_seq_len and args.max_new_tokens is None:
            warn_steps_beyond_context(args.steps, model.args.max_seq_len, can_shift=not (args.draft or args.batch_file))
        steps = clamp_steps(steps, model.args.max_seq_len)
    if args.batch_file:
        return generate_batch_file(model, args, steps)
    if args.draft:
        return generate_and_print(model, sampler, prompt, steps, args, draft=load_draft(args, model.tokenizer))
    return generate_and_print(model, sampler, prompt, steps, args)


def check_speed_flags(args: argparse.Namespace) -> None:
    """Flags that exclude each other, and flags given without the one they work with (refused rather than
    ignored)."""
    from ..api import check_plain

    exclusive = [name for name, on in (("--batch-file", args.batch_file), ("--draft", args.draft),
                                       ("--context-shift", args.context_shift)) if on]
    if len(exclusive) > 1:
        raise BabyLlamaError(f"{' and '.join(exclusive)} cannot be combined")
    if exclusive and args.mode == "chat":
        raise BabyLlamaError(f"{exclusive[0]} works in generate mode only (-m generate)")
    for flag, given, needs, present in (("--rotate-keys", args.rotate_keys, "--context-shift", args.context_shift),
                                        ("--n-keep", args.n_keep is not None, "--context-shift", args.context_shift),
                                        ("--draft-k", args.draft_k is not None, "--draft", args.draft),
                                        ("--parallel", args.parallel is not None, "--batch-file", args.batch_file),
                                        ("-y/--system", args.system is not None, "-m chat", args.mode == "chat")):
        if given and not present:
            raise BabyLlamaError(f"{flag} works with {needs} only")
    if args.draft and controls(args).penalizes:
        raise BabyLlamaError("--draft cannot apply --logit-bias, --repeat-penalty, --presence-penalty or "
                             "--frequency-penalty (the penalties depend on each drafted token)")
    if args.batch_file and args.prompt is not None:
        raise BabyLlamaError("--batch-file gives the prompts: -i/--prompt cannot be combined with it")
    check_plain(args.plain, args.device)
    for flag, value in (("--draft-k", args.draft_k), ("--parallel", args.parallel)):
        if value is not None and value < 1:
            raise BabyLlamaError(f"{flag} must be >= 1, got {value}")
    if args.n_keep is not None and args.n_keep < 0:
        raise BabyLlamaError(f"--n-keep must be >= 0, got {args.n_keep}")


def check_n_keep(n_keep: int | None, seq_len: int) -> None:
    """A context shift keeps at most half the context, so that every shift frees room to go on."""
    if n_keep is not None and n_keep > seq_len // 2:
        raise BabyLlamaError(f"--n-keep must be at most half the context ({seq_len // 2}), got {n_keep}")


def load_draft(args: argparse.Namespace, tokenizer: Tokenizer):
    """The --draft model's engine. A draft whose own tokenizer (beside it, or inside it) is not the model's
    `tokenizer` is refused: its ids would stand for other pieces, and nearly every drafted token be rejected."""
    from ..api import make_engine
    from ..loading import carried_tokenizer, detect_format, open_model

    try:  # --mmap / --no-mmap are the model's; a draft in another format than .bin is read its own way
        mmap = args.mmap if detect_format(args.draft) == "bin" else None
        source = open_model(args.draft, mmap=mmap, quantize=args.quantize, convert_other_types=args.device == "numpy")
    except BabyLlamaError as e:  # said as the draft's: the model itself loaded
        raise BabyLlamaError(f"--draft: {e}") from None
    try:
        own = carried_tokenizer(source, advice="")
    except BabyLlamaError as e:
        raise BabyLlamaError(f"the draft model {args.draft}: {e} (a draft reads the tokenizer beside it or inside "
                             "it; -z sets the model's)") from None
    if own is not None and not own.same_as(tokenizer):
        raise BabyLlamaError(f"the draft model {args.draft} comes with another tokenizer than the model's "
                             f"({source.tokenizer or 'its own vocabulary'}): a draft must share the model's tokenizer")
    return make_engine(source.weights, args.device, args.plain, args.compile, args.kv_cache)


def generate_and_print(model: Model, sampler: Sampler, prompt: str, steps: int, args: argparse.Namespace,
                       draft: Engine | None = None, warn_context: bool = True, can_shift: bool = True) -> int:
    """Echo the prompt as it is fed (like run.c), stream the generated text, then report tok/s on stderr
    (`warn_context`: say when the context holds fewer new tokens than --max-new-tokens asks for; `sample` says it
    once, in its own words, for all its samples; `can_shift`: whether the command has --context-shift)."""
    from ..generate import generate
    from ..printer import Printer

    ids = model.tokenizer.encode(prompt, bos=True)
    if len(ids) > steps:
        warn_prompt_too_long(len(ids), steps, None if args.context_shift else model.args.max_seq_len,
                             can_shift=can_shift and draft is None,  # --draft refuses --context-shift
                             max_new=args.max_new_tokens is not None)
    elif warn_context and not args.context_shift and steps == model.args.max_seq_len:  # the context bounds the run
        warn_new_tokens_beyond_context(len(ids), args.max_new_tokens, steps,
                                       remedy="--context-shift goes on past it" if draft is None else None)
    printer = Printer(model.tokenizer, raw=args.raw_bytes)
    printer.tokens(ids[1: steps + 1])
    start, n = None, 0
    if draft is not None:
        from ..speculative import SpecStats, speculative_generate

        stats = SpecStats()
        stream = speculative_generate(model.engine, draft, ids, steps, sampler, k=args.draft_k or DRAFT_K, stats=stats,
                                      max_new=args.max_new_tokens)
    else:
        stream = generate(model.engine, ids, steps, sampler, context_shift=args.context_shift, n_keep=args.n_keep,
                          rotate_keys=args.rotate_keys, max_new=args.max_new_tokens)
    for token in stream:
        printer.token(token)
        n += 1
        if start is None:
            start = time.perf_counter()  # like run.c, time from the end of the first step
    printer.end()
    if start is not None and n > 1:
        say(f"achieved tok/s: {(n - 1) / (time.perf_counter() - start):f}")
    if draft is not None:
        say(f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted "
            f"({100 * stats.acceptance:.1f}%), {stats.rounds} target passes for {n} tokens")
    return 0


def warn_steps_beyond_context(steps: int, seq_len: int, can_shift: bool) -> None:
    """run.c runs at most the context's positions whatever -n asks for: say so, rather than stop short without a
    word (`can_shift`: whether --context-shift may be added to go on)."""
    fix = ": --context-shift goes on past it" if can_shift else ""
    warn(f"-n {steps} is more than the model's context ({seq_len} positions); it runs "
         f"{seq_len}{fix}")


def warn_new_tokens_beyond_context(n_prompt: int, max_new_tokens: int | None, seq_len: int,
                                   flag: str = "--max-new-tokens", remedy: str | None = None,
                                   which: str = "the prompt's") -> None:
    """A run bounded by the context (not by -n) stops there, with fewer new tokens than `flag` asked for: say so,
    rather than stop short without a word (`remedy`: what goes on past it, if anything). A prompt that fills the
    context has its own warning."""
    room = seq_len - n_prompt + 1  # as in run.c, the last prompt position yields the first new token
    if max_new_tokens is not None and 0 < room < max_new_tokens:
        warn(f"{flag} {max_new_tokens} after {which} {n_prompt} tokens (with BOS) is more "
             f"than the model's context ({seq_len} positions) holds: it generates at most {room}"
             + (f" ({remedy})" if remedy else ""))


def warn_prompt_too_long(n_prompt: int, steps: int, seq_len: int | None, which: str = "the prompt",
                         can_shift: bool = True, max_new: bool = False) -> None:
    """run.c prints such a prompt and generates nothing; say why, and what would help (`seq_len`: the context,
    None where it does not bound the run (--context-shift); `can_shift`: whether --context-shift may be added;
    `max_new`: whether --max-new-tokens was given, with -n: then leaving -n out is the remedy)."""
    if seq_len is not None and n_prompt > seq_len:
        why = f"more than the model's context ({seq_len})"
        fix = "shorten it, or slide the window: --context-shift with --max-new-tokens" if can_shift else "shorten it"
    else:
        why = f"but -n/--steps allows {counted(steps, 'position')}"
        fix = ("raise -n, or leave it out: --max-new-tokens alone counts generated tokens only" if max_new
               else "raise -n, or use --max-new-tokens")
    warn(f"{which} is {n_prompt} tokens (with BOS), {why}: nothing will be generated "
         f"({fix})")


def generate_batch_file(model, args: argparse.Namespace, steps: int) -> int:
    """Every line of --batch-file is a prompt; they are generated together (--parallel at a time) and printed
    in order, each after a delimiter line `=== sequence I/N (K tokens, stop|length) ===`, as soon as it and
    every one before it are done."""
    from io import BytesIO

    from ..generate import stream_batch
    from ..printer import Printer, stdout_bytes, write_out
    from ..sampler import batch_seeds

    prompts = read_prompts(args.batch_file)
    tok = model.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    del prompts
    for i, prompt_ids in enumerate(ids):
        if len(prompt_ids) > steps:
            warn_prompt_too_long(len(prompt_ids), steps, model.args.max_seq_len, f"the prompt on line {i + 1}",
                                 can_shift=False, max_new=args.max_new_tokens is not None)
    fitting = [(len(p), i) for i, p in enumerate(ids) if len(p) <= steps]
    if fitting and steps == model.args.max_seq_len:  # the context bounds the sequences: one line for the longest
        n_prompt, i = max(fitting)
        warn_new_tokens_beyond_context(n_prompt, args.max_new_tokens, steps,
                                       which=f"the longest prompt's (line {i + 1})")
    base = args.seed or int(time.time())
    samplers: list[Sampler | None] = [make_sampler(args, seed, model.args.vocab_size)
                                      for seed in batch_seeds(base, len(ids))]
    start = time.perf_counter()
    out = stdout_bytes()
    total = 0
    # a sampler is dropped (None) only once its sequence is printed
    for i, seq in stream_batch(model.engine, ids, steps, cast("list[Sampler]", samplers),
                               max_new=args.max_new_tokens, max_slots=args.parallel or DEFAULT_PARALLEL):
        text = BytesIO()
        text.write(f"=== sequence {i + 1}/{len(ids)} ({len(seq.generated)} tokens, {seq.stop_reason}) ===\n"
                   .encode())
        printer = Printer(tok, raw=args.raw_bytes, out=text)
        printer.tokens(ids[i][1: steps + 1] + seq.generated)
        printer.end()
        write_out(out, text.getvalue())
        total += len(seq.generated)
        ids[i] = samplers[i] = None  # printed: nothing of it is kept
    elapsed = time.perf_counter() - start
    say(f"achieved tok/s: {total / elapsed:f} (aggregate over {len(ids)} sequences, prefill included)")
    return 0


def read_prompts(path: str) -> list[str]:
    from .. import safeio

    text = safeio.read_text(path, "batch file")  # a Windows editor's line ends are the file's, not the prompts'
    prompts = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if prompts[-1] == "":  # the newline that ends the last line, not an empty prompt after it
        prompts.pop()
    if not prompts:
        raise BabyLlamaError(f"batch file {path} has no prompts")
    return prompts
