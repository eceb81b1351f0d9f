#!/usr/bin/env bash
# Make babyllama's built-in chat model (babyllama/assets/chat.bin + chat.json) from the built-in story model
# (babyllama/assets/model.bin): instruction pairs made from TinyStories training stories, a fine-tune, a Q8_0
# export and the card, with the instruction-following scores of the base and of the chat model.
#
#   scripts/train_chat.sh [DATA_DIR]      (default DATA_DIR: ../shared/data/tinystories)
#
# Only DATA_DIR/train-00.txt is read (never valid.txt): `data instruct` holds 300 of its stories out for the
# scores. Needs the training extra (pip install -e '.[train]'). Re-run it whenever the base model changes: the
# chat model's card records the base's sha256 and the tests check it.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinystories}
WORK=${WORK:-out/chat}
BASE=babyllama/assets/model.bin
rm -rf "$WORK"

# 1. requests -> stories (two requests per training story, 300 stories held out), those that fit the context
python -m babyllama data instruct --input "$DATA/train-00.txt" --out-dir "$WORK/data" --model "$BASE" \
    --per-story 2 --val-count 300
# 2. fine-tune (settings in scripts/chat.toml), timed for the card
TUNE=(python -m babyllama finetune scripts/chat.toml --base="$BASE" --data="$WORK/data" --out_dir="$WORK/run")
start=$(date +%s)
"${TUNE[@]}"
seconds=$(( $(date +%s) - start ))
# 3. export as Q8_0 into babyllama/assets/chat.bin, score base and chat model on the held-out requests, card
PYTHONPATH=.:scripts python scripts/make_chat_card.py "$WORK" --base "$BASE" --train-seconds "$seconds" \
    --command "${TUNE[*]}"
