#!/usr/bin/env bash
# The main job: plain decoding vs CM-ASD on the real SmolLM2 pair.
#   scripts/demo.sh [vllm-cmasd demo options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --models
source scripts/env.sh
exec vllm-cmasd demo "$@"
