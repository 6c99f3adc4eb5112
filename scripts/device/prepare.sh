#!/bin/bash
# Here (CPU, setup done): what the two device calls carry, in .device/ (git-ignored).
# Each call carries <= 64 MiB with the working tree, which itself is ~100 MB: move
# docs/results and drafts/*/*.safetensors aside for the calls (README of scripts/device).
set -eo pipefail
cd "$(dirname "$0")/../.."
source scripts/env.sh
D=.device
mkdir -p $D/a $D/b $D/whl
G=models/.cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum $G > $D/gguf.sha256
head -c 44000000 $G > $D/a/part                 # call 1
tail -c +44000001 $G > $D/b/part                # call 2
python -c "
from safetensors.torch import load_file, save_file
kept = load_file('drafts/smollm2-135m-draft-rv/draft.safetensors')['kept_token_ids']
save_file({'kept_token_ids': kept.contiguous()}, '$D/kept.safetensors')"
python scripts/device/fingerprint.py models/smollm2-135m-instruct/model.safetensors > $D/fingerprint.txt
[ -f $D/prompts.json ] || python scripts/train_draft.py prompts --work $D \
    --docs-mix summarization=2,translation=1,instruction=1 --max-prompt-tokens 640
gzip -9 -c $D/prompts.json > $D/a/prompts.json.gz  # call 1
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d $D/whl gguf==0.19.0
du -sh $D/a $D/b
