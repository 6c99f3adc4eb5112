#!/bin/bash
# EAGLE-3 head, round 4, on the lent GPU machine (call 2). Env: W (work root: call 1 left
# part_a and prompts.json.gz there),
# DEV (cuda|cpu), GEN_MIN, TRAIN_MIN, GEN_BATCH, BATCH_TOKENS, OUT.
set -eo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
G=$W/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p $W/gguf
[ -f $G ] || cat $W/part_a .device/b/part > $G
echo "$(cut -d' ' -f1 .device/gguf.sha256)  $G" | sha256sum -c
[ -d $W/target ] || python3 -c "
import sys; sys.path.insert(0, 'scripts')
from pathlib import Path; from prepare_models import convert_target
convert_target(Path('$G'), Path('$W/target'))"
python3 scripts/device/fingerprint.py $W/target/model.safetensors | tee $OUT/answer.log
cmp <(tail -1 $OUT/answer.log) .device/fingerprint.txt  # the target converted here, or stop
{ nvidia-smi --query-gpu=name,driver_version --format=csv || true; } 2>&1 | tee -a $OUT/answer.log
mkdir -p $W/r4 && [ -f $W/r4/prompts.json ] || gunzip -c ${PROMPTS:-$W/prompts.json.gz} > $W/r4/prompts.json
T="python3 scripts/train_draft.py"
C="--target $W/target --work $W/r4 --device $DEV --kept-from .device/kept.safetensors"
$T answer $C --gen-batch $GEN_BATCH --docs-max-new-tokens 96 --docs-gen-minutes $GEN_MIN --answer-temperatures 0,1 2>&1 | tee -a $OUT/answer.log
python3 -c "import torch; d = torch.load('$W/r4/data.pt', weights_only=False)
torch.save({'eval_docs': [{k: r[k] for k in ('sid', 'kind', 'ids', 'n_prompt')} for r in d['eval_docs']]}, '$OUT/heldout_data.pt')"
H="--seed 1260 --lr 1e-3 --warmup 50 --batch-tokens $BATCH_TOKENS --max-len 768 --prompt-weight 0.5 --max-minutes $TRAIN_MIN"
$T eagle-train $C $H --ckpt-every 25 --eval-every 50 --eval-subset 96 2>&1 | tee $OUT/train.log
$T eagle-export $C $H --export-from best.pt --eagle-out $W/head 2>&1 | tee -a $OUT/train.log
cp $W/head/head.json $W/head/config.json $W/r4/eagle_final_eval.json $OUT/
split -b 12000000 $W/head/model.safetensors $OUT/model.safetensors.part-
ls -la $OUT
