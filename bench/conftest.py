"""Benchmark-wide setup: the CLI's process environment, with the CPU simulated as 32
devices for the mesh benchmarks. JAX_PLATFORMS set by the caller wins (bench/gpu.sh)."""

import pytest

from capibara_export import environment

environment.prepare(target=None, cpu_devices=32)


@pytest.fixture(scope="session")
def peer_times() -> dict:
    """Median seconds of the Hugging Face peer per (model, entry, precision, batch), filled
    by the peer benchmarks (which run first in test_runtime.py) and read by ours."""
    return {}
