"""`babyllama finetune`: full or LoRA fine-tuning of any model babyllama reads, on text or chat data."""

from __future__ import annotations

import argparse
import os
import shlex

from ..errors import BabyLlamaError
from .common import non_empty_path
from .train import add_config_flags, config_overrides, no_checkpoint_text, require_training


def add(sub: argparse._SubParsersAction) -> None:
    from ..train.config import FINETUNE_DEFAULTS, FINETUNE_MIN_LR_SHARE, SHAPE_KEYS

    p = sub.add_parser(
        "finetune", help="fine-tune a model on text or chat data (full, or LoRA with --lora-rank)",
        description="Fine-tune a base model with the training loop (`babyllama train`'s settings, schedule, "
                    "checkpoints, resume and torchrun), starting from its weights. DATA is plain text (continued "
                    "pre-training) or chat .jsonl ({\"messages\": [...]} or {\"prompt\", \"response\"}), rendered "
                    "with the chat template of `chat` and the server; the loss is taken on assistant replies only. "
                    "With --lora-rank R the base stays frozen and OUT_DIR/adapter.safetensors (+ .json) is "
                    "written; use it with `run/chat --lora` or `export --lora`. Without it every weight is "
                    "trained and OUT_DIR/ckpt.pt is a model of its own. Settings: the defaults, then CONFIG, "
                    "then --key=value flags (the defaults below are fine-tuning's; docs/finetune.md lists those "
                    "unlike train's).")
    p.add_argument("config", nargs="?", type=non_empty_path,
                   help="config file (.toml, .json, or llama2.c's .py of key = value lines) with the settings")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", metavar="DIR", type=non_empty_path, help="the base is this Hugging Face Llama folder")
    src.add_argument("--meta-llama", metavar="DIR", type=non_empty_path, help="the base is this Meta checkpoint folder")
    add_config_flags(p, FINETUNE_DEFAULTS, from_base=SHAPE_KEYS,
                     explained={"min_lr": f"{FINETUNE_MIN_LR_SHARE:g} x --learning_rate where that is given"})
    p.set_defaults(func=cmd_finetune, sigterm_kills=True)  # torchrun's agent stops its workers with it


def cmd_finetune(args: argparse.Namespace) -> int:
    require_training("finetune")
    from ..train.config import FINETUNE_DEFAULTS, build_config, read_config_file, resolve_config
    from ..train.loop import train

    overrides = config_overrides(args)
    for folder, kind, flag in ((args.hf, "hf", "--hf"), (args.meta_llama, "meta", "--meta-llama")):
        if folder:
            other = [f"--{key}={overrides[key]}" for key, value in (("base", folder), ("base_format", kind))
                     if overrides.get(key, value) != value]
            if other:  # two bases, or two formats for one: neither may be silently dropped
                raise BabyLlamaError(f"{' and '.join(other)} contradict{'s' if len(other) == 1 else ''} {flag} "
                                     f"{folder}, which names the base ({kind}): give one")
            overrides.update(base=folder, base_format=kind)
    asked = build_config(args.config, overrides, defaults=FINETUNE_DEFAULTS, checked=False)
    if not asked.base and asked.init_from != "resume":  # said before the settings' checks (max_seq_len 0: the base's)
        raise BabyLlamaError("finetune needs a base model: --base=MODEL (checkpoint, .bin, .gguf), --hf DIR or "
                             "--meta-llama DIR")
    cfg = resolve_config(args.config, overrides, defaults=FINETUNE_DEFAULTS)  # refuses a run from random weights
    given = set(overrides) | (set(read_config_file(args.config)) if args.config else set())
    saved_at = train(cfg, given)["saved_at"]
    out = cfg.out_dir
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun's other processes: the first one says it
        return 0
    if saved_at is None:  # nothing to point at: out_dir holds no model of this run
        if not cfg.eval_only:
            print(no_checkpoint_text(cfg))
    elif cfg.lora_rank:
        # the base's tokenizer, when the run was given one, is not found beside the base: chat needs it named
        tokenizer = ["-z", cfg.tokenizer] if cfg.tokenizer else []
        print(f"adapter: {out}/adapter.safetensors (+ adapter.json); try: "
              f"{shlex.join(['babyllama', 'chat', cfg.base, *tokenizer, '--lora', out])}")
    else:
        print(f"model: {out}/ckpt.pt; try: {shlex.join(['babyllama', 'chat', out])}, or "
              f"{shlex.join(['babyllama', 'export', 'OUT.bin', '--checkpoint', out])}")
    return 0
