#!/usr/bin/env bash
# GPU figures: the PyTorch engine in bf16 on CUDA, eager and compiled (torch.compile with CUDA graphs), on the
# 110M shape and a 1B-class random model (TinyLlama-1.1B's shape, a 4.4 GB fp32 file built on first use), one
# shape at a time (a shape cut off by a time limit leaves the others' tables). Needs PyTorch with CUDA and numpy;
# babyllama runs from the checkout.
#   bash benchmarks/gpu.sh [OUT_DIR] [SHAPES]      (defaults: out/gpu, 110M,1B)
# TRAIN_DATA=DIR (a shard folder from `babyllama data pretokenize`, 32000-token vocabulary) also times 40
# training steps of the 110M shape (batch 32 x 1024, bf16, compiled) into OUT_DIR/train.txt; with LLAMA2C=DIR
# (a llama2.c checkout) the same steps of its train.py on the same shards (train_llama2c.txt).
# The random models go to $MODELS_DIR (default /tmp/babyllama-bench), not OUT_DIR: when OUT_DIR is a folder
# whose files are copied back (the device tool's $OUT), a 4.4 GB model file must not be among them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}; shapes=${2:-110M,1B}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
common=(--device cuda --rounds 1 --repeats 3 --tokens 256 --batch 8 --prompt-len 256 --cache-dir "${MODELS_DIR:-/tmp/babyllama-bench}")
for shape in ${shapes//,/ }; do
    python3 -m babyllama bench "${common[@]}" --shapes "$shape" --output "$out/eager-$shape.md"
    python3 -m babyllama bench "${common[@]}" --shapes "$shape" --compile --output "$out/compiled-$shape.md"
done
[ -n "${TRAIN_DATA:-}" ] || exit 0
steps=(--dim=768 --n_layers=12 --n_heads=12 --n_kv_heads=12 --max_seq_len=1024 --batch_size=32
       --gradient_accumulation_steps=1 --max_iters=40 --eval_interval=100000 --eval_iters=2 --log_interval=1
       --warmup_iters=10 --compile=True --dtype=bfloat16)
python3 -m babyllama train --data_dir="$TRAIN_DATA" --out_dir=/tmp/babyllama-gpu-train --device=cuda \
    --always_save_checkpoint=False "${steps[@]}" 2>&1 | tee "$out/train.txt"
[ -n "${LLAMA2C:-}" ] || exit 0
# train.py reads data/TinyStories_all_data/*.bin under its working folder: the first shard is its validation split
work=$(mktemp -d); mkdir -p "$work/data/TinyStories_all_data"
cp "$LLAMA2C"/{train,model,tinystories,export,configurator,tokenizer}.py "$work"
# the shards `babyllama data pretokenize` wrote, as its meta.json lists them: a validation one first, then the rest
i=0
for shard in $(python3 -c "import json, sys; s = json.load(open(sys.argv[1]))['shards']; print(*s['val'][:1], *s['train'])" \
               "$TRAIN_DATA/meta.json"); do
    ln -s "$(realpath "$TRAIN_DATA")/$shard" "$work/data/TinyStories_all_data/data$(printf %02d $i).bin"
    i=$((i + 1))
done
(cd "$work" && python3 train.py --device=cuda --out_dir=/tmp/llama2c-gpu-train --vocab_source=llama2 \
    --vocab_size=32000 "${steps[@]}") 2>&1 | tee "$out/train_llama2c.txt"
