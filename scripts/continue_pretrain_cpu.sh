#!/usr/bin/env bash
# Continued pre-training of a model's encoder by the correspondence loss alone, then the
# regressor's query projection refitted to the new features: the recipe behind the latest
# models/aceg_small.safetensors (models/README.md, "Stage 1b").
#   ./scripts/continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]
# INIT: the model to continue from; OUT/model.safetensors is the encoder run's output and
# OUT/pca/model.safetensors the model to use. The bank (generated scenes, seeds 3000-3169;
# 8 of them have no camera path and are skipped) is rendered once into runs/bank-3000 and
# reused by later rounds (pretrain_data skips the scenes already there).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
INIT="${1:?usage: continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]}"
OUT="${2:?usage: continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]}"
STEPS="${3:-3000}"
SEED="${4:-0}"
BANK=runs/bank-3000
mkdir -p "$OUT"
python -m aceg_model.pretrain_data "$BANK" --first-seed 3000 --count 170 --mapping-frames 32 --query-frames 12
python -m aceg_model.pretrain --out "$OUT" --steps "$STEPS" --scenes-in-pool 8 --scene-uses 100 --bank "$BANK" \
  --init "$INIT" --lr 1e-4 --w-coords 0 --w-reproj 0 --seed "$SEED"
python -m aceg_model.pretrain_data runs/bank8 --first-seed 0 --count 8
python -m aceg_model.pretrain_regressor --model "$OUT/model.safetensors" --bank runs/bank8 --scenes 8 \
  --projection-only --out "$OUT/pca"
