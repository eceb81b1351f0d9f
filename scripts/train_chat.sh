#!/usr/bin/env bash
# Make babyllama's built-in chat model (babyllama/assets/chat.bin + chat.json) from the built-in story model
# (babyllama/assets/model.bin), in two fine-tuning stages on instruction pairs made from TinyStories training
# stories: (1) requests for a topic and three rare words from anywhere in the story, every reply token alike:
# the model learns the request format and to write about the requested character or thing; (2) from there,
# requests whose words come from the story's opening, with the loss on the first use of each requested word
# weighted 20x: it learns to use them. Then a Q8_0 export and the card with the instruction-following scores.
#
#   scripts/train_chat.sh [DATA_DIR]      (default DATA_DIR: ../shared/data/tinystories)
#
# Only DATA_DIR/train-00.txt is read (never valid.txt): `data instruct` holds the same 300 of its stories out
# in both stages (the split is seeded and comes first) for the scores. Needs the training extra (pip install
# -e '.[train]'). Re-run it whenever the base model changes: the chat model's card records the base's sha256
# and the tests check it. STAGE=2 re-runs only the second stage on an existing first one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/tinystories}
WORK=${WORK:-out/chat}
BASE=babyllama/assets/model.bin
STAGE=${STAGE:-1}
INSTRUCT=(python -m babyllama data instruct --input "$DATA/train-00.txt" --model "$BASE" --per-story 2 --val-count 300)
if [ "$STAGE" = 1 ]; then
    rm -rf "$WORK"
    # 1. requests -> stories (two requests per training story, 300 stories held out), those that fit the context
    "${INSTRUCT[@]}" --out-dir "$WORK/data"
    # 2. first stage (settings in scripts/chat.toml), timed for the card
    TUNE=(python -m babyllama finetune scripts/chat.toml --base="$BASE" --data="$WORK/data" --out_dir="$WORK/run")
    start=$(date +%s)
    "${TUNE[@]}"
    echo "$(( $(date +%s) - start ))" > "$WORK/run/seconds"
    echo "${TUNE[*]}" > "$WORK/run/command"
fi
# 3. second stage: words from the stories' openings (scripts/chat_words.toml), from the first stage's checkpoint
rm -rf "$WORK/words" "$WORK/run2"
"${INSTRUCT[@]}" --early-words 4 --out-dir "$WORK/words"
TUNE2=(python -m babyllama finetune scripts/chat_words.toml --base="$WORK/run" --data="$WORK/words" --out_dir="$WORK/run2")
start=$(date +%s)
"${TUNE2[@]}"
echo "$(( $(date +%s) - start ))" > "$WORK/run2/seconds"
echo "${TUNE2[*]}" > "$WORK/run2/command"
# 4. export as Q8_0 into babyllama/assets/chat.bin, score base and chat model on the held-out requests, card
PYTHONPATH=.:scripts python scripts/make_chat_card.py "$WORK" --base "$BASE"
