"""Compile: lower + compile time per plan × precision for `small`, on the simulated CPU
mesh and on tpu-v4-64 (deviceless, the default target), cold (no cache of any kind) and warm (a re-run of the
build with nothing changed, answered from the result cache)."""

from __future__ import annotations

import pytest

from bench.harness import attach
from capibara_export.matrix.driver import BuildRequest, run_build
from capibara_export.matrix.cache import jax_cache_disabled
from capibara_export.analysis.collectives import collectives
from capibara_export.matrix.compile import memory_stats
from capibara_export.analysis.hlo import HloProgram
from capibara_export.matrix.programs import build_program, lower
from capibara_export.analysis.roofline import roofline
from capibara_export.matrix.targets import get_target, hardware_for, make_mesh
from model import get_preset
from model.state import abstract_params, logical_names
from sharding import get_policy, load_plans
from sharding.validity import check

MODEL, ENTRY, BATCH, MESH = "small", "encode_image", 32, (4, 8)
TARGETS = ["cpu", "tpu-v4-64"]
PRECISIONS = ["fp32", "bf16"]
UNTIMED_PLANS = {"dp"}   # what `make test` (--benchmark-disable) compiles per target and precision


def _valid_plans() -> list[str]:
    cfg = get_preset(MODEL)
    sizes = {**cfg.axis_sizes(), "batch": {BATCH}}
    return [p.name for p in load_plans().values()
            if check(p, logical_names(cfg), abstract_params(cfg), sizes, {"data": MESH[0], "model": MESH[1]}).ok]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("plan", _valid_plans())
@pytest.mark.parametrize("target", TARGETS)
def test_compile_cold(benchmark, target, plan, precision):
    benchmark.group = f"compile cold {target}"
    cfg, policy = get_preset(MODEL), get_policy(precision)
    program = build_program(cfg, ENTRY, policy, BATCH)
    mesh = make_mesh(get_target(target), MESH)
    the_plan = load_plans()[plan]

    def compile_once():
        with jax_cache_disabled():
            return lower(program, the_plan, mesh).compile()

    compiled = benchmark.pedantic(compile_once, rounds=2, warmup_rounds=0)
    hlo = HloProgram(compiled.as_text())
    costs, found = hlo.costs(), collectives(hlo, MESH)
    memory = memory_stats(compiled)
    hw = hardware_for(get_target(target), mesh)
    prediction = roofline(costs.flops, costs.bytes, found, hw, policy.compute_dtype, program.analytic_flops, 32,
                          profile=hlo.kernel_profile()) if hw.peak_bf16_flops else None
    attach(benchmark, entry=ENTRY, plan=plan, precision=precision, batch=BATCH, target=target, model=MODEL,
           flops=costs.flops, analytic_flops=program.analytic_flops, memory_peak=memory["peak"],
           predicted_s=prediction.latency_s if prediction else 0.0, items=1, item_name="compiles", devices=32,
           compute_dtype=policy.compute_dtype, runs_the_program=False)
    assert memory["peak"] > 0 and costs.flops > 0


@pytest.mark.parametrize("target", TARGETS)
def test_compile_warm(benchmark, target, tmp_path):
    """Every valid plan × precision of the cold group, re-run through the build's result cache.
    Under `make test` (benchmarks disabled: nothing is timed) two plans at one precision
    prove the same path at a sixth of the cold compiles."""
    benchmark.group = f"compile warm {target}"
    plans, precisions = (_valid_plans()[:2], PRECISIONS[:1]) if benchmark.disabled else (_valid_plans(), PRECISIONS)
    request = BuildRequest(target=target, mesh=MESH, model=MODEL, entries=(ENTRY,), plans=tuple(plans),
                           precisions=tuple(precisions), batches=(BATCH,), out=tmp_path)
    run_build(request)  # cold: fills the cache (not timed)
    result = benchmark.pedantic(lambda: run_build(request), rounds=2, warmup_rounds=0)
    assert all(r.cached for r in result.records)
    attach(benchmark, entry=ENTRY, plan="all", precision="+".join(PRECISIONS), batch=BATCH, target=target,
           model=MODEL, flops=0, analytic_flops=0, memory_peak=0, predicted_s=0.0, items=len(result.records),
           item_name="units", devices=32, runs_the_program=False)
