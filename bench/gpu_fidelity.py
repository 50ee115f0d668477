"""How well the per-kernel roofline predicts a GPU (issue 13, item 4): the four figures
(encode_image and caption, batch 1 and 32, `base` bf16) measured on the local GPU beside
the calibrated model's prediction and the whole-program roofline's, with the kernel
launches the HLO reader counts checked against a jax.profiler trace.

On a GPU host, from the repository root (about 7 minutes on an H100; results in $OUT,
default /tmp/capibara-gpu):

    JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false python -m bench.gpu_fidelity

The calibration (analysis/calibration.py: GEMMs, a copy, launch, loop and call overheads)
is measured first on this GPU and written to $OUT/calibration.json; then each program is
compiled (bench/harness.runnable, the default GPU kernels), timed (2 warm-ups, median of
ROUNDS calls ending in block_until_ready), predicted both ways, and profiled (3 calls).
Rows go to $OUT/gpu-fidelity.json as they come, the optimized HLO of each program to
$OUT/hlo-*.txt.gz, so the model can be studied afterwards on a host without a GPU.
Written by hand: no benchmark library compares a cost model with measurements.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np

from bench import harness
from bench.gpu_timing import ROUNDS, median_s, trace_summary
from capibara_export.analysis.calibration import calibrated
from capibara_export.analysis.hardware import for_device_kind
from capibara_export.analysis.roofline import roofline
from sharding.precision import get_policy

MODEL = os.environ.get("CAPIBARA_STUDY_MODEL", "base")   # "tiny" for a dry run on a CPU
OUT = pathlib.Path(os.environ.get("OUT", "/tmp/capibara-gpu"))
FIGURES = [("encode_image", 1), ("encode_image", 32), ("caption", 1), ("caption", 32)]
rows: list[dict] = []


def record(row: dict, hardware=None) -> None:
    rows.append(row)
    (OUT / "gpu-fidelity.json").write_text(json.dumps(
        {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": MODEL, "rounds": ROUNDS,
         "calibration": None if hardware is None else hardware.calibration, "rows": rows}, indent=1))
    print(json.dumps(row), flush=True)


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CAPIBARA_CALIBRATION_CACHE", str(OUT / "calibration.json"))
    device = jax.devices()[0]
    table = for_device_kind(device.device_kind)
    if table is None and MODEL == "base":
        print("gpu_fidelity: no known GPU here; set CAPIBARA_STUDY_MODEL=tiny for a dry run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    hardware = calibrated(table, [device]) if table is not None else harness.hardware()
    record({"calibration_s": time.perf_counter() - t0, "kernel_overhead": hardware.kernel_overhead,
            "loop_overhead": hardware.loop_overhead, "call_overhead": hardware.call_overhead,
            "achieved_bf16_flops": hardware.achieved_bf16_flops, "achieved_bandwidth": hardware.achieved_bandwidth,
            "note": hardware.calibration}, hardware)
    for entry, batch in FIGURES:
        name = f"{entry}-b{batch}"
        try:
            t = time.perf_counter()
            run = harness.runnable(MODEL, entry, "bf16", batch)
            compile_s = time.perf_counter() - t
            (OUT / f"hlo-{name}.txt.gz").write_bytes(gzip.compress(run.compiled.as_text().encode()))
            measured = median_s(run)[0]   # 2 warm-ups, median of CAPIBARA_STUDY_ROUNDS calls
        except Exception as err:  # one program that fails is a result, not the end of the run
            record({"figure": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}, hardware)
            continue
        dtype = get_policy("bf16").compute_dtype
        model = roofline(run.flops, run.bytes_accessed, [], hardware, dtype, run.analytic_flops, 1,
                         profile=run.profile)
        whole = roofline(run.flops, run.bytes_accessed, [], table or hardware, dtype, run.analytic_flops, 1)
        row = {"figure": name, "compile_s": compile_s, "measured_ms": 1e3 * measured,
               "predicted_ms": 1e3 * model.latency_s, "error": (model.latency_s - measured) / measured,
               "whole_program_ms": 1e3 * whole.latency_s, "whole_error": (whole.latency_s - measured) / measured,
               "binding": model.binding, "compute_ms": 1e3 * model.compute_s, "memory_ms": 1e3 * model.memory_s,
               "overhead_ms": 1e3 * model.overhead_s, "launches_hlo": model.kernels,
               "iterations": run.profile.iterations, "mfu": run.analytic_flops / measured / table.peak_flops(dtype)
               if table else None}
        try:
            row["profile"] = trace_summary(run, 3, OUT / f"prof-{name}.trace.json.gz")
        except Exception as err:
            row["profile"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        record(row, hardware)
    errors = [abs(r["error"]) for r in rows if "measured_ms" in r]
    if errors:
        print(f"gpu_fidelity: median |predicted - measured| / measured {np.median(errors):.0%} over {len(errors)} "
              f"figures; done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
