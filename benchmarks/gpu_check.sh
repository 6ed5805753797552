#!/usr/bin/env bash
# The first GPU check: step times (CE, twins, full GAL; PreAct ResNet-18, batch
# 128, float32 and bfloat16, XLA), peak GPU memory, a 3-epoch run against its
# floor, and the versions, in one JSON. Stops after 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]    # default: gpu_check/
#
# Keep the compiled XLA programs between calls:
#   TF_XLA_FLAGS=--tf_xla_persistent_cache_directory=$HOME/.cache/galkeras-xla
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout 480 python benchmarks/gpu_check.py --out="$out"
cat "$out/gpu_check.json"
