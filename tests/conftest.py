"""Test-wide setup: JAX on the host CPU, simulated as 32 devices so the 4x8 mesh plans run.

Must run before anything imports jax; pytest imports conftest.py first.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 32)
