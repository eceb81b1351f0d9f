"""Install a chat fine-tune as the built-in chat model: export it as a Q8_0 .bin into babyllama/assets/chat.bin
and write its card (chat.json): data, settings, losses and the instruction-following scores of the base and
of the chat model on the held-out requests (`babyllama eval --instruct`), with sample replies.

    python scripts/make_chat_card.py WORK --base babyllama/assets/model.bin

WORK holds the two stages of scripts/train_chat.sh: data/ and run/ (requests with words from anywhere in the
story), words/ and run2/ (words from the story's opening, weighted); each run folder also holds `seconds` and
`command` as the script wrote them. Used by scripts/train_chat.sh."""

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


def stage(run: Path, data: Path) -> dict:
    """What the card says of one fine-tuning stage."""
    ckpt = checkpoint.load(run / "ckpt.pt")
    cfg = ckpt["config"]
    meta = json.loads((run / "data" / "meta.json").read_text())
    read = lambda name: (run / name).read_text().strip() if (run / name).exists() else None  # noqa: E731
    seconds = read("seconds")
    return {
        "method": "LoRA" if cfg.get("lora_rank") else "full fine-tuning",
        "iters": ckpt["iter_num"],
        "loss": "cross-entropy on the assistant replies and their EOS only" + (
            f", the tokens of requested words weighted {cfg['word_weight']}x (validation unweighted)"
            if cfg.get("word_weight", 1) > 1 else ""),
        "train_requests": len((data / "instruct_train.jsonl").read_text().splitlines()),
        "train_tokens": meta["tokens"],
        "val_loss_in_training": round(ckpt["best_val_loss"], 4),
        "wall_seconds": int(seconds) if seconds else None,
        "command": read("command"),
        "config": {k: v for k, v in cfg.items() if k not in ("out_dir", "data_dir", "data")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[1] / "babyllama" / "assets")
    a = p.parse_args()

    run1, run2 = a.work / "run", a.work / "run2"
    chat = a.assets / "chat.bin"
    export(load_source(checkpoint=str(run2)), chat, "bin", version=2)
    weights = formats.load(chat)
    tokenizer = a.assets / "tokenizer.bin"
    models = {"base": api.load(a.base, tokenizer), "chat": api.load(chat, tokenizer),
              "chat_fp32": api.load(run2, tokenizer), "stage1_fp32": api.load(run1, tokenizer)}
    held_out = {"words_from_openings": a.work / "words" / "instruct_val.jsonl",
                "words_from_anywhere": a.work / "data" / "instruct_val.jsonl"}
    scores = {}
    for name, path in held_out.items():
        requests = eval_requests(path)
        scores[name] = {"file": path.name, "sha256": sha256(path), "requests": len(requests),
                        **{m: score(model, requests) for m, model in models.items()}}
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
            "source": "train-00.txt (TinyStories training stories; valid.txt is never used); the same 300 stories "
                      "held out in both stages",
            "made_by": "babyllama data instruct (requests: a topic or character and three rare words taken from "
                       "the story itself, in one of 21 phrasings; the story is the reply); stage 2 with "
                       "--early-words 4 (the words drawn from the story's first four candidates)",
        },
        "training": {"stage1": stage(run1, a.work / "data"), "stage2": stage(run2, a.work / "words"),
                     "machine": machine()},
        "eval": {
            "instruct": scores,
            "command": "babyllama eval MODEL --instruct FILE (greedy, each reply until EOS or the context)",
            "notes": "word_share: requested words used in the reply (whole words, any case); topic_share: replies "
                     "that mention every word of the requested topic (e.g. cat and Tom); chat: the shipped Q8_0 "
                     "file; chat_fp32: the fine-tune before quantization; stage1_fp32: after the first stage; base: "
                     "the story model given the same [INST] prompts. words_from_openings is the held-out split of "
                     "stage 2's data, words_from_anywhere that of stage 1 (the same stories).",
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
