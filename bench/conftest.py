"""Benchmark-wide setup. JAX runs on the host CPU (simulated as 32 devices for the mesh
benchmarks) unless the caller chose platforms, as bench/gpu.sh does for a GPU."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_ID", "0"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                   ("TPU_ACCELERATOR_TYPE", "v4-32")):
    os.environ.setdefault(key, value)  # deviceless TPU compiles without libtpu's host warnings

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 32)


@pytest.fixture(scope="session")
def peer_times() -> dict:
    """Median seconds of the Hugging Face peer per (model, entry, precision, batch), filled
    by the peer benchmarks (which run first in test_runtime.py) and read by ours."""
    return {}
