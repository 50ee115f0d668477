#!/usr/bin/env bash
# The GPU benchmarks, on a GPU host (H100/H200), in 5 to 9 minutes:
# `base` in fp32 and bf16 at batch 1 and 32, encode_image and caption (20 new tokens),
# with the Hugging Face PyTorch peer beside each, JSON written for fetching.
#
#   bash bench/gpu.sh            (from the repository root; OUT=DIR to choose where results go)
#
# It uses the GPU machine's own python3 (JAX with CUDA, PyTorch, transformers) with this
# checkout on PYTHONPATH, not the pinned CPU toolchain: timings only, no artifacts. If the
# machine's flax cannot run the model, the flax wheel we pin (.whl/flax-0.12.8-*.whl,
# fetched with `pip download --no-deps flax==0.12.8 -d .whl`) is installed beside it.
# Results: $OUT/gpu-b1.json, $OUT/gpu-b32.json (pytest-benchmark) and $OUT/gpu-report.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/capibara-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export JAX_PLATFORMS="cuda,cpu" XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
PY="${PYTHON:-python3}"
REPORT="$OUT/gpu-report.txt"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda.*|flax|torch|transformers|pytest-benchmark|numpy) "
} 2>&1 | tee "$REPORT"

smoke() {
  "$PY" - <<'PY'
import jax, numpy as np
from bench.harness import runnable
assert jax.default_backend() == "gpu", jax.default_backend()
out = runnable("tiny", "caption", "bf16", 1)()
print("smoke: tiny caption on", jax.devices()[0].device_kind, np.asarray(out).shape)
out = runnable("base", "encode_image", "bf16", 1)()   # cuDNN flash attention, unless CAPIBARA_GPU_KERNELS=xla
print("smoke: base encode_image bf16", np.asarray(out).shape, "finite:", bool(np.isfinite(np.asarray(out, np.float32)).all()))
PY
}

if ! smoke 2>&1 | tail -5 | tee -a "$REPORT"; then
  echo "gpu.sh: smoke test failed; retrying with CAPIBARA_GPU_KERNELS=xla (XLA attention, rolled loops)" | tee -a "$REPORT"
  export CAPIBARA_GPU_KERNELS=xla
  if ! smoke 2>&1 | tail -5 | tee -a "$REPORT"; then
    echo "gpu.sh: still failing; installing the pinned flax wheel beside the machine's" | tee -a "$REPORT"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/flax-*.whl || exit 3
    export PYTHONPATH="/tmp/site:$PWD"   # the carried flax wins over the machine's
    smoke 2>&1 | tail -5 | tee -a "$REPORT" || exit 3
  fi
fi

status=0
for batch in 1 32; do
  echo "== base, batch $batch" | tee -a "$REPORT"
  CAPIBARA_BENCH_BATCHES=$batch timeout 240 "$PY" -m pytest bench/test_runtime.py -q -p no:cacheprovider \
    -k "encode_image or caption" --benchmark-json "$OUT/gpu-b$batch.json" \
    --benchmark-columns=median,min,max,rounds 2>&1 | tail -30 | tee -a "$REPORT"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  [ -f "$OUT/gpu-b$batch.json" ] && COLUMNS=200 "$PY" -m capibara_export bench-report "$OUT/gpu-b$batch.json" >> "$REPORT" 2>&1
done
# If time is left: the fused GPU kernels (cuDNN attention, unrolled layers, flat dots, fast LN) against
# XLA's plain attention and rolled loops, the same programs side by side in one process.
if [ "$SECONDS" -lt 330 ] && [ "${CAPIBARA_GPU_KERNELS:-fused}" = fused ]; then
  echo "== fused GPU kernels vs CAPIBARA_GPU_KERNELS=xla (median of 20 rounds)" | tee -a "$REPORT"
  timeout 180 "$PY" - <<'PY' 2>&1 | tail -6 | tee -a "$REPORT"
import os, time
import numpy as np
from bench.harness import runnable

def median_ms(run):
    run()
    times = []
    for _ in range(20):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))

for entry, batch in (("caption", 1), ("encode_image", 32), ("caption", 32)):
    row = {}
    for kernels in ("xla", "fused"):
        os.environ["CAPIBARA_GPU_KERNELS"] = kernels
        row[kernels] = median_ms(runnable("base", entry, "bf16", batch))
    print(f"base {entry} bf16 batch {batch}: xla {row['xla']:.2f} ms, fused {row['fused']:.2f} ms "
          f"({row['xla'] / row['fused']:.2f}x)")
PY
fi
echo "gpu.sh: done in $SECONDS s" | tee -a "$REPORT"
exit "$status"
