"""Install a chat fine-tune as the built-in chat model: export it as a Q8_0 .bin into babyllama/assets/chat.bin
and write its card (chat.json): data, settings, losses and the instruction-following scores of the base and
of the chat model on the held-out requests (`babyllama eval --instruct`), with sample replies.

    python scripts/make_chat_card.py WORK --base babyllama/assets/model.bin

WORK is scripts/train_chat.sh's folder: the request sets rare/, common/ and anywhere/ (each with its held-out
instruct_val.jsonl), tune/ (the fine-tuning data) and run/, the fine-tuning run: its `command`, `seconds`,
`metrics.jsonl` and data/meta.json, and the weights as ckpt.pt or, for a run made elsewhere, model.bin (its fp32
export). Used by scripts/train_chat.sh."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from make_card import machine, sha256

from babyllama import api, formats
from babyllama.cli import build_parser
from babyllama.cli.train import config_overrides
from babyllama.export import export
from babyllama.instruct import eval_requests, score_instructions
from babyllama.loading import load_source
from babyllama.train.config import FINETUNE_DEFAULTS, resolve_config

N_SAMPLES = 3
# config keys the card leaves out: paths, and the model's shape (the base's, in the card's "config")
NOT_SETTINGS = {"out_dir", "data_dir", "data", "init_from", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                "multiple_of", "max_seq_len", "norm_eps", "rope_theta", "shared_classifier"}
HELD_OUT = {  # split name in the card -> request set of scripts/train_chat.sh
    "words_from_openings": "rare",
    "common_words_from_openings": "common",
    "words_from_anywhere": "anywhere",
}


def score(model, requests) -> dict:
    s = score_instructions(model, requests, show_progress=False)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.to_dict(N_SAMPLES).items()}


def run_config(command: str) -> dict:
    """The settings a `python -m babyllama finetune ...` command ran with: defaults, config file, then flags."""
    argv = shlex.split(command)
    args = build_parser().parse_args(argv[argv.index("babyllama") + 1:])  # "python -m babyllama finetune ..."
    return resolve_config(args.config, config_overrides(args), defaults=FINETUNE_DEFAULTS).to_dict()


def training_machine() -> str:
    """Where `finetune` trains by default here: the GPU if there is one, else the CPU's threads."""
    import torch

    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name()} GPU (bf16 autocast)"
    return f"{machine().split(',')[0]}, {torch.get_num_threads()} threads"


def training(run: Path, work: Path) -> dict:
    """What the card says of the fine-tuning run."""
    command = (run / "command").read_text().strip()
    cfg = run_config(command)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    meta = json.loads((run / "data" / "meta.json").read_text())
    seconds = (run / "seconds").read_text().strip() if (run / "seconds").exists() else None
    train_files = sorted((work / "tune").glob("*_train.jsonl"))
    return {
        "method": "LoRA" if cfg.get("lora_rank") else "full fine-tuning",
        "iters": evals[-1]["iter"],
        "loss": "cross-entropy on the assistant replies and their EOS only" + (
            f", the tokens of requested words weighted {cfg['word_weight']}x (validation unweighted)"
            if cfg.get("word_weight", 1) > 1 else ""),
        "train_requests": {f.name: len(f.read_text().splitlines()) for f in train_files},
        "tokens": meta["tokens"],
        "val_loss": {"split": "dev (rare words from openings)",
                     "by_iter": {e["iter"]: round(e["val_loss"], 4) for e in evals}},
        "wall_seconds": int(seconds) if seconds else None,
        "command": command,
        "config": {k: v for k, v in cfg.items() if k not in NOT_SETTINGS},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--machine", default=None, help="where the run trained (default: this machine's GPU, else its CPU)")
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[1] / "babyllama" / "assets")
    a = p.parse_args()

    run = a.work / "run"
    weights_of_run = {"checkpoint": str(run)} if (run / "ckpt.pt").exists() else {"model": str(run / "model.bin")}
    chat = a.assets / "chat.bin"
    export(load_source(**weights_of_run), chat, "bin", version=2)
    weights = formats.load(chat)
    tokenizer = a.assets / "tokenizer.bin"
    fp32 = run if (run / "ckpt.pt").exists() else run / "model.bin"
    models = {"base": api.load(a.base, tokenizer), "chat": api.load(chat, tokenizer),
              "chat_fp32": api.load(fp32, tokenizer)}
    scores = {}
    for name, folder in HELD_OUT.items():
        path = a.work / folder / "instruct_val.jsonl"
        requests = eval_requests(path)
        scores[name] = {"file": f"{folder}/{path.name}", "sha256": sha256(path), "requests": len(requests),
                        **{m: score(model, requests) for m, model in models.items()}}
    card = {
        "name": "babyllama-chat",
        "chat_template": "llama2",  # what finetune renders conversations with (chat_template.DEFAULT_TEMPLATE)
        "description": "The built-in story model fine-tuned on instruction pairs made from its own training stories "
                       "(babyllama data instruct): it writes a story about a requested character or topic that uses "
                       "requested words. `babyllama chat` uses it when given no model.",
        "params": f"{weights.args.param_count() / 1e6:.2f}M",
        "config": weights.args.to_dict(),
        "files": {"chat.bin": {"bytes": chat.stat().st_size, "sha256": sha256(chat),
                               "format": f"llama2.c version 2 (Q8_0, group size {weights.group_size}), the fine-tuned "
                                         "fp32 weights quantized on export"},
                  "tokenizer.bin": "shared with the base model (model.json)"},
        "base": {"file": a.base.name, "sha256": sha256(a.base)},
        "data": {
            "source": "train-00.txt (TinyStories training stories; valid.txt is never used): a seeded shuffle holds "
                      "300 stories out for the scores below and the next 200 as the dev split (the run's validation "
                      "loss; the settings were chosen on it); every request set holds out the same stories",
            "made_by": "babyllama data instruct: a request for the story's own character or topic and three of its "
                       "words, in one of 21 phrasings, the story as the reply; training: rare words (used by at "
                       "most 5% of the stories) from the story's opening (--early-words 4, 12 requests per story) "
                       "and commoner ones (--max-word-df 0.2, 6 per story)",
        },
        "training": {**training(run, a.work), "machine": a.machine or training_machine()},
        "eval": {
            "instruct": scores,
            "command": "babyllama eval MODEL --instruct FILE (greedy, each reply until EOS or the context)",
            "notes": "word_share: requested words used in the reply (whole words, any case); topic_share: replies "
                     "that mention every word of the requested topic (e.g. cat and Tom); chat: the shipped Q8_0 "
                     "file; chat_fp32: the fine-tune before quantization; base: the story model given the same "
                     "[INST] prompts. words_from_openings and common_words_from_openings ask for words as the "
                     "training requests do; words_from_anywhere for rare words from anywhere in the story.",
        },
        "reproduce": "scripts/train_chat.sh",
    }
    (a.assets / "chat.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files = [a.assets / n for n in ("model.bin", "tokenizer.bin", "model.json", "chat.bin", "chat.json")]
    print(f"installed {chat} ({card['params']} params, {chat.stat().st_size:,} bytes); all model files "
          f"{sum(f.stat().st_size for f in files if f.exists()):,} bytes")
    for split, by_model in scores.items():
        for name, s in by_model.items():
            if isinstance(s, dict):
                print(f"{split:20s} {name:12s} words used {100 * s['word_share']:5.1f}%  topic "
                      f"{100 * s['topic_share']:5.1f}%  all words {100 * s['all_words_share']:5.1f}%")


if __name__ == "__main__":
    main()
