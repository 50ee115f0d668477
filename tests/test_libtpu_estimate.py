"""The TPU compiler's own per-kernel estimates: read from a stored TPU unit, summed with the
loops' runs, set beside the roofline, and compared over plans."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest

from capibara_export.analysis.hardware import HARDWARE, TPU_KERNEL_OVERHEAD
from capibara_export.analysis.hlo import HloProgram
from capibara_export.analysis.libtpu_estimate import estimate_record, kernel_kind, read_estimate, window_config
from capibara_export.analysis.model_agreement import compare_models, compiler_choice
from capibara_export.analysis.roofline import roofline
from capibara_export.analysis.selection import select

# tiny caption, dp, bf16, batch 32 on tpu-v4-64 (4x8), written by `python -m tests.make_tpu_unit`
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_tpu_caption_dp_bf16_b32.hlo.gz"
CHIP = HARDWARE["tpu-v4-chip"]
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s")
_ESTIMATE = re.compile(r'"estimated_cycles":"(\d+)"')


@pytest.fixture(scope="module")
def stored_unit() -> tuple[str, HloProgram]:
    text = gzip.decompress(FIXTURE.read_bytes()).decode()
    return text, HloProgram(text)


def _estimates_by_computation(text: str) -> dict[str, list[tuple[str, int]]]:
    """Straight from the text: every instruction's estimated_cycles, by the computation it is in."""
    found: dict[str, list[tuple[str, int]]] = {}
    computation = None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            computation = head.group(1)
        cycles = _ESTIMATE.search(line)
        if cycles and computation:
            name = line.split("=", 1)[0].replace("ROOT", "").strip().lstrip("%")
            found.setdefault(computation, []).append((name, int(cycles.group(1))))
    return found


def test_the_estimate_is_every_kernels_cycles_times_its_runs(stored_unit):
    """132 instructions of the stored unit carry an estimate, none inside a fusion body; the
    generation loop runs 19 times (20 new tokens, the first from the prompt step) around the
    2-layer decoder loop, so a decoder kernel counts 38 times. The program's cycles are the
    sum of each estimate times its computation's runs, every estimated instruction is a
    kernel the roofline prices, and a dp unit has no collective to leave out."""
    text, program = stored_unit
    by_computation = _estimates_by_computation(text)
    assert sum(len(v) for v in by_computation.values()) == 132
    assert not set(by_computation) & program.fused
    trips = sorted((loop.trip_count, loop.multiplier) for loop in program.loops)
    assert (19, 1.0) in trips and (2, 19.0) in trips
    expected = sum(cycles * program.multiplier[comp] for comp, rows in by_computation.items() for _, cycles in rows)
    estimate = read_estimate(program)
    assert estimate.cycles == expected > 0
    assert {k.name for k in estimate.covered} == {name for rows in by_computation.values() for name, c in rows if c}
    assert len(estimate.kernels) == len(program.kernel_profile().kernels) > len(estimate.covered)
    assert estimate.collectives == []
    assert max(k.times for k in estimate.covered) == 38.0


def test_the_unit_record_prices_the_same_kernels_as_the_roofline(stored_unit):
    """Seconds are the cycles at v4's 1.05 GHz; the roofline side of the record is the
    roofline's own per-kernel time (with its 0.58 µs per launch), covered and not covered
    kernels together; the compiler's compute part prices the kernels it left out the
    roofline's way."""
    _, program = stored_unit
    record = estimate_record(program, CHIP, "bfloat16", comm_s=0.0)
    assert record["seconds"] == pytest.approx(record["cycles"] / 1.05e9, rel=1e-12)
    assert record["kernels_covered"] + record["kernels_not_covered"] == record["kernels"]
    assert len(record["largest_differences"]) == 5 and record["cycles"] > 0
    profile = program.kernel_profile()
    r = roofline(0.0, 0.0, [], CHIP, "bfloat16", 1.0, 32, profile=profile)
    assert r.overhead_s == pytest.approx(profile.launches * TPU_KERNEL_OVERHEAD)
    assert record["roofline_compute_s"] == pytest.approx(r.latency_s, rel=1e-9)
    assert record["compute_s"] == pytest.approx(record["seconds"] + record["not_covered_roofline_s"], rel=1e-12)
    assert sum(v["kernels"] for v in record["by_kind"].values()) == record["kernels_covered"]
    assert set(record["by_kind"]) <= {"matmul", "reduce", "element-wise", "data movement"}
    # the latency the compiler implies: its compute part, or the roofline's communication if longer
    assert estimate_record(program, CHIP, "bfloat16", comm_s=1.0)["latency_s"] == 1.0


def test_window_config_reads_what_the_compiler_wrote():
    line = ('backend_config={"flag_configs":[],"window_config":{"kernel_window_bounds":[],"output_window_bounds":'
            '["4","32"],"estimated_cycles":"182144","iteration_bounds":["128","1"],"cost_model_type":'
            '"COST_MODEL_TYPE_INVALID","ml_estimated_microseconds":0},"megacore_config":{"megacore_split_dim":"0"}}')
    config = window_config(line)
    assert config["estimated_cycles"] == "182144" and config["iteration_bounds"] == ["128", "1"]
    assert window_config('backend_config={"collective_algorithm_config":{"emitter":"RotatedPincerEmitter"}}') is None


def _unit(plan, roofline_latency, libtpu_latency, compute=None, peak=1.0):
    compute = compute or (roofline_latency, libtpu_latency)
    return {"unit": {"entry": "caption", "batch": 8, "precision": "bf16", "plan": plan}, "status": "ok", "reason": "",
            "memory": {"peak": peak, "fits": True},
            "roofline": {"latency_s": roofline_latency, "binding": "memory", "mfu": 0.1},
            "libtpu_estimate": {"roofline_compute_s": compute[0], "compute_s": compute[1],
                                "latency_s": libtpu_latency, "largest_differences": [],
                                "by_kind": {"reduce": {"kernels": 3, "roofline_s": compute[0], "libtpu_s": compute[1]}}}}


def test_agreement_ranks_plans_and_lists_units_apart_by_more_than_1_5x():
    units = {"a": _unit("dp", 1.0, 1.2), "b": _unit("fsdp", 2.0, 2.2), "c": _unit("hidden", 3.0, 9.0)}
    agreement = compare_models({"units": units})
    caption = agreement["entries"]["caption"]
    assert caption["spearman_compute"] == pytest.approx(1.0) and caption["units"] == 3
    assert caption["median_ratio_compute"] == pytest.approx(1.2)
    (apart,) = agreement["disagreements"]
    assert apart["unit_id"] == "c" and apart["ratio"] == pytest.approx(3.0) and apart["carried_by"] == "reduce"
    reversed_order = compare_models({"units": {"a": _unit("dp", 1.0, 3.0), "b": _unit("fsdp", 2.0, 2.0),
                                               "c": _unit("hidden", 3.0, 1.0)}})
    assert reversed_order["entries"]["caption"]["spearman_compute"] == pytest.approx(-1.0)
    assert compare_models({"units": {"a": {**_unit("dp", 1.0, 1.0), "libtpu_estimate": None}}}) is None


def test_the_selection_says_when_the_compiler_would_choose_another_plan():
    agree = select({"units": {"a": _unit("dp", 1.0, 1.5), "b": _unit("fsdp", 2.0, 2.5)}})["selections"][0]
    assert agree["plan"] == agree["libtpu_choice"] == "dp"
    assert agree["reason"].endswith("libtpu's own kernel estimates agree (1.5e+03 ms)")
    differ = select({"units": {"a": _unit("dp", 1.0, 3.0), "b": _unit("fsdp", 2.0, 2.5)}})["selections"][0]
    assert differ["plan"] == "dp" and differ["libtpu_choice"] == "fsdp"
    assert "libtpu's own kernel estimates would choose fsdp (2.5e+03 ms against 3e+03 ms for dp" in differ["reason"]
    # a unit without a compiler estimate (a CPU or GPU build): no second opinion
    plain = {"a": {**_unit("dp", 1.0, 1.0)}}
    del plain["a"]["libtpu_estimate"]
    (s,) = select({"units": plain})["selections"]
    assert "libtpu" not in s["reason"] and "libtpu_choice" not in s
    assert compiler_choice([]) is None


def test_kernel_kinds_name_the_unit_that_does_the_work(stored_unit):
    _, program = stored_unit
    kinds = {kernel_kind(k) for k in program.kernel_profile().kernels}
    assert kinds == {"matmul", "reduce", "element-wise", "data movement"}


@pytest.mark.parametrize("n", [1024, 4096])
def test_the_chips_matmul_rate_is_the_compilers_own_mxu_model(n):
    """hardware.V4_CHIP_GEMM_RATES holds what libtpu estimates for an n^3 bf16 matmul on one v4
    chip, less the per-kernel overhead: compiled here again, the estimate still gives that rate
    (a toolchain whose MXU model moved fails here: rerun `python -m tools.studies.libtpu_estimates`)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from capibara_export.matrix.targets import get_target, make_mesh

    mesh = make_mesh(get_target("tpu-v4-8"), (1, 4))
    replicated = NamedSharding(mesh, P())
    shape = jax.ShapeDtypeStruct((n, n), jnp.bfloat16)
    compiled = jax.jit(lambda a, b: a @ b, in_shardings=(replicated, replicated),
                       out_shardings=replicated).lower(shape, shape).compile()
    cycles = read_estimate(HloProgram(compiled.as_text())).cycles
    flops = 2.0 * n ** 3
    assert CHIP.gemm_rate(flops, "bfloat16") == pytest.approx(flops / (cycles / 1.05e9 - TPU_KERNEL_OVERHEAD), rel=0.01)
