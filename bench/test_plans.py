"""Plans on the simulated CPU mesh: measured latency beside the roofline's prediction,
per plan, so bench-report can say how well the model ranks plans (Spearman rank
correlation) and how close it comes (median relative error), per model, precision and entry.

The roofline here is the per-kernel model with this host's calibration over the 32
simulated devices (analysis/calibration.py: achievable GEMM rate and bandwidth, launch,
loop and call overheads); its collectives are host memory copies. The whole matrix (tiny
and small, fp32 and bf16, four entries, every plan) runs when benchmarks are timed; under
`make test` (--benchmark-disable, nothing timed) only tiny fp32 runs, once per unit
(bench/conftest.py deselects the rest).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bench.harness import attach, hardware, real_inputs
from capibara_export.analysis.collectives import collectives
from capibara_export.analysis.hlo import HloProgram
from capibara_export.analysis.roofline import roofline
from capibara_export.build.compile import memory_stats
from capibara_export.build.programs import build_program, in_specs, lower, place
from capibara_export.build.targets import get_target, make_mesh
from model import get_preset
from model.state import abstract_params, init_params, logical_names
from sharding import get_policy, load_plans
from sharding.precision import store
from sharding.validity import check

MESH = (4, 8)
# small at batch 8 and 3 rounds: its replicated and hidden plans run the whole batch on
# each of the 32 simulated devices (2 cores), about 2 minutes a unit at batch 32. At batch 8
# dp and fsdp (batch over all 32 devices) are invalid for small, so its ranking has 3 plans;
# CAPIBARA_PLANS_SMALL_BATCH=32 ranks all of them (about 35 minutes for fp32; performance.md)
BATCH = {"tiny": 32, "small": int(os.environ.get("CAPIBARA_PLANS_SMALL_BATCH", "8"))}
ROUNDS = {"tiny": 5, "small": 3}
MODELS, PRECISIONS = ("tiny", "small"), ("fp32", "bf16")
TIMED_ONLY = {"small", "bf16"}  # parameters bench/conftest.py deselects when nothing is timed


@pytest.mark.parametrize("plan", list(load_plans()))
@pytest.mark.parametrize("entry", ["encode_image", "score", "caption", "decode_step"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_plan_on_cpu_mesh(benchmark, model, precision, entry, plan):
    benchmark.group = f"plans cpu-4x8 {model} {precision}"
    cfg, policy = get_preset(model), get_policy(precision)
    program = build_program(cfg, entry, policy, BATCH[model])
    validity = check(load_plans()[plan], logical_names(cfg), abstract_params(cfg), program.axis_sizes,
                     {"data": MESH[0], "model": MESH[1]})
    if not validity.ok:  # the build records such a unit as invalid and never runs it
        pytest.skip(f"{plan} is invalid for {model}: {validity.reason}")
    mesh = make_mesh(get_target("cpu"), MESH)
    the_plan = load_plans()[plan]
    compiled = lower(program, the_plan, mesh).compile()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), in_specs(program, the_plan),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    params = store(init_params(cfg, 0), logical_names(cfg), policy)
    host_args = (params, *real_inputs(entry, program))
    if program.donate:  # decode_step donates its cache: every round gets its own copy (not timed)
        out = benchmark.pedantic(lambda *a: jax.block_until_ready(compiled(*a)),
                                 setup=lambda: (place(host_args, shardings), {}), rounds=ROUNDS[model],
                                 warmup_rounds=1)
    else:
        args = place(host_args, shardings)
        out = benchmark.pedantic(lambda: jax.block_until_ready(compiled(*args)), rounds=ROUNDS[model], warmup_rounds=1)
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(out)[0], np.float32)))
    hlo = HloProgram(compiled.as_text())
    costs = hlo.costs()
    prediction = roofline(costs.flops, costs.bytes, collectives(hlo, MESH), hardware(32), policy.compute_dtype,
                          program.analytic_flops, 32, profile=hlo.kernel_profile())
    attach(benchmark, entry=entry, plan=plan, precision=precision, batch=BATCH[model], target="cpu", model=model,
           flops=costs.flops, analytic_flops=program.analytic_flops, memory_peak=memory_stats(compiled)["peak"],
           predicted_s=prediction.latency_s, items=BATCH[model], item_name="images", devices=32,
           compute_dtype=policy.compute_dtype)
    benchmark.extra_info["binding"] = prediction.binding
    # the whole-program roofline of before the per-kernel model, for the before/after in docs
    benchmark.extra_info["predicted_whole_program_s"] = roofline(
        costs.flops, costs.bytes, collectives(hlo, MESH), hardware(32), policy.compute_dtype,
        program.analytic_flops, 32).latency_s
