#!/bin/bash
# Device call 1 (carry .device/a): the first half of the target's GGUF and the prompts go to
# $W for call 2; the machine's versions; the kernels check.
W=${W:-/root/w}
set -e
mkdir -p $W
cp .device/a/part $W/part_a
cp .device/a/prompts.json.gz $W/
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
PYTHONUNBUFFERED=1 timeout 150 python3 scripts/device/kernels_check.py 2>&1 | tee $OUT/kernels.txt || true
