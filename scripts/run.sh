#!/usr/bin/env bash
# Launches a run on every GPU of this machine (8 for the speedrun). Extra arguments go to
# train_gpt.py, e.g. `scripts/run.sh --seed 1`. NPROC overrides the process count.
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-8}"
exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
