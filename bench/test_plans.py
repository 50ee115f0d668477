"""Plans on the simulated CPU mesh: measured latency beside the roofline's prediction,
per plan, so bench-report can say how well the model ranks plans (Spearman rank
correlation) and how close it comes (median relative error), per model, precision and entry.
Each entry's plans are timed twice: each alone (test_plan_on_cpu_mesh, a benchmark per plan)
and then side by side, every plan once per round (test_plans_in_turns), which is what the
ranking is judged on.

The roofline here is the per-kernel model with this host's calibration over the 32
simulated devices (analysis/calibration.py: achievable GEMM rate and bandwidth, launch,
loop and call overheads); its collectives are host memory copies. When benchmarks are timed,
tiny runs in fp32 and bf16, four entries, every plan (with CAPIBARA_BENCH_PLANS=full, small
too: 23 minutes more on a 2-core host); under
`make test` (--benchmark-disable, nothing timed) only tiny fp32 runs, once per unit
(bench/conftest.py deselects the rest).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bench.harness import attach, hardware, real_inputs
from capibara_export import compiler_options
from capibara_export.analysis.collectives import collectives
from capibara_export.analysis.hlo import HloProgram
from capibara_export.analysis.roofline import Roofline, roofline
from capibara_export.matrix.compile import memory_stats
from capibara_export.matrix.programs import build_program, in_specs, lower, place
from capibara_export.matrix.targets import get_target, make_mesh
from model import get_preset
from model.random_params import init_params
from model.state import abstract_params, logical_names
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
# The timed default is tiny (every plan, both precisions, four entries: 48 plans, 8 rankings,
# ~3 minutes here); `small` adds 23 minutes of the 2-core host's time for 24 more plans, so it runs
# only when asked: CAPIBARA_BENCH_PLANS=full pytest bench/test_plans.py (make bench-plans-full).
FULL_STUDY = os.environ.get("CAPIBARA_BENCH_PLANS", "") == "full"
MODELS, PRECISIONS = ("tiny", "small") if FULL_STUDY else ("tiny",), ("fp32", "bf16")
ENTRIES = ("encode_image", "score", "caption", "decode_step")
TIMED_ONLY = {"small", "bf16"}  # parameters bench/conftest.py deselects when nothing is timed
# Units test_plan_on_cpu_mesh compiled, kept for their entry's test_plans_in_turns (which
# bench/conftest.py runs right after the entry's last plan) and dropped there.
_COMPILED: dict[tuple[str, str, str, str], PlanUnit] = {}


@dataclass
class PlanUnit:
    """One plan of one entry compiled on the mesh, its inputs and the roofline's prediction."""
    compiled: jax.stages.Compiled
    host_args: tuple
    shardings: object
    donates: bool
    prediction: Roofline
    whole_program_s: float    # the whole-program roofline of before the per-kernel model
    flops: float
    analytic_flops: float
    placed: tuple | None = None

    def args(self) -> tuple:
        """Inputs on the mesh; placed again for every call of a program that donates them."""
        if self.donates or self.placed is None:
            self.placed = place(self.host_args, self.shardings)
        return self.placed


def _validity(model: str, precision: str, entry: str, plan: str):
    program = build_program(get_preset(model), entry, get_policy(precision), BATCH[model])
    return check(load_plans()[plan], logical_names(get_preset(model)), abstract_params(get_preset(model)),
                 program.axis_sizes, {"data": MESH[0], "model": MESH[1]})


def _compile(model: str, precision: str, entry: str, plan: str) -> PlanUnit:
    cfg, policy = get_preset(model), get_policy(precision)
    program = build_program(cfg, entry, policy, BATCH[model])
    mesh = make_mesh(get_target("cpu"), MESH)
    the_plan = load_plans()[plan]
    compiled = lower(program, the_plan, mesh).compile(compiler_options=compiler_options.for_devices(mesh.devices.flat))
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), in_specs(program, the_plan),
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    params = store(init_params(cfg, 0), logical_names(cfg), policy)
    hlo = HloProgram(compiled.as_text())
    costs, found = hlo.costs(), collectives(hlo, MESH)
    prediction = roofline(costs.flops, costs.bytes, found, hardware(32), policy.compute_dtype,
                          program.analytic_flops, 32, profile=hlo.kernel_profile())
    whole = roofline(costs.flops, costs.bytes, found, hardware(32), policy.compute_dtype, program.analytic_flops, 32)
    return PlanUnit(compiled, (params, *real_inputs(entry, program)), shardings, bool(program.donate), prediction,
                    whole.latency_s, costs.flops, program.analytic_flops)


@pytest.mark.parametrize("plan", list(load_plans()))
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_plan_on_cpu_mesh(benchmark, model, precision, entry, plan):
    benchmark.group = f"plans cpu-4x8 {model} {precision}"
    validity = _validity(model, precision, entry, plan)
    if not validity.ok:  # the build records such a unit as invalid and never runs it
        pytest.skip(f"{plan} is invalid for {model}: {validity.reason}")
    unit = _compile(model, precision, entry, plan)
    if unit.donates:  # decode_step donates its cache: every round gets its own copy (not timed)
        out = benchmark.pedantic(lambda *a: jax.block_until_ready(unit.compiled(*a)),
                                 setup=lambda: (unit.args(), {}), rounds=ROUNDS[model], warmup_rounds=1)
    else:
        args = unit.args()
        out = benchmark.pedantic(lambda: jax.block_until_ready(unit.compiled(*args)), rounds=ROUNDS[model],
                                 warmup_rounds=1)
    assert np.all(np.isfinite(np.asarray(jax.tree.leaves(out)[0], np.float32)))
    attach(benchmark, entry=entry, plan=plan, precision=precision, batch=BATCH[model], target="cpu", model=model,
           flops=unit.flops, analytic_flops=unit.analytic_flops, memory_peak=memory_stats(unit.compiled)["peak"],
           predicted_s=unit.prediction.latency_s, items=BATCH[model], item_name="images", devices=32,
           compute_dtype=get_policy(precision).compute_dtype)
    benchmark.extra_info["binding"] = unit.prediction.binding
    benchmark.extra_info["predicted_whole_program_s"] = unit.whole_program_s
    unit.placed = None   # kept for the entry's turns without its inputs on the mesh
    _COMPILED[model, precision, entry, plan] = unit


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("model", MODELS)
def test_plans_in_turns(benchmark, model, precision, entry):
    """The ranking measured side by side: each round runs every valid plan of the entry once,
    in turn, so a change of the host's speed hits every plan alike. On the 2-core host the
    plans with collectives ran up to 2.8x slower in one timed run than in a fresh process
    minutes later (docs/performance.md), which the per-plan rounds above, each plan timed
    on its own, carry into the ranking; bench-report ranks by these figures where present.
    A round's time is the whole turn; each plan's call is timed within it."""
    benchmark.group = f"plans cpu-4x8 {model} {precision}"
    plans = [plan for plan in load_plans() if _validity(model, precision, entry, plan).ok]
    units = {plan: _COMPILED.pop((model, precision, entry, plan), None) or _compile(model, precision, entry, plan)
             for plan in plans}
    times: dict[str, list[float]] = {plan: [] for plan in units}

    def turn(args: dict) -> list:
        outs = []
        for plan, unit in units.items():
            start = time.perf_counter()
            outs.append(jax.block_until_ready(unit.compiled(*args[plan])))
            times[plan].append(time.perf_counter() - start)
        return outs

    def inputs():
        return ({plan: unit.args() for plan, unit in units.items()},), {}

    timed = not getattr(benchmark, "disabled", False)
    if timed:   # a warm-up turn, not kept
        turn(*inputs()[0])
        for kept in times.values():
            kept.clear()
    outs = benchmark.pedantic(turn, setup=inputs, rounds=ROUNDS[model])
    assert len(outs) == len(plans) >= 3
    assert all(np.all(np.isfinite(np.asarray(jax.tree.leaves(o)[0], np.float32))) for o in outs)
    assert all(len(t) == len(times[plans[0]]) >= 1 for t in times.values())
    benchmark.extra_info.update(
        unit={"entry": entry, "plan": "in turns", "precision": precision, "batch": BATCH[model], "target": "cpu",
              "model": model}, timed=timed,
        in_turns={plan: {"rounds_s": times[plan], "predicted_s": units[plan].prediction.latency_s,
                         "binding": units[plan].prediction.binding} for plan in plans})
