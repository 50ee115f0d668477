#!/usr/bin/env bash
# Benchmarks for a lent GPU (H100/H200), in one call of under 5 minutes:
# `base` in fp32 and bf16 at batch 1 and 32, encode_image and caption (20 new tokens),
# with the Hugging Face PyTorch peer beside each, JSON written for fetching.
#
#   device tool:  run  command="bash bench/gpu.sh"  timeout_s=420
#
# It uses the GPU machine's own python3 (JAX with CUDA, PyTorch, transformers) with this
# checkout on PYTHONPATH, not the pinned CPU toolchain: timings only, no artifacts.
# Results: $OUT/gpu.json (pytest-benchmark) and $OUT/gpu-report.txt (bench-report).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/capibara-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS="cuda,cpu" XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
PY="${PYTHON:-python3}"

missing=$("$PY" - <<'PY'
import importlib
names = ["jax", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "safetensors", "rich",
         "pytest", "pytest_benchmark", "scipy", "matplotlib"]
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu.sh: missing on this machine: $missing (carry wheels, see the device tool's README)" | tee "$OUT/gpu-report.txt"
  exit 3
fi
"$PY" -c "import jax; print('devices:', jax.devices())" | tee "$OUT/gpu-report.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/gpu-report.txt" 2>&1

"$PY" -m pytest bench/test_runtime.py -q -p no:cacheprovider -k "encode_image or caption" \
  --benchmark-json "$OUT/gpu.json" 2>&1 | tail -40 | tee -a "$OUT/gpu-report.txt"
status=${PIPESTATUS[0]}
"$PY" -m capibara_export bench-report "$OUT/gpu.json" >> "$OUT/gpu-report.txt" 2>&1
exit "$status"
