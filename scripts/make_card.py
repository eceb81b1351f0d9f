"""Install a trained run as the built-in model: copy model.bin + tokenizer.bin into babyllama/assets/ and
write the model card (model.json): the run's config, its data (real and generated tokens, sources and
licenses), training (steps, tokens, wall and CPU time, the validation curve) and `babyllama eval` figures
of the fp32 file and of its Q8_0 copy.

    python scripts/make_card.py RUN_DIR --shared SHARED_DIR --text TEXT_DIR --pool DATA_DIR
        --phases END:HORIZON:DATA_DIR,... [--assets babyllama/assets]

RUN_DIR holds ckpt.pt, model.bin (babyllama export), tokenizer.bin, metrics.jsonl and time.txt (GNU time -v
output of each training session, appended); SHARED_DIR holds data/tinystories/{train-00,valid}.txt
(TinyStories, CDLA-Sharing-1.0) and fixtures/stories260K.bin (the teacher); TEXT_DIR holds the training text
(real-*.txt, gen-*.txt); DATA_DIR the pretokenized shards of all of it; --phases the training phases as
scripts/train_builtin.sh ran them (last step, cosine horizon and data folder of each). Used by that script."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shutil
from pathlib import Path

import numpy as np

from babyllama import formats
from babyllama.documents import iter_documents
from babyllama.engine import Engine
from babyllama.evaluate import evaluate
from babyllama.tokenizer import BOS, Tokenizer
from babyllama.train import checkpoint
from babyllama.train.data import read_meta

EVAL_SLICES = {"valid": None, "valid_first20": 20}  # the tests check the 20-story slice (fast)
EVAL_COMMAND = "babyllama eval --data ../shared/data/tinystories/valid.txt"
LLAMA2C = "karpathy/llama2.c (https://github.com/karpathy/llama2.c), MIT License, Copyright (c) 2023 Andrej Karpathy"


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
    return f"{cpu}, {os.cpu_count()} cores shared with other jobs; training on one thread (OMP_NUM_THREADS=1)"


def clock_seconds(text: str) -> float:
    """GNU time's "h:mm:ss" or "m:ss.ss" as seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def time_totals(path: Path) -> dict:
    """Wall and CPU seconds summed over the training sessions that GNU time -v appended to `path`."""
    text = path.read_text() if path.is_file() else ""
    wall = sum(clock_seconds(m) for m in re.findall(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text))
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): (\S+)", text))
    sessions = len(re.findall(r"Elapsed \(wall clock\)", text))
    return {"sessions": sessions, "wall_seconds": round(wall), "cpu_seconds": round(cpu)}


def shard_stats(data_dir: Path) -> dict:
    """Tokens and stories (BOS count) of every shard of the pretokenized data, by shard name."""
    meta = read_meta(data_dir)
    out = {}
    for split in ("train", "val"):
        for name in meta["shards"][split]:
            ids = np.fromfile(data_dir / name, dtype=np.uint16)
            out[name] = {"split": split, "tokens": int(len(ids)), "stories": int((ids == BOS).sum())}
    return out


def text_stats(path: Path) -> dict:
    """Stories, file bytes and story bytes (the stripped text, what bits per byte counts) of a .txt file."""
    docs = list(iter_documents(path))
    return {"stories": len(docs), "bytes": path.stat().st_size,
            "story_bytes": sum(len(d.encode("utf-8")) for d in docs), "sha256": sha256(path)}


def curve(run_dir: Path, tokens_per_iter: int, bytes_per_token: float) -> list[dict]:
    """The run's validation losses (held-out split of train-00.txt, nats per token) against training tokens,
    with the bits per byte they amount to on that split."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_loss" in r:
            rows.append({"iter": r["iter"], "tokens": r["iter"] * tokens_per_iter, "val_loss": round(r["val_loss"], 4),
                         "heldout_bits_per_byte": round(r["val_loss"] / math.log(2) / bytes_per_token, 4)})
    return rows


def training_phases(spec: str, tokens_per_iter: int) -> list[dict]:
    """"END:HORIZON:DATA_DIR,..." as rows: the steps each phase ran, its cosine horizon, its data's shards."""
    rows, start = [], 0
    for part in spec.split(","):
        end, horizon, data_dir = part.split(":", 2)
        end, horizon = int(end), int(horizon)
        rows.append({"from_iter": start, "to_iter": end, "lr_decay_iters": horizon,
                     "tokens": (end - start) * tokens_per_iter, "data": read_meta(Path(data_dir))["shards"]["train"]})
        start = end
    return rows


def eval_figures(weights: formats.Weights, tok: Tokenizer, valid: Path) -> dict:
    figures = {}
    for name, n in EVAL_SLICES.items():
        r = evaluate(Engine(weights), tok, valid, max_documents=n, show_progress=False)
        figures[name] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.to_dict().items()}
        figures[name]["command"] = EVAL_COMMAND + (f" --max-stories {n}" if n else "")
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--shared", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--pool", type=Path, required=True, help="pretokenized shards of all training text")
    p.add_argument("--phases", required=True, help="END:HORIZON:DATA_DIR,... as train_builtin.sh ran them")
    p.add_argument("--assets", type=Path, default=Path(__file__).resolve().parents[1] / "babyllama" / "assets")
    a = p.parse_args()

    ckpt = checkpoint.load(a.run_dir / "ckpt.pt")
    cfg = ckpt["config"]
    a.assets.mkdir(parents=True, exist_ok=True)
    for name in ("model.bin", "tokenizer.bin"):
        shutil.copyfile(a.run_dir / name, a.assets / name)
    model, tok_path = a.assets / "model.bin", a.assets / "tokenizer.bin"
    weights = formats.load(model)
    args = weights.args
    tok = Tokenizer.load(tok_path, args.vocab_size)
    data, teacher = a.shared / "data" / "tinystories", Path(cfg["teacher"])
    valid, train_txt = data / "valid.txt", data / "train-00.txt"

    evals = eval_figures(weights, tok, valid)
    q8 = weights.quantize()
    q8_path = a.run_dir / "model-q8_0.bin"
    formats.save(q8, q8_path, version=2)
    evals["valid_q8_0"] = eval_figures(formats.load(q8_path), tok, valid)["valid"]
    evals["valid_q8_0"]["command"] = ("babyllama export q8.bin --model model.bin --version 2 && "
                                      + EVAL_COMMAND.replace("eval", "eval q8.bin --kv-cache f32"))  # Engine's own
    evals["valid_q8_0"]["file_bytes"] = q8_path.stat().st_size
    teacher_eval = eval_figures(formats.load(teacher), tok, valid)["valid"]

    shards = shard_stats(a.pool)
    real = {n: s for n, s in shards.items() if s["split"] == "train" and n.startswith("real-")}
    gen = {n: s for n, s in shards.items() if s["split"] == "train" and n.startswith("gen-")}
    heldout = {n: s for n, s in shards.items() if s["split"] == "val"}
    real_tokens, gen_tokens = sum(s["tokens"] for s in real.values()), sum(s["tokens"] for s in gen.values())
    heldout_text = text_stats(a.text / "real-heldout-val.txt")
    heldout_tokens = sum(s["tokens"] for s in heldout.values())
    bytes_per_token = heldout_text["story_bytes"] / (heldout_tokens - heldout_text["stories"])  # predicted tokens
    tokens_per_iter = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * cfg["max_seq_len"]
    gen_text = [text_stats(a.text / f"{Path(n).stem}.txt") for n in sorted(gen)]
    phases = training_phases(a.phases, tokens_per_iter)

    card = {
        "name": "babyllama-stories",
        "description": "A tiny Llama 2 story model trained by babyllama's own pipeline on a 4.7 MB slice of "
                       "TinyStories and on stories sampled from llama2.c's stories260K, distilled from "
                       "stories260K's next-token distributions; the model `babyllama run` uses when given no model.",
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
                              "format": f"llama2.c tokenizer.bin, sentencepiece BPE, {args.vocab_size} tokens: "
                                        "llama2.c's tok512.bin (trained on TinyStories), unchanged",
                              "source": LLAMA2C},
        },
        "data": {
            "license": "CDLA-Sharing-1.0",  # of the real stories; see "generated" for the sampled ones
            "dataset": "TinyStories (Ronen Eldan, Yuanzhi Li, arXiv:2305.07759; roneneldan/TinyStories on the "
                       "Hugging Face hub)",
            "train": {"file": "train-00.txt", **text_stats(train_txt),
                      "split": "by story: the first 90% is training text (real-train), the last 10% the held-out "
                               "split (real-heldout-val) that training validates on and the sweeps were scored on"},
            "real_train": {"tokens": real_tokens, "stories": sum(s["stories"] for s in real.values())},
            "heldout": {"tokens": heldout_tokens, **heldout_text},
            "generated": {
                "tokens": gen_tokens, "stories": sum(s["stories"] for s in gen.values()),
                "story_bytes": sum(g["story_bytes"] for g in gen_text), "files": {n: gen[n] for n in sorted(gen)},
                "source": "sampled from stories260K.bin by scripts/generate_stories.py (babyllama's batched "
                          "engine): every story from BOS alone, temperature 1.0, top-p 0.95, distinct seeds",
                "license": "model output of stories260K (" + LLAMA2C + "), itself trained on TinyStories "
                           "(CDLA-Sharing-1.0)",
            },
            "generated_share_of_training_tokens": round(gen_tokens / (real_tokens + gen_tokens), 4),
            "valid": {"file": "valid.txt", "stories": evals["valid"]["documents"], "bytes": valid.stat().st_size,
                      "sha256": sha256(valid), "note": "the first 188 stories of TinyStories' V1 validation split; "
                      "never trained on, used for nothing but these figures"},
            "provenance": "../shared/data/tinystories/SOURCES.md in the babyllama workspace",
        },
        "teacher": {"file": teacher.name, "sha256": sha256(teacher), "source": LLAMA2C,
                    "n_params": formats.load(teacher).args.param_count(),
                    "valid_bits_per_byte": teacher_eval["bits_per_byte"], "valid_loss": teacher_eval["loss"],
                    "kd_alpha": cfg["kd_alpha"], "kd_temperature": cfg["kd_temperature"]},
        "training": {
            "iters": ckpt["iter_num"],
            "tokens_seen": ckpt["iter_num"] * tokens_per_iter,
            "tokens_per_iter": tokens_per_iter,
            "phases": phases,
            "val_loss_in_training": round(ckpt["best_val_loss"], 4),  # held-out split, nats per token
            **time_totals(a.run_dir / "time.txt"),
            "machine": machine(),
            "config": {k: v for k, v in cfg.items() if k not in ("out_dir", "data_dir", "teacher")},
            "curve": curve(a.run_dir, tokens_per_iter, bytes_per_token),
        },
        "eval": evals,
        "eval_notes": "babyllama eval: every token after BOS of each story predicted once, windows of at most "
                      "seq_len tokens; loss in nats per token of this vocabulary, bits per byte over the UTF-8 "
                      "bytes of the stories (comparable across vocabularies). valid_q8_0: the same weights "
                      "quantized to Q8_0 (a version 2 file of file_bytes bytes). training.curve: the loss on the "
                      "held-out split during training (random 512-token windows, most of which start inside a story "
                      "without its beginning, so a little above what babyllama eval gives), also in bits per byte "
                      "of that split's story text.",
        "reproduce": "scripts/train_builtin.sh",
    }
    (a.assets / "model.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    total = sum((a.assets / n).stat().st_size for n in ("model.bin", "tokenizer.bin", "model.json"))
    print(f"installed {model} ({card['params']} params), card {a.assets / 'model.json'}; {total:,} bytes in all")
    for name in ("valid", "valid_q8_0"):
        print(f"{name}: loss {evals[name]['loss']:.4f}, bits/byte {evals[name]['bits_per_byte']:.4f}")
    print(f"teacher {teacher.name}: bits/byte {teacher_eval['bits_per_byte']:.4f}")


if __name__ == "__main__":
    main()
