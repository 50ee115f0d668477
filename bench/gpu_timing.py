"""Timing and profiling helpers the GPU scripts share (bench/gpu_fidelity.py and the decode
study, tools/studies/gpu_decode.py): the median of warm calls, and a jax.profiler trace
summarised into kernels per call and GPU busy time. Hand-written: pytest-benchmark times
calls but does not read profiler traces.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np

ROUNDS = int(os.environ.get("CAPIBARA_STUDY_ROUNDS", "20"))


def median_s(run, rounds: int = ROUNDS) -> tuple[float, float]:
    """(median, 90th percentile) seconds of `rounds` calls of `run`, after 2 warm-up calls."""
    run()
    run()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.percentile(times, 90))


def kernel_summary(trace_path: pathlib.Path, calls: int) -> dict:
    """Kernels per call and GPU busy time from a jax.profiler trace.json.gz: complete events
    ('X') in processes whose name marks a GPU stream."""
    with gzip.open(trace_path, "rb") as fp:
        trace = json.load(fp)
    events = trace.get("traceEvents", [])
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu]
    if not kernels:
        return {"gpu_processes": sorted(names.values())[:12], "kernels_per_call": 0}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e.get("dur", 0) for e in kernels)
    top: dict[str, float] = {}
    for e in kernels:
        top[e.get("name", "?")[:60]] = top.get(e.get("name", "?")[:60], 0.0) + e.get("dur", 0)
    return {"kernels_per_call": len(kernels) / calls, "busy_ms_per_call": sum(e.get("dur", 0) for e in kernels)
            / calls / 1e3, "span_ms_per_call": (end - start) / calls / 1e3,
            "gpu_processes": sorted(names[p] for p in gpu)[:6],
            "top_kernels_ms_per_call": {k: v / calls / 1e3 for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]}}


def trace_summary(run, calls: int, target: pathlib.Path) -> dict:
    """Trace `calls` calls of `run` with jax.profiler, copy the trace to `target` and
    summarise its GPU kernels (kernel_summary)."""
    folder = pathlib.Path(tempfile.mkdtemp(prefix="capibara-prof-"))
    with jax.profiler.trace(str(folder)):
        for _ in range(calls):
            run()
    traces = sorted(folder.rglob("*.trace.json.gz"))
    if not traces:
        return {"error": "no trace.json.gz written",
                "files": [str(p.relative_to(folder)) for p in folder.rglob("*")][:10]}
    shutil.copyfile(traces[-1], target)
    return {"file": target.name, **kernel_summary(traces[-1], calls)}
