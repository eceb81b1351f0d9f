"""Install a trained run as the built-in model: copy model.bin + tokenizer.bin into babyllama/assets/ and
write the model card (model.json) with the run's config, data, training and `babyllama eval` figures.

    python scripts/make_card.py RUN_DIR --data DATA_DIR [--assets babyllama/assets] [--train-seconds S]

RUN_DIR holds ckpt.pt, model.bin (babyllama export) and tokenizer.bin; DATA_DIR holds train-00.txt and
valid.txt (TinyStories, CDLA-Sharing-1.0). Used by scripts/train_builtin.sh."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
from pathlib import Path

from babyllama import formats
from babyllama.documents import iter_documents
from babyllama.engine import Engine
from babyllama.evaluate import evaluate
from babyllama.tokenizer import Tokenizer
from babyllama.train import checkpoint

EVAL_SLICES = {"valid": None, "valid_first20": 20}  # the tests check the 20-story slice (fast)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} cores (CPU training, shared with other jobs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[1] / "babyllama" / "assets")
    p.add_argument("--train-seconds", type=float, default=None)
    a = p.parse_args()

    ckpt = checkpoint.load(a.run_dir / "ckpt.pt")
    cfg = ckpt["config"]
    a.assets.mkdir(parents=True, exist_ok=True)
    for name in ("model.bin", "tokenizer.bin"):
        shutil.copyfile(a.run_dir / name, a.assets / name)
    model, tok_path = a.assets / "model.bin", a.assets / "tokenizer.bin"
    weights = formats.load(model)
    args = weights.args
    engine, tok = Engine(weights), Tokenizer.load(tok_path, args.vocab_size)

    valid = a.data / "valid.txt"
    evals = {}
    for name, n in EVAL_SLICES.items():
        r = evaluate(engine, tok, valid, max_documents=n, show_progress=False)
        evals[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.to_dict().items()}
        evals[name]["command"] = "babyllama eval --data ../shared/data/tinystories/valid.txt" + (
            f" --max-stories {n}" if n else "")
    train_txt = a.data / "train-00.txt"
    n_stories = sum(1 for _ in iter_documents(train_txt))
    tokens_per_iter = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["max_seq_len"]
    card = {
        "name": "babyllama-stories",
        "description": "A tiny Llama 2 story model trained from scratch by babyllama's own pipeline on a "
                       "4.7 MB slice of TinyStories; the model `babyllama run` uses when given no model.",
        "params": f"{args.param_count() / 1e6:.2f}M",
        "n_params": args.param_count(),
        "val_loss": evals["valid"]["loss"],  # babyllama eval on valid.txt, nats per token
        "val_bits_per_byte": evals["valid"]["bits_per_byte"],
        "config": args.to_dict(),
        "files": {
            "model.bin": {"bytes": model.stat().st_size, "sha256": sha256(model),
                          "format": f"llama2.c version {weights.version}" + (" (Q8_0)" if weights.quantized else
                                                                              " (fp32)")},
            "tokenizer.bin": {"bytes": tok_path.stat().st_size, "sha256": sha256(tok_path),
                              "format": f"llama2.c tokenizer.bin, sentencepiece BPE, {args.vocab_size} tokens "
                                        "trained on train-00.txt by babyllama data train-vocab"},
        },
        "data": {
            "dataset": "TinyStories (Ronen Eldan, Yuanzhi Li, arXiv:2305.07759; roneneldan/TinyStories on the "
                       "Hugging Face hub)",
            "license": "CDLA-Sharing-1.0",
            "train": {"file": "train-00.txt", "stories": n_stories, "bytes": train_txt.stat().st_size,
                      "sha256": sha256(train_txt)},
            "valid": {"file": "valid.txt", "stories": evals["valid"]["documents"], "bytes": valid.stat().st_size,
                      "sha256": sha256(valid), "note": "the first 188 stories of TinyStories' V1 validation split"},
            "provenance": "../shared/data/tinystories/SOURCES.md in the babyllama workspace",
        },
        "training": {
            "iters": ckpt["iter_num"],
            "tokens_seen": ckpt["iter_num"] * tokens_per_iter,
            "tokens_per_iter": tokens_per_iter,
            "val_loss_in_training": round(ckpt["best_val_loss"], 4),
            "wall_seconds": round(a.train_seconds) if a.train_seconds else None,
            "machine": machine(),
            "config": {k: v for k, v in cfg.items() if k not in ("out_dir", "data_dir")},
        },
        "eval": evals,
        "eval_notes": "babyllama eval: every token after BOS of each story predicted once, windows of at most "
                      "seq_len tokens; loss in nats per token of this vocabulary, bits per byte over the UTF-8 "
                      "bytes of the stories (comparable across vocabularies).",
        "reproduce": "scripts/train_builtin.sh",
    }
    (a.assets / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    total = sum((a.assets / n).stat().st_size for n in ("model.bin", "tokenizer.bin", "model.json"))
    print(f"installed {model} ({card['params']} params), card {a.assets / 'model.json'}; {total:,} bytes in all")
    print(f"valid.txt: loss {evals['valid']['loss']:.4f}, bits/byte {evals['valid']['bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
