#!/usr/bin/env bash
# The test command: sets up what the tests need, then runs them.
#   scripts/test.sh                # the whole suite (what CI runs)
#   scripts/test.sh -m kernels     # any pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --models
source scripts/env.sh
exec python -m pytest "$@"
