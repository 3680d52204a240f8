#!/usr/bin/env bash
# Continued pre-training of a model's encoder by the correspondence loss alone, then the
# regressor's query projection refitted to the new features: the recipe behind the latest
# models/aceg_small.safetensors (models/README.md, "Stage 1b", "Stage 1c" and "Stage 1f";
# stage 1f: BANK_FIRST_SEED=5000 WARP_PROB=0.5 FINE_W=0.5 from stage 1c).
#   [BANK_FIRST_SEED=S] [WARP_PROB=P] [WIDE_PROB=P] [PHOTO_PROB=P] [LOCAL_W=W] [FINE_W=W] [FINE_PARTS=P] [FINE_PHOTO_P=P] [FINE_PHOTO_EXTRA=N] [EPI_W=W] [EPI_FINE_W=W] ./scripts/continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]
# INIT: the model to continue from; OUT/model.safetensors is the encoder run's output and
# OUT/pca/model.safetensors the model to use. The bank (170 generated scenes from seed
# BANK_FIRST_SEED, default 3000; the few without a camera path are skipped) is rendered into
# runs/bank-BANK_FIRST_SEED beside the training, which takes scenes as they appear, and is
# reused by later rounds (pretrain_data skips the scenes already there). WARP_PROB (default 0):
# the probability that a pair's second view is zoomed and rolled (stage 1c: 0.5). WIDE_PROB
# (default 0): the probability that a pair is drawn among those that see the same surfaces
# 20-60 degrees apart. PHOTO_PROB (default 0): the probability that a pair is two views of a real
# photo on a plane (aceg_model/photo_pairs.py). LOCAL_W (default 0): the weight of the local
# correspondence loss (each match against the features 3-12 px beside it). FINE_W (default 0): the
# weight of the fine-scale term (matches in crops encoded at 3x the working height, where the pixel
# refinement works; aceg_model/pretrain.py, fine_crop_loss). FINE_PARTS (default both): the fine
# term's halves, both, nce (its InfoNCE among the crop's matches alone) or local (its loss against
# the features beside each match alone). FINE_PHOTO_P (default 0): the probability that a fine pair is
# two views of a real photo rendered at 480 px (a 640x480 camera's sharpness) instead of the rendered
# pair (aceg_model/photo_pairs.py, vga_photo_pairs). FINE_PHOTO_EXTRA (default 0): such photo pairs per
# iteration beside the rendered fine pairs, in a term of their own at FINE_W. EPI_W (default 0): the weight of the epipolar term (pairs
# of real posed photos, each point's matches asked to lie on its epipolar line;
# aceg_model/epipolar_pairs.py). EPI_FINE_W (default 0; needs EPI_W): the weight of the same term at
# the fine scale (crops of the pair's photos at 3x the working height; pretrain.py, fine_epipolar_loss).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
INIT="${1:?usage: continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]}"
OUT="${2:?usage: continue_pretrain_cpu.sh INIT OUT [STEPS] [SEED]}"
STEPS="${3:-3000}"
SEED="${4:-0}"
BANK_FIRST_SEED="${BANK_FIRST_SEED:-3000}"
WARP_PROB="${WARP_PROB:-0}"
WIDE_PROB="${WIDE_PROB:-0}"
PHOTO_PROB="${PHOTO_PROB:-0}"
LOCAL_W="${LOCAL_W:-0}"
FINE_W="${FINE_W:-0}"
FINE_PARTS="${FINE_PARTS:-both}"
FINE_PHOTO_P="${FINE_PHOTO_P:-0}"
FINE_PHOTO_EXTRA="${FINE_PHOTO_EXTRA:-0}"
EPI_W="${EPI_W:-0}"
EPI_FINE_W="${EPI_FINE_W:-0}"
BANK="runs/bank-$BANK_FIRST_SEED"
mkdir -p "$OUT"
python -m aceg_model.pretrain_data "$BANK" --first-seed "$BANK_FIRST_SEED" --count 170 --mapping-frames 32 \
  --query-frames 12 > "$OUT/bank.log" 2>&1 &
BANK_PID=$!
trap 'kill "$BANK_PID" 2>/dev/null || true' EXIT  # no renderer left behind if training fails
sleep 20  # the first scenes; training waits for more as it needs them
python -m aceg_model.pretrain --out "$OUT" --steps "$STEPS" --scenes-in-pool 8 --scene-uses 100 --bank "$BANK" \
  --init "$INIT" --lr 1e-4 --w-coords 0 --w-reproj 0 --seed "$SEED" --warp-prob "$WARP_PROB" \
  --wide-pair-prob "$WIDE_PROB" --photo-pair-prob "$PHOTO_PROB" \
  --w-local "$LOCAL_W" --w-fine "$FINE_W" --fine-parts "$FINE_PARTS" --fine-photo-prob "$FINE_PHOTO_P" \
  --fine-photo-extra "$FINE_PHOTO_EXTRA" --w-epi "$EPI_W" --w-epi-fine "$EPI_FINE_W"
wait "$BANK_PID"
trap - EXIT
python -m aceg_model.pretrain_data runs/bank8 --first-seed 0 --count 8
python -m aceg_model.pretrain_regressor --model "$OUT/model.safetensors" --bank runs/bank8 --scenes 8 \
  --projection-only --out "$OUT/pca"
