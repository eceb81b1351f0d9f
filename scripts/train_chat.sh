#!/usr/bin/env bash
# Make babyllama's built-in chat model (babyllama/assets/chat.bin + chat.json) from the built-in story model
# (babyllama/assets/model.bin): instruction pairs made from TinyStories training stories, one full fine-tuning
# run (settings in scripts/chat.toml), then a Q8_0 export and the card with the instruction-following scores.
#
#   scripts/train_chat.sh [DATA_DIR]      (default DATA_DIR: ../shared/data/tinystories)
#
# TUNE_ARGS (extra --key=value settings for finetune) and ASSETS (where chat.bin and chat.json go, default
# babyllama/assets) let a smoke test run the whole script small and elsewhere.
#
# Only DATA_DIR/train-00.txt is read (never valid.txt). `data instruct` shuffles its stories with seed 0 and holds
# the first 300 out for the scores (instruct_val.jsonl) and the next 200 as the dev split (instruct_dev.jsonl:
# the run's validation loss, and what the settings were chosen on); every request set below holds out the same
# stories. Needs the training extra (pip install -e '.[train]'); uses a GPU when there is one (~6 min on one
# H200); on a CPU it takes hours. Re-run it whenever the base model changes: the chat model's card records the
# base's sha256 and the tests check it.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinystories}
WORK=${WORK:-out/chat}
BASE=babyllama/assets/model.bin
INSTRUCT=(python -m babyllama data instruct --input "$DATA/train-00.txt" --model "$BASE" --val-count 300
          --dev-count 200)
rm -rf "$WORK"
# 1. requests -> stories: three rare words from the story's opening (12 requests per training story), three
#    commoner words from its opening (6 per story); and, for the scores only, rare words from anywhere in it
"${INSTRUCT[@]}" --early-words 4 --per-story 12 --out-dir "$WORK/rare"
"${INSTRUCT[@]}" --early-words 4 --per-story 6 --max-word-df 0.2 --out-dir "$WORK/common"
"${INSTRUCT[@]}" --per-story 1 --out-dir "$WORK/anywhere"
# 2. the fine-tuning data: both training sets, the rare-word dev split as validation ("val" in its name)
mkdir -p "$WORK/tune"
cp "$WORK/common/instruct_train.jsonl" "$WORK/tune/common_train.jsonl"
cp "$WORK/rare/instruct_train.jsonl" "$WORK/tune/rare_train.jsonl"
cp "$WORK/rare/instruct_dev.jsonl" "$WORK/tune/rare_dev_val.jsonl"
# 3. full fine-tuning from the story model, timed for the card
TUNE=(python -m babyllama finetune scripts/chat.toml --base="$BASE" --data="$WORK/tune" --out_dir="$WORK/run"
      ${TUNE_ARGS:-})
start=$(date +%s)
"${TUNE[@]}"
echo "$(( $(date +%s) - start ))" > "$WORK/run/seconds"
echo "${TUNE[*]}" > "$WORK/run/command"
# 4. export as Q8_0 into babyllama/assets/chat.bin, score base and chat model on the held-out requests, card
PYTHONPATH=.:scripts python scripts/make_chat_card.py "$WORK" --base "$BASE" ${ASSETS:+--assets "$ASSETS"}
