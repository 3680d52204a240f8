#!/usr/bin/env bash
# Continued pre-training of a model's encoder on a GPU machine, sized by wall time: the stage-1c
# recipe (correspondence loss alone, zoomed and rolled pairs) with a scene bank rendered on the
# machine's cores while several ranks share the GPU (models/README.md, "Stage 1e").
#   [RANKS=8] [RENDERERS=14] [POOL=6] [BANK=/tmp/aceg-bank] [FIRST_SEED=6000] [LR=2e-4] \
#     [WIDE_PROB=0] [PHOTO_PROB=0] [LOCAL_W=0] ./scripts/gpu_pretrain.sh INIT OUT MINUTES
# The data preparation of a step is Python on one core, so one rank leaves a GPU mostly idle;
# RANKS processes share it (gloo, gradients averaged each step: RANKS x 4 scenes per step).
# RENDERERS processes render disjoint seed ranges into BANK, which training reads as scenes
# appear; training starts once every rank has its first pool. The learning rate follows a cosine
# over MINUTES. WIDE_PROB, PHOTO_PROB and LOCAL_W are the options of the same names in
# scripts/continue_pretrain_cpu.sh (all off by default, as in stage 1e). Writes
# OUT/model.safetensors; refit the query projection afterwards as scripts/continue_pretrain_cpu.sh
# does (aceg_model.pretrain_regressor --projection-only).
# Runs with the venv's python where there is one, else python3 (a GPU machine's own torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
INIT="${1:?usage: gpu_pretrain.sh INIT OUT MINUTES}"
OUT="${2:?usage: gpu_pretrain.sh INIT OUT MINUTES}"
MINUTES="${3:?usage: gpu_pretrain.sh INIT OUT MINUTES}"
RANKS="${RANKS:-8}"
RENDERERS="${RENDERERS:-14}"
BANK="${BANK:-/tmp/aceg-bank}"
FIRST_SEED="${FIRST_SEED:-6000}"
LR="${LR:-2e-4}"
POOL="${POOL:-6}"  # scenes per rank
WIDE_PROB="${WIDE_PROB:-0}"
PHOTO_PROB="${PHOTO_PROB:-0}"
LOCAL_W="${LOCAL_W:-0}"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$BANK"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT  # no renderer left behind
for i in $(seq 0 $((RENDERERS - 1))); do
  nice -n 10 "$PY" -m aceg_model.pretrain_data "$BANK" --first-seed $((FIRST_SEED + 1000 * i)) --count 1000 \
    --mapping-frames 32 --query-frames 12 > "$BANK/render-$i.log" 2>&1 &
  PIDS+=($!)
done
NEED=$((RANKS * POOL))
alive() { for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
until [ "$(find "$BANK" -name 'scene-*[0-9].npz' | wc -l)" -ge "$NEED" ]; do
  alive || { echo "the renderers stopped before the bank had $NEED scenes: see $BANK/render-*.log" >&2; exit 1; }
  sleep 2
done
echo "bank has $NEED scenes after ${SECONDS} s; training $RANKS ranks for $MINUTES min"
OMP_NUM_THREADS=1 "$PY" -m torch.distributed.run --standalone --nproc_per_node "$RANKS" -m aceg_model.pretrain \
  --out "$OUT" --steps 1000000 --minutes "$MINUTES" --scenes-in-pool "$POOL" --scenes-per-step 4 \
  --scene-uses 100 --bank "$BANK" --init "$INIT" --lr "$LR" --w-coords 0 --w-reproj 0 --warp-prob 0.5 \
  --wide-pair-prob "$WIDE_PROB" --photo-pair-prob "$PHOTO_PROB" --w-local "$LOCAL_W"
echo "bank: $(find "$BANK" -name 'scene-*[0-9].npz' | wc -l) scenes rendered in ${SECONDS} s"
