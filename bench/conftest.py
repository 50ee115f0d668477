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


def pytest_configure(config):
    """Timed runs predict with a calibration measured in the same run (bench/harness.py)."""
    if not config.getoption("benchmark_disable", False):
        from bench import harness

        harness.FRESH_CALIBRATION = True


def pytest_collection_modifyitems(config, items):
    """With --benchmark-disable nothing is timed, so the plan matrix's fidelity figures mean
    nothing there: keep tiny fp32 (every plan and entry, run once as a test) and deselect
    the parameters listed in test_plans.TIMED_ONLY (the timed `make bench` runs them all)."""
    if not config.getoption("benchmark_disable", False):
        return
    from bench.test_plans import TIMED_ONLY

    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        timed_only = item.originalname == "test_plan_on_cpu_mesh" and \
            TIMED_ONLY & {params.get("model"), params.get("precision")}
        (drop if timed_only else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
