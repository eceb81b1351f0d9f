#!/usr/bin/env bash
# A small trained (target, draft) pair for benchmarks/speculative.py, with babyllama's own pipeline:
# TinyStories text -> tok512 shards -> two models trained from scratch -> .bin exports.
#   bash benchmarks/train_pair.sh TEXT_FILE TOKENIZER.bin OUT_DIR [ITERS]
set -euo pipefail
text=$1; tok=$2; out=$3; iters=${4:-600}
mkdir -p "$out"
mkdir -p "$out/text" && cp "$text" "$out/text/"
python -m babyllama data pretokenize --input "$out/text" --tokenizer "$tok" --out-dir "$out/shards" --workers 1
common=(--data_dir="$out/shards" --max_seq_len=256 --batch_size=16 --gradient_accumulation_steps=1
        --max_iters="$iters" --lr_decay_iters="$iters" --warmup_iters=50 --eval_interval="$iters" --eval_iters=5
        --log_interval=100 --learning_rate=2e-3 --dtype=float32 --compile=False --device=cpu)
python -m babyllama train "${common[@]}" --out_dir="$out/target" --dim=192 --n_layers=6 --n_heads=6
python -m babyllama train "${common[@]}" --out_dir="$out/draft" --dim=64 --n_layers=2 --n_heads=4
python -m babyllama export "$out/target.bin" --checkpoint "$out/target"
python -m babyllama export "$out/draft.bin" --checkpoint "$out/draft"
