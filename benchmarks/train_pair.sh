#!/usr/bin/env bash
# A trained (target, draft) pair for benchmarks/speculative.py, made with babyllama's own pipeline. The draft
# is the built-in model (1.27M parameters, babyllama/assets); the target is a 6.6M-parameter model trained
# from scratch on the same TinyStories slice with the same 512-token tokenizer, so the two share a vocabulary.
#   bash benchmarks/train_pair.sh [DATA_DIR] [OUT_DIR] [ITERS]
# (defaults: ../shared/data/tinystories, out/pair, 420 steps of 8 x 256 tokens)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/tinystories}; out=${2:-out/pair}; iters=${3:-420}
warmup=$(( iters < 300 ? iters / 10 : 30 ))  # within the schedule of a short run
mkdir -p "$out"
python -m babyllama data pretokenize --input "$data" --tokenizer babyllama/assets/tokenizer.bin \
    --out-dir "$out/shards" --workers 1
python -m babyllama train --data_dir="$out/shards" --out_dir="$out/target" --dim=256 --n_layers=8 --n_heads=8 \
    --max_seq_len=256 --batch_size=8 --max_iters="$iters" --lr_decay_iters="$iters" --warmup_iters="$warmup" \
    --learning_rate=1e-3 --min_lr=1e-4 --eval_interval="$iters" --eval_iters=10 --log_interval=20 \
    --dtype=float32 --compile=False --device=cpu
python -m babyllama export "$out/target.bin" --checkpoint "$out/target"
cp babyllama/assets/model.bin "$out/draft.bin"
cp babyllama/assets/tokenizer.bin "$out/tokenizer.bin"
echo "python benchmarks/speculative.py $out/target.bin $out/draft.bin -z $out/tokenizer.bin"
