#!/usr/bin/env bash
# Reproduce babyllama's built-in story model (babyllama/assets/model.bin, tokenizer.bin, model.json) with
# babyllama's own pipeline: data (real stories + stories sampled from a teacher), pretokenized shards,
# distillation training, export, then the model card.
#
#   scripts/train_builtin.sh [SHARED_DIR]      (default SHARED_DIR: ../shared)
#
# SHARED_DIR/data/tinystories holds train-00.txt (5,581 TinyStories stories, 4.7 MB; TinyStories by Eldan &
# Li, CDLA-Sharing-1.0) and valid.txt (188 held-out stories, used only for the card's final figures).
# SHARED_DIR/fixtures holds llama2.c's stories260K.bin and tok512.bin (MIT, Andrej Karpathy): the teacher
# and the tokenizer. Nothing is copied into the repository. Needs the training extra (pip install -e
# '.[train]').
#
# Steps: 1. train-00.txt is split by story: the last 10% is the held-out split for validation during
# training (valid.txt is never trained on or used to choose anything); 2. stories260K samples stories with
# babyllama's batched engine (two processes, disjoint seeds); 3. real and generated stories are
# pretokenized with tok512; 4. training distills stories260K into a larger student (scripts/builtin.toml)
# on one thread; 5. export (fp32) and install with the card.
#
# Training takes hours on one CPU thread. It writes ckpt.pt every eval_interval steps: stop it at any time
# and run scripts/train_builtin.sh again to continue (steps 1-3 are skipped when their outputs exist, and
# training resumes from the checkpoint in the phase it reached). To end early, shorten PHASES below (each
# END_STEP:LR_HORIZON:DATA_DIR; a horizon at the new end makes the cosine schedule end there). Results differ
# in the last digits with another thread count or machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${1:-../shared}
DATA=$SHARED/data/tinystories
TEACHER=$SHARED/fixtures/stories260K.bin
TOKENIZER=$SHARED/fixtures/tok512.bin
WORK=${WORK:-out/builtin}
GEN_STORIES=${GEN_STORIES:-5000}  # per generating process; two processes: 10,000 stories
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$WORK/text"
# 1. real stories: train-00.txt minus its last 10% (by story), which is the held-out split ("val" in the name)
if [ ! -f "$WORK/text/real-heldout-val.txt" ]; then
  $PY - "$DATA/train-00.txt" "$WORK/text" <<'EOF'
import sys
from pathlib import Path

from babyllama.documents import iter_documents

docs = list(iter_documents(sys.argv[1]))
cut = len(docs) - len(docs) // 10
for name, part in (("real-train.txt", docs[:cut]), ("real-heldout-val.txt", docs[cut:])):
    Path(sys.argv[2], name).write_text("".join(d + "\n<|endoftext|>\n" for d in part), encoding="utf-8")
EOF
fi
# 2. generated stories: stories260K at temperature 1, top-p 0.95, story i of process k with seed 1 + k*10^6 + i
for k in 0 1; do
  if [ ! -f "$WORK/text/gen-0$k.txt" ]; then
    $PY scripts/generate_stories.py "$TEACHER" "$TOKENIZER" "$WORK/text/gen-0$k.txt.part" --stories "$GEN_STORIES" \
      --seed $((1 + k * 1000000)) --temperature 1.0 --topp 0.95 && mv "$WORK/text/gen-0$k.txt.part" "$WORK/text/gen-0$k.txt" &
  fi
done
wait
[ -f "$WORK/text/gen-00.txt" ] && [ -f "$WORK/text/gen-01.txt" ]
# 3. BOS + tok512 ids of every story: one shard per text file; the held-out split is the validation shard
if [ ! -f "$WORK/tok512/meta.json" ]; then
  $PY -m babyllama data pretokenize --input "$WORK/text" --tokenizer "$TOKENIZER" --out-dir "$WORK/tok512"
fi
# 3b. the same real shards without the generated ones (the last training phase's data)
if [ ! -f "$WORK/tok-real/meta.json" ]; then
  mkdir -p "$WORK/text-real"
  cp "$WORK/text/real-train.txt" "$WORK/text/real-heldout-val.txt" "$WORK/text-real/"
  $PY -m babyllama data pretokenize --input "$WORK/text-real" --tokenizer "$TOKENIZER" --out-dir "$WORK/tok-real"
fi
# 4. distillation training (scripts/builtin.toml), timed (wall and CPU, appended per session) for the card. The
#    shipped run went in phases, each resumed from the last one's checkpoint: it was shortened once to end
#    in time (cosine horizon 4000 for steps 1250-2500), then lengthened again (horizon 5000), and from step
#    3250 on it trained on the real stories alone, which a branch from step 2500 showed to be better on the
#    held-out split by then (docs/builtin-model.md). Each phase is skipped when the checkpoint is past its end.
train_phase() {  # END_STEP LR_HORIZON DATA_DIR
  local done=0
  if [ -f "$WORK/run/ckpt.pt" ]; then
    done=$($PY -c "import sys, torch; print(torch.load(sys.argv[1], weights_only=True)['iter_num'])" "$WORK/run/ckpt.pt")
  fi
  [ "$done" -ge "$1" ] && return 0
  local resume=()
  [ "$done" -gt 0 ] && resume=(--init_from=resume)
  /usr/bin/time -v -a -o "$WORK/run/time.txt" $PY -m babyllama train scripts/builtin.toml --data_dir="$3" \
    --out_dir="$WORK/run" --teacher="$TEACHER" --max_iters="$1" --lr_decay_iters="$2" "${resume[@]}"
}
PHASES="1250:5000:$WORK/tok512,2500:4000:$WORK/tok512,3250:5000:$WORK/tok512,5000:5000:$WORK/tok-real"
mkdir -p "$WORK/run"
for phase in ${PHASES//,/ }; do
  IFS=: read -r end horizon data <<< "$phase"
  train_phase "$end" "$horizon" "$data"
done
# 5. export to a llama2.c .bin (version 1, fp32; tokenizer.bin beside it), install into babyllama/assets/ with
#    the card (config, data, steps, wall/CPU time from time.txt, babyllama eval figures incl. Q8_0)
$PY -m babyllama export "$WORK/run/model.bin" --checkpoint "$WORK/run/ckpt.pt" --version 1
PYTHONPATH=. $PY scripts/make_card.py "$WORK/run" --shared "$SHARED" --text "$WORK/text" --pool "$WORK/tok512" \
  --phases "$PHASES"
