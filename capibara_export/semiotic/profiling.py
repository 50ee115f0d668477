"""Integrated profiling: a jax.profiler trace around a run, and what the devices report.

profile_usage() never invents a number: memory figures appear only where the backend's
device.memory_stats() returns them (GPUs and TPUs do; the CPU backend returns none).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax


def profile_usage() -> dict:
    """The first device's kind, platform and count, and its memory use where the runtime reports it."""
    devices = jax.devices()
    out = {"device_kind": devices[0].device_kind, "platform": devices[0].platform, "device_count": len(devices)}
    stats = devices[0].memory_stats()
    if stats:
        out["memory"] = {k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}
    else:
        out["memory"] = None
        out["memory_note"] = f"the {devices[0].platform} backend reports no memory statistics"
    return out


@contextlib.contextmanager
def trace(folder: str | Path | None):
    """A jax.profiler trace into `folder` (viewable in TensorBoard / Perfetto); no-op if None."""
    if folder is None:
        yield
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(folder))
    try:
        yield
    finally:
        jax.profiler.stop_trace()
