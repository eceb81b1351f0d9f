#!/usr/bin/env bash
# Reproduce babyllama's built-in story model (babyllama/assets/model.bin, tokenizer.bin, model.json) with
# babyllama's own pipeline: vocabulary, pretokenized shards, training, export, then the model card.
#
#   scripts/train_builtin.sh [DATA_DIR]      (default DATA_DIR: ../shared/data/tinystories)
#
# DATA_DIR holds train-00.txt (5,581 TinyStories stories, 4.7 MB) and valid.txt (188 held-out stories),
# TinyStories by Eldan & Li under CDLA-Sharing-1.0. The data is never copied into the repository.
# Needs the training extra (pip install -e '.[train]'). The shipped model trained for ~20 minutes on one
# thread of a shared 2-core AMD EPYC (OMP_NUM_THREADS=1 was 3-5x faster than 2 threads there while other
# jobs shared the cores); results differ in the last digits with another thread count or machine.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinystories}
WORK=${WORK:-out/builtin}
VOCAB=4096

# 1. a sentencepiece BPE vocabulary learned from the training stories only
python -m babyllama data train-vocab --vocab-size "$VOCAB" --input "$DATA/train-00.txt" --data-dir "$WORK/data"
# 2. BOS + tokens of every story; train-00.txt -> train shard, valid.txt -> validation shard (name has "val")
python -m babyllama data pretokenize --vocab-size "$VOCAB" --input "$DATA" --data-dir "$WORK/data"
# 3. train (settings in scripts/builtin.toml), timed for the card
start=$(date +%s)
python -m babyllama train scripts/builtin.toml --data_dir="$WORK/data/tok$VOCAB" --out_dir="$WORK/run"
seconds=$(( $(date +%s) - start ))
# 4. export to a llama2.c .bin (version 1, fp32); tokenizer.bin goes beside it
python -m babyllama export "$WORK/run/model.bin" --checkpoint "$WORK/run/ckpt.pt"
# 5. install into babyllama/assets/ and write the card (config, data, steps, babyllama eval figures)
PYTHONPATH=. python scripts/make_card.py "$WORK/run" --data "$DATA" --train-seconds "$seconds"
