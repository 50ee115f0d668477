"""Plans on the simulated CPU mesh: measured latency beside the roofline's prediction,
per plan, so bench-report can say how well the model ranks plans (rank correlation).

The roofline here uses this host's measured matmul rate and memory bandwidth split over
the 32 simulated devices (hardware.calibrate_cpu); its collectives are host memory copies.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bench.harness import attach, hardware, real_inputs
from capibara_export.analysis.collectives import collectives
from capibara_export.build.compile import memory_stats
from capibara_export.analysis.hlo import HloProgram
from capibara_export.build.programs import build_program, in_specs, lower
from capibara_export.analysis.roofline import roofline
from capibara_export.build.targets import get_target, make_mesh
from model import get_preset
from model.state import init_params, logical_names
from sharding import get_policy, load_plans
from sharding.precision import store

MODEL, BATCH, MESH = "tiny", 32, (4, 8)
ROUNDS = 3


@pytest.mark.parametrize("plan", list(load_plans()))
@pytest.mark.parametrize("entry", ["encode_image", "score", "caption"])
def test_plan_on_cpu_mesh(benchmark, entry, plan):
    benchmark.group = f"plans cpu-4x8 {MODEL}"
    cfg, policy = get_preset(MODEL), get_policy("fp32")
    program = build_program(cfg, entry, policy, BATCH)
    mesh = make_mesh(get_target("cpu"), MESH)
    the_plan = load_plans()[plan]
    compiled = lower(program, the_plan, mesh).compile()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), in_specs(program, the_plan),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    params = store(init_params(cfg, 0), logical_names(cfg), policy)
    args = jax.device_put((params, *real_inputs(entry, program)), shardings)
    out = benchmark.pedantic(lambda: jax.block_until_ready(compiled(*args)), rounds=ROUNDS, warmup_rounds=1)
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(out)[0], np.float32)))
    hlo = HloProgram(compiled.as_text())
    costs = hlo.costs()
    prediction = roofline(costs.flops, costs.bytes, collectives(hlo, MESH), hardware(32), policy.compute_dtype,
                          program.analytic_flops, 32)
    attach(benchmark, entry=entry, plan=plan, precision="fp32", batch=BATCH, target="cpu", model=MODEL,
           flops=costs.flops, analytic_flops=program.analytic_flops, memory_peak=memory_stats(compiled)["peak"],
           predicted_s=prediction.latency_s, items=BATCH, item_name="images", devices=32)
    benchmark.extra_info["binding"] = prediction.binding
