#!/usr/bin/env bash
# One command from a fresh machine to a record log: fetch the FineWeb shards the run needs
# (nothing if they are there, or if --train-files points elsewhere), then launch one process
# per GPU. Arguments go to train_gpt.py, e.g. `scripts/run.sh --seed 1`; NPROC sets the
# process count (default 8).
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-8}"
for arg in "$@"; do  # --plan prints the run and touches nothing: no download, no GPU
    if [ "$arg" = "--plan" ]; then exec python train_gpt.py "$@"; fi
done
python data/cached_fineweb10B.py --run-args "$@"
exec torchrun --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
