"""What several commands share: the parser class, model and sampling flags, their checks."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import (
    CONTROL_DEFAULTS,
    DEFAULT_STEPS,
    KV_CACHE_TYPES,
    SEED_LIMIT,
    TRAINED_VOCAB_SIZES,
    default_steps,
)
from ..errors import BabyLlamaError, first_line

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

    from ..sampler import Controls, Sampler

QUANTIZE_HELP = ("the weights' type on load: runq.c's Q8_0, llama.cpp's 4-bit Q4_0, or rounded to f16 or bf16 "
                 "(half the bytes of fp32, read as fp32 by the native kernels)")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), like every other error, and a flag is read
    only by its whole name: a prefix would be taken for another flag that starts with it (serve's `--model X`
    as --model-name X, where export and data instruct take --model FILE)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, but a flag this command does not have is reported first, by the name typed: argparse says
        what a required group misses before it looks for unknown flags, which hides a shortened name (`export
        --mod M` would be told to give one of --model ...)."""
        args = sys.argv[1:] if args is None else list(args)
        if self._subparsers is None:  # a command's own parser: what follows its name is all its flags
            self._refuse_unknown_flags(args)
        return super().parse_known_args(args, namespace)

    def _refuse_unknown_flags(self, args: list[str]) -> None:
        unknown = {}  # as typed: its name
        for arg in args:
            if arg == "--":  # what follows is positional
                break
            name = arg.split("=", 1)[0]
            if name.startswith("--") and len(name) > 2 and name not in self._option_string_actions:
                unknown[arg] = name
        if unknown:
            near = sorted({o for o in self._option_string_actions for u in unknown.values() if o.startswith(u)})
            self.error(f"unrecognized arguments: {' '.join(unknown)}" +
                       (f" (flags are read by their whole names only; this command's that start so: "
                        f"{', '.join(near)})" if near else ""))

    def _get_value(self, action: argparse.Action, arg_string: str) -> object:
        """argparse's, but a value out of its flag's range is a bad value (exit 1, as every check after parsing
        makes it), whichever command takes the flag; one that is not of the flag's kind stays a usage error."""
        try:
            return super()._get_value(action, arg_string)
        except OutOfRange as e:
            name = next((o for o in action.option_strings if o.startswith("--")), action.metavar or action.dest)
            raise BabyLlamaError(f"{name} {e}") from None

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        """argparse's, but a stdout that cannot be written (--help or --version into a full disk, or closed)
        raises for main to report, where argparse would drop the text and exit 0 (a reader gone, `| head`,
        stays a BrokenPipeError: a quiet end); stderr's failures it drops."""
        if not message:
            return
        if file is None:  # stdout closed (>&-): argparse would print on stderr
            raise BabyLlamaError("standard output is closed: nowhere to print it")
        stdout = sys.stdout  # compared by a name of its own: `file is not sys.stdout` narrows sys.stdout's type
        if file is not stdout:
            super()._print_message(message, file)
            return
        try:
            sys.stdout.write(message)
            sys.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise BabyLlamaError(f"cannot write to stdout: {e.strerror or first_line(e)}") from None


def add_model_flags(p: argparse.ArgumentParser, default: str = "the built-in story model") -> None:
    """The model (any format babyllama reads) and its tokenizer."""
    p.add_argument("checkpoint", nargs="?", metavar="MODEL", type=non_empty_path,
                   help=f"the model: a llama2.c .bin (v0-v3), a GGUF file, a Hugging Face or Meta folder, or "
                        f"a training checkpoint (ckpt.pt or its run folder); default: {default}")
    p.add_argument("-z", "--tokenizer", dest="tokenizer", type=non_empty_path,
                   help="tokenizer.bin or sentencepiece .model (default: the model's own; for a .bin or a "
                        "checkpoint, tokenizer.bin beside it, else for a .bin the built-in one when the "
                        "vocabulary sizes match)")
    p.add_argument("--lora", metavar="ADAPTER", default=None, type=non_empty_path,
                   help="merge this LoRA adapter (adapter.safetensors, or the `babyllama finetune` run folder "
                        "holding it) into the model's weights at load; it must come from this very model")
    add_kv_cache(p)


def non_empty_path(text: str) -> str:
    """A path argument: an empty one would name the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty")
    return text


def non_empty_url(text: str) -> str:
    """A URL argument: an empty one (an unset variable) would read as the option left out."""
    if not text:
        raise argparse.ArgumentTypeError("the URL is empty")
    return text


def add_kv_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="auto",
                   help="the KV cache's type: f16 halves the bytes attention reads per token, q8_0 (int8 with "
                        "a scale per 32 values) about halves them again; auto: f16 for quantized weights (Q8_0, "
                        "Q4_0), f32 for fp32 ones, whose output then stays run.c's exactly (auto)")


def add_sampling_flags(p: argparse.ArgumentParser, per_reply: bool = False, chat_mode: bool = False) -> None:
    """run.c's generation flags (short forms) with the long names people type; `per_reply`: chat's -n and
    --max-new-tokens, which budget each reply; `chat_mode`: run's, whose -m chat budgets replies so."""
    p.add_argument("-t", "--temperature", dest="temperature", type=float, default=1.0,
                   help="temperature, 0 = greedy (1.0)")
    p.add_argument("-p", "--top-p", dest="topp", type=float, default=0.9,
                   help="top-p in [0,1]; 0 or 1 = off, as in run.c (0.9)")
    p.add_argument("-s", "--seed", dest="seed", type=int, default=0, help="random seed; 0 = the time (default)")
    add_control_flags(p)
    if per_reply:
        p.add_argument("-n", "--steps", dest="steps", type=int, default=None,
                       help=f"tokens per reply, 0 = as many as the context holds, older turns sliding out "
                            f"({DEFAULT_STEPS})")
        p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None, metavar="N",
                       help="the same as -n (the name `run` and the server use)")
    else:
        p.add_argument("-n", "--steps", dest="steps", type=int, default=None,
                       help=f"positions to run, prompt included (run.c's meaning), 0 = seq_len ({DEFAULT_STEPS})"
                            + ("; with -m chat, tokens per reply" if chat_mode else ""))
        p.add_argument("--max-new-tokens", "--max_new_tokens", type=int, default=None, metavar="N",
                       help="generate at most N tokens after the prompt (-n then defaults to seq_len)")
    p.add_argument("-i", "--prompt", dest="prompt", default=None,
                   help="the first user turn (the others come from stdin)" if per_reply else "input prompt")
    p.add_argument("--raw-bytes", action="store_true",
                   help="print exactly run.c's bytes (it drops every character sent as byte tokens) instead of "
                        "whole UTF-8 characters")


def add_control_flags(p: argparse.ArgumentParser) -> None:
    """llama.cpp's sampling flags (sampler.Controls), all off by default: sampling is then run.c's."""
    g = p.add_argument_group("sampling controls (llama.cpp's flags; off by default: run.c's sampling)")
    g.add_argument("--top-k", "--top_k", type=int, default=CONTROL_DEFAULTS["top_k"], metavar="K",
                   help="sample among the K likeliest tokens; 0 = off (%(default)g)")
    g.add_argument("--min-p", type=float, default=CONTROL_DEFAULTS["min_p"], metavar="P",
                   help="drop tokens less likely than P times the likeliest (before temperature); "
                        "0 = off (%(default)g)")
    g.add_argument("--repeat-penalty", type=float, default=CONTROL_DEFAULTS["repeat_penalty"], metavar="X",
                   help="divide the positive logits (multiply the negative ones) of the tokens among the last "
                        "--repeat-last-n, prompt included, by X; 1 = off (%(default)g)")
    g.add_argument("--repeat-last-n", type=int, default=CONTROL_DEFAULTS["repeat_last_n"], metavar="N",
                   help="tokens --repeat-penalty looks back over; -1 = all of them (in the window), "
                        "0 = off (%(default)g)")
    g.add_argument("--presence-penalty", type=float, default=CONTROL_DEFAULTS["presence_penalty"], metavar="X",
                   help="OpenAI's: subtract X from the logit of every token generated so far, "
                        "in [-2, 2] (%(default)g)")
    g.add_argument("--frequency-penalty", type=float, default=CONTROL_DEFAULTS["frequency_penalty"], metavar="X",
                   help="OpenAI's: subtract X times its count so far from each generated token's logit, "
                        "in [-2, 2] (%(default)g)")
    g.add_argument("-l", "--logit-bias", type=logit_bias, action="append", default=[], metavar="TOKEN(+|-)BIAS",
                   help="add BIAS, in [-100, 100], to token id TOKEN's logit before the penalties (15043+1, "
                        "15043-100: all but banned); repeat for more tokens")


def logit_bias(text: str) -> tuple[int, float]:
    """An argparse value: llama.cpp's TOKEN+BIAS or TOKEN-BIAS (a token id and the bias on its logit)."""
    match = re.fullmatch(r"(\d+)([+-].+)", text)
    try:
        if match:
            return int(match[1]), float(match[2])
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"invalid token id and bias: {text!r} (TOKEN+BIAS or TOKEN-BIAS, such as "
                                     "15043+1)")


def controls(args: argparse.Namespace, vocab_size: int | None = None) -> Controls:
    """The sampling controls the flags ask for (sampler.Controls; a token's last --logit-bias holds), checked: one
    error line naming the flag of the first out of range (with `vocab_size`, a --logit-bias token beyond it)."""
    from ..sampler import Controls  # NumPy loads after --threads: imported here, not above

    c = Controls(args.top_k, args.min_p, args.repeat_penalty, args.repeat_last_n, args.presence_penalty,
                 args.frequency_penalty, tuple(dict(args.logit_bias).items()))
    problem = c.problem(vocab_size)
    if problem:
        name, rule = problem
        raise BabyLlamaError(f"--{name.replace('_', '-')} {rule}")
    return c


def make_sampler(args: argparse.Namespace, seed: int | None, vocab_size: int) -> Sampler:
    """A sampler with the flags' temperature, top-p and controls, and `seed` (None: the time), for a model of
    `vocab_size` tokens."""
    from ..sampler import Sampler

    return Sampler(args.temperature, args.topp, seed, controls(args, vocab_size))


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="threads for BLAS and the kernels (default: OMP_NUM_THREADS, else every core, one when "
                        "a busy machine makes that faster; OPENBLAS_NUM_THREADS sets BLAS's and numba's alone)")


def add_time_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-limit", type=positive_seconds, default=None, metavar="SECONDS",
                   help="give up on a transfer after this long (default: 2 hours); run again to resume it")


class OutOfRange(Exception):
    """A flag's value that parses but is out of the flag's range: `Parser` reports it as a bad value (exit 1)."""


def _checked_number(text: str, parse, ok, kind: str, rule: str):
    """An argparse value: `text` parsed (text that is not a `kind` does not parse: exit 2), and refused as a bad
    value (OutOfRange: exit 1) unless `ok`."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {kind}: {text!r}") from None
    if not ok(value):
        raise OutOfRange(f"must be {rule}, got {text}")
    return value


def positive_seconds(text: str) -> float:
    return _checked_number(text, float, lambda v: 0 < v < float("inf"), "number of seconds",
                           "a positive number of seconds")


def positive_int(text: str) -> int:
    return _checked_number(text, int, lambda v: v >= 1, "integer", ">= 1")


def share(text: str) -> float:
    """A fraction in (0, 1]."""
    return _checked_number(text, float, lambda v: 0 < v <= 1, "number", "in (0, 1]")


def training_seed(text: str) -> int:
    """A seed of Python's and PyTorch's generators, as train's seed key takes it: Random(-7) would be Random(7)."""
    return _checked_number(text, int, lambda v: 0 <= v < SEED_LIMIT, "integer", "in [0, 2**63)")


def vocab_size(text: str) -> int:
    """The size of a vocabulary `data train-vocab` makes (the tok{N}.model that pretokenize --vocab-size reads)."""
    low, high = TRAINED_VOCAB_SIZES
    return _checked_number(text, int, lambda v: low <= v <= high, "integer",
                           f"in {low}..{high} (3 control + 256 byte tokens + merges)")


def config_value(key: str) -> Callable[[str], object]:
    """argparse's converter for TrainConfig key `key`: a value that is not of the key's type (`--dim=abc`) is a
    command line that does not parse, exit 2 as for every other command's flags (a config file's stays 1)."""
    from ..train.config import TrainConfig, parse_value

    def convert(text: str) -> object:
        try:
            return parse_value(key, text)
        except BabyLlamaError as e:
            # a bare boolean flag takes the word after it as its value: `--eval_only run.toml` reads the file name
            bare = (f" (a bare --{key} takes the word after it as its value: write --{key}=true, or put that word "
                    "first)" if isinstance(getattr(TrainConfig, key, None), bool) else "")
            raise argparse.ArgumentTypeError(f"{e}{bare}") from None

    return convert


def add_compile(p: argparse.ArgumentParser, takes_value: bool = False,
                help: str = "with --device cpu/cuda: compile the decode step with torch.compile (CUDA graphs on "
                            "cuda)") -> None:
    """--compile; with `takes_value` also --compile=BOOL (sample.py's --compile=True), read as train's and
    finetune's compile key. A flag that may take a value takes the word after it, so commands whose model is a
    positional argument keep the plain switch: `run --compile MODEL` runs MODEL."""
    if takes_value:
        p.add_argument("--compile", nargs="?", const=True, default=False, type=config_value("compile"),
                       metavar="BOOL", help=f"{help} (false)")
    else:
        p.add_argument("--compile", action="store_true", help=help)


SAMPLING_FLAGS = {"temperature": "temperature (-t)", "topp": "top-p (-p)"}


def check_sampling_flags(args: argparse.Namespace, zero_new_tokens: bool = False) -> None:
    """One-line errors for values out of range; `zero_new_tokens`: --max-new-tokens 0 means no limit (chat)."""
    from ..sampler import sampling_problem  # NumPy loads after --threads

    problem = sampling_problem(args.temperature, args.topp)
    if problem:
        name, rule = problem
        raise BabyLlamaError(f"{SAMPLING_FLAGS[name]} {rule}")
    if args.steps is not None and args.steps < 0:
        raise BabyLlamaError(f"steps (-n) must be >= 0, got {args.steps}")
    if args.max_new_tokens is not None and args.max_new_tokens < (0 if zero_new_tokens else 1):
        raise BabyLlamaError(f"--max-new-tokens must be >= {0 if zero_new_tokens else 1}, got {args.max_new_tokens}")
    # the generator keeps 64 bits: 2**64 + 7 would sample seed 7's text; a negative seed is run.c's: its atoi's
    # int read as an unsigned 64-bit number (2**64 + s, which sampler.Rng takes it as)
    if not -(2**31) <= args.seed < SEED_LIMIT:
        raise BabyLlamaError(f"seed (-s) must be in [-2**31, 2**63), got {args.seed}")
    controls(args)  # their one-line errors before the model loads (the vocabulary is checked after)
    if zero_new_tokens and None not in (args.steps, args.max_new_tokens) and args.steps != args.max_new_tokens:
        # in chat both are each reply's budget: one of two different values would be dropped without a word
        raise BabyLlamaError(f"-n {args.steps} and --max-new-tokens {args.max_new_tokens} both set each reply's "
                             "budget in chat: give one of them")


def steps_flag(args: argparse.Namespace) -> int:
    """-n as given; unset, run.c's 256, or 0 (the whole context) when --max-new-tokens bounds the output."""
    return default_steps(args.steps, args.max_new_tokens)


def text_arg(value: str | None, flag: str) -> str:
    """Command-line text must be valid UTF-8 (Python keeps bytes its locale cannot decode as lone surrogates;
    under a locale that is not UTF-8, such as LC_ALL=C without Python's UTF-8 mode, those bytes may well be
    UTF-8, and are read as such)."""
    if value is None:
        return ""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return os.fsencode(value).decode("utf-8")
        except UnicodeError:
            raise BabyLlamaError(f"{flag} is not valid UTF-8 text") from None
    return value


def add_mmap(p: argparse.ArgumentParser, who: str = "",
             others: str = "refused for other formats (a GGUF file is always mapped)") -> None:
    """--mmap / --no-mmap (args.mmap: True, False, or None for the default rule of formats.load); llama2.c .bin
    files only (loading.check_mmap_applies refuses them for other formats; `others` says so)."""
    m = p.add_mutually_exclusive_group()
    m.add_argument("--mmap", dest="mmap", action="store_true", default=None,
                   help=f"{who}map the model file, a llama2.c .bin (no copy: memory only for what is touched; "
                        f"loading still reads the whole file once, to check its values); {others}")
    m.add_argument("--no-mmap", dest="mmap", action="store_false",
                   help=f"{who}read the .bin file's weights into memory (faster decode; the default for files up "
                        "to a quarter of the free memory, Q4_0 files aside: decode reads a regrouped copy of theirs, "
                        "which read, they keep beside it)")


def add_chat_template(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template", default=None,
                   help="chat template name: llama2 or babyllama (default: the model card's chat_template, else the "
                        "one the model file carries, else llama2; with --lora: llama2)")


def chat_template(args: argparse.Namespace, card: dict) -> str | None:
    """The chat template a command uses: --chat-template, else the model card's (None: the one the model file
    carries, else Llama 2's; see api.load), its name checked (an unknown one is one line before any work). With
    --lora, not the card's: an adapter is fine-tuned with Llama 2's template, whatever its base takes."""
    from ..chat_template import get_template

    if args.chat_template is not None and not args.chat_template.strip():
        raise BabyLlamaError("--chat-template must not be empty (leave it out for the model's own, else llama2)")
    template = args.chat_template or (None if getattr(args, "lora", None) else card.get("chat_template"))
    try:
        get_template(template)
    except BabyLlamaError as e:
        raise BabyLlamaError(f"{e} (named by the model card)" if template != args.chat_template else str(e)) from None
    return template
