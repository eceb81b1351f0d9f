"""`babyllama train` and `babyllama sample`: training with PyTorch, and sampling a checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CKPT_NAME
from ..errors import BabyLlamaError, require
from .common import (
    add_compile,
    add_sampling_flags,
    check_sampling_flags,
    config_value,
    make_sampler,
    non_empty_path,
    positive_int,
    steps_flag,
    text_arg,
)

if TYPE_CHECKING:
    from ..train.config import TrainConfig


def add(sub: argparse._SubParsersAction) -> None:
    add_train(sub)
    add_sample(sub)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with PyTorch (torchrun for DDP/FSDP)",
                       description="Train a Llama 2 model (llama2.c's train.py). Settings come from the "
                                   "defaults, then CONFIG (TOML, JSON or a .py of key = value lines), then "
                                   "--key=value flags. Run under "
                                   "`torchrun --nproc_per_node=N` to train on N devices with DDP.")
    p.add_argument("config", nargs="?", type=non_empty_path,
                   help="config file (.toml, .json, or llama2.c's .py of key = value lines) with the settings")
    from ..train.config import FINETUNE_KEYS

    # train refuses the fine-tuning keys in one line (check_finetune, cmd_train): parsed, but not offered
    add_config_flags(p, hidden=("base", *FINETUNE_KEYS))
    p.set_defaults(func=cmd_train, sigterm_kills=True)  # torchrun's agent stops its workers with it


def add_config_flags(p: argparse.ArgumentParser, defaults: dict | None = None, hidden: tuple[str, ...] = (),
                     from_base: tuple[str, ...] = (), explained: dict[str, str] | None = None) -> None:
    """A --key=value flag per TrainConfig field (also spelled --key-value); a bare boolean flag means true.
    The `hidden` keys are parsed but left out of --help; the `from_base` ones default to the base model's;
    `explained`: what follows a key's default in its help, where another setting moves it."""
    from ..train.config import FIELDS, LLAMA2C_ONLY, TrainConfig

    knobs = p.add_argument_group("settings (--key=value)")
    for name in FIELDS:
        default = (defaults or {}).get(name, getattr(TrainConfig, name))
        boolean = isinstance(default, bool)
        more = (explained or {}).get(name)
        # the base's tokenizer is -z/--tokenizer as in every command, and an empty one (an unset variable) is refused
        # as theirs is, not read as no tokenizer
        names, kind = ((["-z", *spellings(name)], non_empty_path) if name == "tokenizer" else
                       (spellings(name), config_value(name)))
        knobs.add_argument(*names, dest=f"cfg_{name}", metavar=type(default).__name__.upper(), default=None,
                           type=kind, nargs="?" if boolean else None, const=True if boolean else None,
                           help=argparse.SUPPRESS if name in hidden else "(default: the base model's)"
                           if name in from_base else f"(default {default!r}{f'; {more}' if more else ''})")
    for name in LLAMA2C_ONLY:  # parsed so that the config check can say what to do instead
        knobs.add_argument(*spellings(name), dest=f"cfg_{name}", default=None, nargs="?", const=True,
                           help=argparse.SUPPRESS)


def spellings(key: str) -> list[str]:
    """--key, and --key-with-dashes where that differs."""
    return list(dict.fromkeys([f"--{key}", f"--{key.replace('_', '-')}"]))


def config_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def require_training(what: str) -> None:
    """PyTorch, and matplotlib for loss.png (written from the first evaluation on), before anything runs."""
    for module in ("torch", "matplotlib"):
        require(module, "train", what)


def cmd_train(args: argparse.Namespace) -> int:
    require_training("train")
    from ..train.config import build_config, resolve_config
    from ..train.loop import train

    overrides = config_overrides(args)
    # before the settings are checked, which would ask a base given here for fine-tuning's data
    if build_config(args.config, overrides, checked=False).base:
        raise_base_given()
    cfg = resolve_config(args.config, overrides)  # a fine-tuning run's folder is refused there, with the command
    result = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0 and result["saved_at"] is None and not cfg.eval_only:
        print(no_checkpoint_text(cfg))
    return 0


def no_checkpoint_text(cfg: TrainConfig) -> str:
    """Why a run that ended without an error left no checkpoint of its own in out_dir."""
    why = ("max_iters is 0" if cfg.max_iters == 0 else  # else the last step's evaluation saves, unless:
           "none improved on step 0's validation loss (always_save_checkpoint=false)")
    earlier = Path(cfg.out_dir) / CKPT_NAME
    kept = f"; {earlier} is still an earlier run's" if earlier.exists() else ""
    return f"no checkpoint written: a run saves at its evaluations after step 0, and {why}{kept}"


def raise_base_given() -> None:
    """One command per job: finetune has its own defaults and messages for a base."""
    raise BabyLlamaError("train starts from random weights; to fine-tune a base model use babyllama finetune "
                         "--base=MODEL")


def add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="generate text from a training checkpoint with PyTorch",
                       description="Generate from a checkpoint (llama2.c's sample.py) with the PyTorch model; "
                                   "run's sampling flags.")
    p.add_argument("--checkpoint", default="out/ckpt.pt",
                   help="ckpt.pt (or the folder holding it) (default: out/ckpt.pt, train's default out_dir, as in "
                        "sample.py)")
    p.add_argument("-z", "--tokenizer", dest="tokenizer", type=non_empty_path,
                   help="tokenizer.bin (default: beside the checkpoint)")
    add_sampling_flags(p)
    p.add_argument("--start", default=None,
                   help="sample.py's name for the prompt (-i); FILE:PATH reads it from the file PATH")
    p.add_argument("--num-samples", "--num_samples", type=positive_int, default=1, metavar="N",
                   help="samples to draw, each followed by a line of dashes when there are several, as sample.py "
                        "prints them (1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    add_compile(p, takes_value=True, help="compile the decode step with torch.compile (sample.py's --compile=True)")
    p.set_defaults(func=cmd_sample)


SAMPLE_SEPARATOR = "---------------"  # what sample.py prints after each sample


def sample_prompt(args: argparse.Namespace) -> str:
    """-i, or sample.py's --start (FILE:PATH: the text of the file PATH)."""
    if args.start is None:
        return text_arg(args.prompt, "prompt (-i)")
    if args.prompt is not None:
        raise BabyLlamaError("-i and --start both give the prompt: give one of them")
    if not args.start.startswith("FILE:"):
        return text_arg(args.start, "prompt (--start)")
    from .. import safeio

    path = args.start[len("FILE:"):]
    if not path:
        raise BabyLlamaError("--start=FILE: names no file (FILE:PATH reads the prompt from the file PATH)")
    return safeio.read_text(path, "prompt file (--start=FILE:...)")


def cmd_sample(args: argparse.Namespace) -> int:
    from ..api import clamp_steps, load
    from .run import generate_and_print, warn_new_tokens_beyond_context, warn_steps_beyond_context

    check_sampling_flags(args)
    prompt = sample_prompt(args)
    device = args.device
    if device == "auto":
        torch = require("torch", "train", "sample")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load(args.checkpoint, args.tokenizer, device=device, compile=args.compile)
    if args.steps is not None and args.steps > model.args.max_seq_len and args.max_new_tokens is None:
        warn_steps_beyond_context(args.steps, model.args.max_seq_len, can_shift=False)
    steps = clamp_steps(steps_flag(args), model.args.max_seq_len)
    if steps == model.args.max_seq_len:  # the context bounds the run, not -n
        warn_new_tokens_beyond_context(len(model.tokenizer.encode(prompt, bos=True)), args.max_new_tokens, steps,
                                       "--max_new_tokens", "llama2.c's sample.py goes on over a sliding window; "
                                       "`babyllama run --context-shift` goes on past the context")
    args.context_shift, args.n_keep, args.rotate_keys = False, None, False
    # one sampler: each sample goes on from the last one's draws
    sampler = make_sampler(args, args.seed or None, model.args.vocab_size)
    for _ in range(args.num_samples):
        generate_and_print(model, sampler, prompt, steps, args, warn_context=False, can_shift=False)
        if args.num_samples > 1:
            print(SAMPLE_SEPARATOR, flush=True)
    return 0
