"""Benchmark-wide setup: the CLI's process environment, with the CPU simulated as 32
devices for the mesh benchmarks, or as one device when the run holds only the runtime
benchmarks (`pytest bench/test_runtime.py`, as `make bench` runs them): measured on this
2-core host, a single-device program ran 1.3-1.6x slower in a process with 32 simulated
CPU devices than in one with one (small encode_image 39 vs 52-62 ms; docs/performance.md),
which would understate ours against the peer. JAX_PLATFORMS set by the caller wins
(bench/gpu.sh)."""

from pathlib import Path

import pytest

from capibara_export import environment

RUNTIME_FILE = Path(__file__).with_name("test_runtime.py").resolve()


def _runtime_only(args: list[str]) -> bool:
    paths = [Path(a.split("::")[0]).resolve() for a in args if not a.startswith("-")]
    return bool(paths) and all(p == RUNTIME_FILE for p in paths)


def pytest_configure(config):
    """The device count, before any benchmark module imports jax; timed runs predict with a
    calibration measured in the same run (bench/harness.py)."""
    environment.prepare(target=None, cpu_devices=1 if _runtime_only(list(config.args)) else 32)
    if not config.getoption("benchmark_disable", False):
        from bench import harness

        harness.FRESH_CALIBRATION = True


@pytest.fixture(scope="session")
def peer_times() -> dict:
    """Median seconds of the Hugging Face peer per (model, entry, precision, batch), filled
    by the peer benchmarks (which run first in test_runtime.py) and read by ours."""
    return {}


def pytest_collection_modifyitems(config, items):
    """Each entry's plans timed in turns right after its plans (_turns_after_their_plans).
    With --benchmark-disable nothing is timed, so the plan matrix's fidelity figures mean
    nothing there: keep tiny fp32 (every plan and entry, run once as a test) and deselect
    the parameters listed in test_plans.TIMED_ONLY (the timed `make bench` runs them all).
    Likewise the cold compile benchmark keeps test_compile.UNTIMED_PLANS on each target and
    precision: every plan's compile on both targets is a test elsewhere (tests/test_analysis.py
    on tpu-v4-64, tests/test_sharded_equivalence.py on the CPU mesh). The server load runs with
    the collective lockstep only: tests/test_server.py's second server runs the kv one."""
    _turns_after_their_plans(items)
    if not config.getoption("benchmark_disable", False):
        return
    from bench.test_compile import UNTIMED_PLANS
    from bench.test_plans import TIMED_ONLY

    def timed_only(item) -> bool:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname in ("test_plan_on_cpu_mesh", "test_plans_in_turns"):
            return bool(TIMED_ONLY & {params.get("model"), params.get("precision")})
        if item.originalname in ("test_server_load", "test_every_request_is_answered_once_and_correctly"):
            return params.get("live") == "kv"   # tests/test_server.py serves through the kv lockstep
        return item.originalname == "test_compile_cold" and params.get("plan") not in UNTIMED_PLANS

    keep, drop = [], []
    for item in items:
        (drop if timed_only(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _turns_after_their_plans(items) -> None:
    """Each test_plans_in_turns[model-precision-entry] right after that entry's last
    test_plan_on_cpu_mesh, which leaves it the compiled plans (none kept longer than that)."""
    def key(item) -> tuple | None:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.originalname in ("test_plan_on_cpu_mesh", "test_plans_in_turns"):
            return params.get("model"), params.get("precision"), params.get("entry")
        return None

    turns = {key(i): i for i in items if i.originalname == "test_plans_in_turns"}
    ordered = [i for i in items if i.originalname != "test_plans_in_turns"]
    for position in range(len(ordered) - 1, -1, -1):   # from the end: insertions leave earlier positions be
        k = key(ordered[position])
        if k in turns and (position + 1 == len(ordered) or key(ordered[position + 1]) != k):
            ordered.insert(position + 1, turns.pop(k))
    items[:] = ordered + list(turns.values())   # an entry none of whose plans was collected: at the end
