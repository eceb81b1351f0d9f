"""Install a chat fine-tune as the built-in chat model: export it as a Q8_0 .bin into babyllama/assets/chat.bin
and write its card (chat.json): data, settings, losses and the instruction-following scores of the base and
of the chat model on the held-out requests (`babyllama eval --instruct`), with sample replies.

    python scripts/make_chat_card.py WORK --base babyllama/assets/model.bin [--train-seconds S]

WORK holds data/ (`babyllama data instruct`) and run/ (`babyllama finetune`). Used by scripts/train_chat.sh."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from make_card import machine, sha256

from babyllama import api, formats
from babyllama.export import export
from babyllama.instruct import eval_requests, score_instructions
from babyllama.loading import load_source
from babyllama.train import checkpoint

N_SAMPLES = 3


def score(model, requests) -> dict:
    s = score_instructions(model, requests, show_progress=False)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.to_dict(N_SAMPLES).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[1] / "babyllama" / "assets")
    p.add_argument("--train-seconds", type=float, default=None)
    p.add_argument("--command", default=None, help="the fine-tuning command, for the card")
    a = p.parse_args()

    run, data = a.work / "run", a.work / "data"
    ckpt = checkpoint.load(run / "ckpt.pt")
    cfg = ckpt["config"]
    chat = a.assets / "chat.bin"
    export(load_source(checkpoint=str(run)), chat, "bin", version=2)
    weights = formats.load(chat)
    held_out = data / "instruct_val.jsonl"
    requests = eval_requests(held_out)
    tokenizer = a.assets / "tokenizer.bin"
    scores = {"base": score(api.load(a.base, tokenizer), requests),
              "chat": score(api.load(chat, tokenizer), requests),
              "chat_fp32": score(api.load(run, tokenizer), requests)}
    meta = json.loads((run / "data" / "meta.json").read_text())
    train_lines = (data / "instruct_train.jsonl").read_text().splitlines()
    card = {
        "name": "babyllama-chat",
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
            "source": "train-00.txt (TinyStories training stories; valid.txt is never used)",
            "made_by": "babyllama data instruct (requests: a topic or character and three rare words taken from "
                       "the story itself, in one of 21 phrasings; the story is the reply)",
            "train_requests": len(train_lines),
            "held_out_requests": len(requests),
            "held_out_sha256": sha256(held_out),
            "train_tokens": meta["tokens"],
        },
        "training": {
            "method": "LoRA" if cfg.get("lora_rank") else "full fine-tuning",
            "iters": ckpt["iter_num"],
            "loss": "cross-entropy on the assistant replies and their EOS only",
            "val_loss_in_training": round(ckpt["best_val_loss"], 4),
            "wall_seconds": round(a.train_seconds) if a.train_seconds else None,
            "machine": machine(),
            "command": a.command,
            "config": {k: v for k, v in cfg.items() if k not in ("out_dir", "data_dir", "data", "base")},
        },
        "eval": {
            "instruct": scores,
            "command": f"babyllama eval MODEL --instruct {held_out} (greedy, each reply until EOS or the context)",
            "notes": "word_share: requested words used in the reply (whole words, any case); topic_share: replies "
                     "that mention every word of the requested topic (e.g. cat and Tom); chat: the shipped Q8_0 "
                     "file; chat_fp32: the fine-tune before quantization; base: the story model given the same "
                     "[INST] prompts.",
        },
        "reproduce": "scripts/train_chat.sh",
    }
    (a.assets / "chat.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files = [a.assets / n for n in ("model.bin", "tokenizer.bin", "model.json", "chat.bin", "chat.json")]
    print(f"installed {chat} ({card['params']} params, {chat.stat().st_size:,} bytes); all model files "
          f"{sum(f.stat().st_size for f in files if f.exists()):,} bytes")
    for name, s in scores.items():
        print(f"{name:10s} words used {100 * s['word_share']:5.1f}%  topic {100 * s['topic_share']:5.1f}%  "
              f"all words {100 * s['all_words_share']:5.1f}%")


if __name__ == "__main__":
    main()
