#!/usr/bin/env bash
# Every benchmark that has a CUDA column, in one run, on the first GPU (bf16, sizes that fit a
# short device session: about 10 minutes on one H100/H200). Usage: bash bench/gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt"
python bench/compile.py --device cuda | tee "$out/compile.txt"
python bench/sweep.py --device cuda --dtype bfloat16 --threads 8 --prompts 1024 --pairs 64 --patch-batch 32 --rounds 3 | tee "$out/sweep.txt"
python bench/generate.py --device cuda --dtype bfloat16 --threads 8 --compile inductor cudagraphs | tee "$out/generate.txt"
echo "figures in $out"
