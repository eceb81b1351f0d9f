#!/usr/bin/env bash
# GPU figures for the README: the PyTorch engine in bf16 on CUDA, eager and compiled (torch.compile with
# CUDA graphs), on the 110M shape and a 1B-class random model (TinyLlama-1.1B's shape, a 4.4 GB fp32 file
# built on first use). Needs PyTorch with CUDA and numpy; babyllama runs from the checkout.
#   bash benchmarks/gpu.sh [OUT_DIR] [SHAPES]      (defaults: out/gpu, 110M,1B)
# The random models go to $MODELS_DIR (default /tmp/babyllama-bench), not OUT_DIR: when OUT_DIR is a folder
# whose files are copied back (the device tool's $OUT), a 4.4 GB model file must not be among them.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu}; shapes=${2:-110M,1B}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$out/device.txt"
common=(--device cuda --shapes "$shapes" --rounds 1 --repeats 3 --tokens 256 --batch 8 --prompt-len 256 --cache-dir "${MODELS_DIR:-/tmp/babyllama-bench}")
python3 -m babyllama bench "${common[@]}" --output "$out/eager.md"
python3 -m babyllama bench "${common[@]}" --compile --output "$out/compiled.md"
