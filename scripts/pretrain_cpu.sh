#!/usr/bin/env bash
# The recipe behind models/aceg_small.safetensors (see models/README.md), for one CPU machine:
# a scene bank rendered in the background while pre-training reads from it.
#   ./scripts/pretrain_cpu.sh [MINUTES] [OUT]
# On a GPU machine: scripts/gpu_pretrain.sh (several ranks share the GPU, the bank rendered on its cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
MINUTES="${1:-55}"
OUT="${2:-runs/pretrain}"
mkdir -p "$OUT"
python -m aceg_model.pretrain_data "$OUT/bank" --first-seed 0 --count 400 --mapping-frames 32 --query-frames 12 \
  >"$OUT/bank.log" 2>&1 &
BANK=$!
trap 'kill $BANK 2>/dev/null || true' EXIT
python -m aceg_model.pretrain --out "$OUT" --minutes "$MINUTES" --steps 3000 --scenes-in-pool 8 \
  --scene-uses 100 --bank "$OUT/bank"
