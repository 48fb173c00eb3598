#!/usr/bin/env bash
# Issue 17: TVM integer kernels against onnxruntime on ViTs, side by side in one run (bench/compile_speed.py:
# each engine in its own process, interleaved rounds, medians), 2 threads.
#   1. the shared ViT-Tiny (32x32, 65 tokens), Plateau's default W8A8 export, batch 1 and 64
#   2. the same at W4A8 (4-bit weights packed two per byte in the TVM build), batch 1 and 64
#   3. timm's ViT-Tiny at 224x224 (197 tokens, random weights: speed only), W8A8 and W4A8, batch 1
# Usage: bash bench/vit_speed.sh [RUNS_DIR]    (default runs/vit-speed; ~40 minutes on 2 cores)
#   RESULTS=bench/results/vit_speed_zen2 names the JSON files (default bench/results/vit_speed_<model>.json)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-runs/vit-speed}
SHARED=${SHARED:-../shared}
DATA="$SHARED/data/cifar10"
CKPT="$SHARED/models/cifar-vit/vit_tiny_c10.pt"
TUNE=${TUNE_MINUTES:-3}
RES=${RESULTS:-bench/results/vit_speed}
mkdir -p "$RUNS" bench/results

export_vit() {  # RUN BITS [extra export args]
  local run=$1 bits=$2; shift 2
  [ -f "$run/export/manifest.json" ] || $PY -m plateau export --run "$run" --model vit_tiny_patch16_224 \
    --img-size 32 --checkpoint "$CKPT" --data "$DATA" --bits "$bits" --eval-limit 500 "$@"
}

export_vit "$RUNS/w8a8" W8A8
$PY bench/compile_speed.py --run "$RUNS/w8a8" --data "$DATA" --tune-minutes "$TUNE" \
  --out "${RES}_w8a8.json"
# --fast: round to nearest; the speed of a W4A8 file does not depend on how its weights were rounded
export_vit "$RUNS/w4a8" W4A8 --fast
$PY bench/compile_speed.py --run "$RUNS/w4a8" --data "$DATA" --tune-minutes "$TUNE" \
  --out "${RES}_w4a8.json"

# 224x224: random weights (no ImageNet checkpoint here), synthetic images at 224 for calibration and timing
R224="$RUNS/w8a8-224"
if [ ! -f "$R224/random.pt" ]; then
  mkdir -p "$R224"
  $PY - "$R224/random.pt" <<'EOF'
import sys, torch
from plateau.models import create_model
torch.manual_seed(0)
m = create_model("vit_tiny_patch16_224", num_classes=10)
torch.save({"model": m.state_dict(), "model_name": "vit_tiny_patch16_224", "num_classes": 10}, sys.argv[1])
EOF
fi
export_224() {  # RUN BITS [extra export args]: the random 224 model above, synthetic calibration images
  local run=$1 bits=$2; shift 2
  [ -f "$run/export/manifest.json" ] || $PY -m plateau export --run "$run" --checkpoint "$R224/random.pt" \
    --model vit_tiny_patch16_224 --img-size 224 --data synthetic --bits "$bits" --calib-images 128 \
    --eval-limit 64 "$@"
}
export_224 "$R224" W8A8
$PY bench/compile_speed.py --run "$R224" --data synthetic --batches 1 --tune-minutes "$TUNE" \
  --out "${RES}_w8a8_224.json"
export_224 "$RUNS/w4a8-224" W4A8 --fast
$PY bench/compile_speed.py --run "$RUNS/w4a8-224" --data synthetic --batches 1 --tune-minutes "$TUNE" \
  --out "${RES}_w4a8_224.json"
