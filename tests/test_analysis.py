"""Analysis that can be trusted: loop-corrected FLOPs against analytic counts, collectives
against hand-derived expectations, hotspot classification, selection and the report."""

from __future__ import annotations

import json
from pathlib import Path
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from capibara_export.matrix.driver import BuildRequest, run_build
from capibara_export.analysis.collectives import collectives
from capibara_export.analysis.hardware import TPU_KERNEL_OVERHEAD
from capibara_export.matrix.derive import derive
from capibara_export.analysis.hlo import HloProgram
from capibara_export.analysis.selection import pareto, select
from capibara_export.matrix.targets import get_target, make_mesh

SERVING_PLANS = ("replicated", "dp", "fsdp", "fsdp-tp", "hidden")


@pytest.fixture(scope="module")
def cpu_mesh():
    return make_mesh(get_target("cpu"), (4, 8))


def _collectives_of(fn, in_specs, out_spec, shapes, mesh):
    jitted = jax.jit(fn, in_shardings=tuple(NamedSharding(mesh, s) for s in in_specs),
                     out_shardings=NamedSharding(mesh, out_spec))
    text = jitted.lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile().as_text()
    return collectives(HloProgram(text), (4, 8))


def test_tp_matmul_all_reduces_its_output_over_model(cpu_mesh):
    """x·W with the contraction sharded over `model`: each device holds a partial (16, 32)
    product, summed by one all-reduce over the 8 devices of its `model` row: 16·32·4 bytes."""
    found = _collectives_of(lambda x, w: x @ w, (P(None, "model"), P("model", None)), P(),
                            ((16, 64), (64, 32)), cpu_mesh)
    (c,) = found
    assert (c.kind, c.axis, c.group_size, c.bytes, c.times) == ("all-reduce", "model", 8, 16 * 32 * 4, 1)


def test_gathering_a_batch_sharded_over_data_all_gathers_over_data(cpu_mesh):
    found = _collectives_of(lambda x: x * 2.0, (P("data", None),), P(), ((16, 32),), cpu_mesh)
    (c,) = found
    assert (c.kind, c.axis, c.group_size, c.bytes) == ("all-gather", "data", 4, 16 * 32 * 4)


@pytest.fixture(scope="module")
def base_build(tmp_path_factory):
    """base encode_image and caption, bf16, batch 32, every serving plan, on the default target."""
    out = tmp_path_factory.mktemp("base")
    # tp is invalid for base (12 heads over 8) and costs no compile: it is here for the advice test
    request = BuildRequest(entries=("encode_image", "caption"), plans=(*SERVING_PLANS, "tp"), precisions=("bf16",),
                           out=out)
    result = run_build(request, finish=lambda staging, _: derive(staging))
    return result.folder, json.loads((result.folder / "analysis.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["encode_image", "caption"])
def test_loop_corrected_flops_match_the_analytic_count_for_every_plan(base_build, entry):
    _, analysis = base_build
    for plan in SERVING_PLANS:
        a = analysis["units"][f"{entry}-{plan}-bf16-b32"]
        analytic, flops = a["analytic"]["flops"], a["flops"]
        # the whole program as compiled, before partitioning: plan-independent
        assert flops["global_matmul"] == pytest.approx(analytic, rel=0.10), plan
        # per device, after partitioning: the batch split 32 ways, or every device doing all of it
        devices = {"replicated": 1, "hidden": None}.get(plan, 32)
        if devices:
            assert flops["per_device_matmul"] * devices == pytest.approx(analytic, rel=0.10), plan
        # what cost_analysis alone reports: the 12 scanned layers counted once
        assert flops["cost_analysis"]["flops"] < 0.3 * flops["per_device"], plan


@pytest.mark.slow
def test_roofline_names_a_binding_term_and_selection_only_picks_fitting_units(base_build):
    folder, analysis = base_build
    for a in analysis["units"].values():
        if a["status"] == "ok":
            r = a["roofline"]
            # TPU entries: the per-kernel roofline with libtpu's per-kernel floor as the only
            # overhead, so each kernel costs κ + max(compute, memory): the work lies between the
            # whole-program max and the sum, plus the launches
            assert r["binding"] in ("compute", "memory", "communication", "overhead")
            assert r["kernels"] > 0 and r["overhead_s"] == pytest.approx(r["kernels"] * TPU_KERNEL_OVERHEAD)
            work = r["latency_s"] - r["overhead_s"] if r["latency_s"] > r["comm_s"] else None
            assert r["latency_s"] >= max(r["compute_s"], r["memory_s"], r["comm_s"]) * (1 - 1e-12) > 0
            assert work is None or work <= (r["compute_s"] + r["memory_s"]) * (1 + 1e-12)
            assert r["compiler_optimal_s"] is None or r["compiler_optimal_s"] > 0
            # and the compiler's own estimate beside it, for the same kernels
            e = a["libtpu_estimate"]
            assert 0 < e["kernels_covered"] <= e["kernels"] and e["clock_hz"] == 1.05e9
            assert e["roofline_compute_s"] <= r["latency_s"] * (1 + 1e-9)
            assert work is None or e["roofline_compute_s"] == pytest.approx(r["latency_s"], rel=1e-9)
    agreement = analysis["model_agreement"]
    assert set(agreement["entries"]) == {"encode_image", "caption"}
    for entry in agreement["entries"].values():
        assert entry["units"] == len(SERVING_PLANS) and -1 <= entry["spearman_compute"] <= 1
    selection = json.loads((folder / "selection.json").read_text())
    for s in selection["selections"]:
        assert analysis["units"][s["unit_id"]]["memory"]["fits"]
        assert s["unit_id"] in s["pareto"]


def test_report_advice_names_only_valid_plans_and_says_why_a_selection_differs(base_build):
    """On base (12 heads: tp is invalid over 8), no selected unit's advice recommends an invalid
    plan, and a selection that does not follow its advice says why, with numbers."""
    import html

    folder, analysis = base_build
    selection = json.loads((folder / "selection.json").read_text())
    page = (folder / "report.html").read_text()
    invalid = {(a["unit"]["entry"], a["unit"]["plan"]) for a in analysis["units"].values() if a["status"] == "invalid"}
    assert ("caption", "tp") in invalid, "the test needs an invalid plan to be meaningful"
    differs = 0
    for s in selection["selections"]:
        advice = s["advice"]
        assert not {(s["entry"], p) for p in advice["plans"]} & invalid
        recommended = advice["text"].split("; not valid here")[0]
        for entry, plan in invalid:
            if entry == s["entry"]:
                assert not re.search(rf"(?<![\w-]){re.escape(plan)}(?![\w-])", recommended), (plan, advice["text"])
                assert plan in advice["not_valid"] or advice["follows"]
        if not advice["follows"]:
            differs += 1
            chosen = analysis["units"][s["unit_id"]]
            assert f"{s['plan']} is selected instead: it fits" in advice["text"]
            assert f"predicted at {chosen['roofline']['latency_s'] * 1e3:.3g} ms against" in advice["text"]
            assert all(f"{p} (" in advice["text"] for p in advice["plans"])
        assert html.escape(advice["text"]) in page
    assert differs, "base at batch 32 is hidden-bound yet served best by dp: the case this test is for"


@pytest.mark.slow
def test_report_holds_every_figure_and_table(base_build):
    folder, analysis = base_build
    page = (folder / "report.html").read_text()
    assert "XLA compile options XLA&#x27;s defaults." in page   # a TPU target: capibara_export/compiler_options.py
    images = re.findall(r'<img alt="figure" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)
    selection = json.loads((folder / "selection.json").read_text())
    talking = [s for s in selection["selections"] if max(map(max, analysis["units"][s["unit_id"]]["load_grid"]
                                                            ["comm_bytes"])) > 0]
    # 2 plan×precision grids, 2 Pareto fronts, a load grid per selected unit that communicates
    assert len(images) == 4 + len(talking)
    assert page.count("no collective traffic (every device computes on its own data)") == 2 - len(talking)
    assert "<h2>Units that repeat work" in page and "replicated" in page   # the replicated plan repeats 32x
    for heading in ("Selection", "Pareto fronts", "Per-device communication load", "Hotspots of the selected units",
                    "All units", "FLOP cross-check"):
        assert f"<h2>{heading}" in page
    assert page.count("<tr>") > 20 and "http" not in page.replace("http-equiv", "")  # self-contained
    assert "| encode_image | 32 | bf16 |" in (folder / "summary.md").read_text()


@pytest.mark.slow
def test_report_command_regenerates_from_the_folder(base_build):
    folder, _ = base_build
    (folder / "report.html").unlink()
    result = subprocess.run([sys.executable, "-m", "capibara_export", "report", str(folder)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (folder / "report.html").is_file() and "Report:" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "capibara_export", "report", str(folder / "nope")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "build folder not found" in missing.stderr


@pytest.mark.slow
def test_classification_flips_from_batch_bound_to_hidden_bound_as_the_batch_shrinks(tmp_path):
    request = BuildRequest(entries=("encode_image",), plans=("replicated",), precisions=("fp32",),
                           batches=(256, 1), out=tmp_path)
    folder = run_build(request, finish=lambda staging, _: derive(staging)).folder
    units = json.loads((folder / "analysis.json").read_text())["units"]
    big, small = units["encode_image-replicated-fp32-b256"], units["encode_image-replicated-fp32-b1"]
    assert big["classification"]["bound"] == "batch" and big["classification"]["family"] == ["dp", "fsdp"]
    assert small["classification"]["bound"] == "hidden" and "hidden" in small["classification"]["family"]
    assert "sharding the batch" in big["classification"]["reason"]


def _unit(plan, status="ok", latency=1.0, peak=1.0, fits=True):
    unit = {"unit": {"entry": "caption", "batch": 8, "precision": "bf16", "plan": plan}, "status": status,
            "reason": "" if status == "ok" else "too big"}
    if status == "ok":
        unit.update(memory={"peak": peak, "fits": fits},
                    roofline={"latency_s": latency, "binding": "compute", "mfu": 0.5})
    return unit


def test_selection_never_picks_a_unit_that_does_not_fit():
    analysis = {"units": {"a": _unit("fast-but-too-big", latency=0.1, fits=False),
                          "b": _unit("oom", status="does-not-fit"),
                          "c": _unit("slow-small", latency=2.0, peak=1.0),
                          "d": _unit("fast-large", latency=1.0, peak=3.0),
                          "e": _unit("dominated", latency=2.5, peak=3.5)}}
    (s,) = select(analysis)["selections"]
    assert s["plan"] == "fast-large" and set(s["pareto"]) == {"c", "d"}
    assert set(s["dropped"]) == {"a", "b"} and "Pareto front: slow-small" in s["reason"]


def test_bf16_is_refused_where_the_measured_bf16_matmul_rate_is_below_f32():
    """A CPU without native bf16 dots (this host's calibration: bf16 GEMMs at 0.70-0.81x f32)
    runs bf16 programs slower than fp32 ones: the selection still names the plan it would
    serve, but refuses every bf16-compute precision (int8-weights computes in bf16 too) with
    the measured reason; fp32 is untouched, and hardware with faster bf16 refuses nothing."""
    units = {f"{precision}-{plan}": {**_unit(plan, latency=latency),
                                     "unit": {"entry": "caption", "batch": 8, "precision": precision, "plan": plan}}
             for precision in ("fp32", "bf16", "bf16-mixed", "int8-weights")
             for plan, latency in (("dp", 1.0), ("fsdp", 2.0))}
    cpu = {"name": "cpu (this host)", "source": "measured on this host at run time",
           "achieved_bf16_flops": 3.0e10, "achieved_fp32_flops": 4.0e10}
    chosen = {s["precision"]: s for s in select({"build": {"hardware": cpu}, "units": units})["selections"]}
    for precision in ("bf16", "bf16-mixed", "int8-weights"):
        s = chosen[precision]
        assert s["plan"] == "dp" and s["refused"].startswith("refused on cpu (this host): bf16 matmuls run at 0.75x")
        assert "3e+10 vs 4e+10 FLOP/s, measured on this host at run time" in s["refused"]
        assert s["reason"].startswith(s["refused"]) and "Would serve dp: fastest predicted" in s["reason"]
    assert "refused" not in chosen["fp32"] and chosen["fp32"]["plan"] == "dp"
    tpu = {**cpu, "name": "tpu-v4", "achieved_bf16_flops": 2.6e14, "achieved_fp32_flops": 6.0e13}
    assert not any("refused" in s for s in select({"build": {"hardware": tpu}, "units": units})["selections"])
    assert not any("refused" in s for s in select({"build": {"hardware": {}}, "units": units})["selections"])


def test_the_export_writes_no_executable_for_a_refused_precision_unless_it_is_named():
    from types import SimpleNamespace

    from capibara_export.export.bundle import selected_units

    selection = [{"entry": "caption", "batch": 8, "precision": "fp32", "plan": "dp"},
                 {"entry": "caption", "batch": 8, "precision": "bf16", "plan": "dp", "refused": "refused on cpu: ..."},
                 {"entry": "score", "batch": 8, "precision": "bf16", "plan": None}]
    default = SimpleNamespace(selection=selection, precisions=("fp32", "bf16"), export_refused=False)
    assert selected_units(default) == ([selection[0]], [selection[1]])
    named = SimpleNamespace(selection=selection, precisions=("fp32", "bf16"), export_refused=True)
    assert selected_units(named) == (selection[:2], [])


def test_serving_a_refused_precision_says_the_build_refused_it():
    from capibara_export.export.manifest import BundleError
    from capibara_export.export.sharded_server import sharded_artifact

    manifest = {"artifacts": [{"kind": "jax.export-sharded", "entry": "caption", "precision": "fp32", "path": "x"}],
                "selection": [{"entry": "caption", "batch": 8, "precision": "bf16", "plan": "dp",
                               "refused": "refused on cpu-host: bf16 matmuls run at 0.67x the f32 rate here"}]}
    assert sharded_artifact(manifest, "caption", "fp32")["path"] == "x"
    with pytest.raises(BundleError, match=r"no sharded program for caption in bf16; it has: caption \(fp32\); "
                                          r"the build's selection refused on cpu-host: bf16 matmuls run at 0.67x"):
        sharded_artifact(manifest, "caption", "bf16")


def test_no_fitting_unit_selects_nothing_and_says_why_for_each():
    (s,) = select({"units": {"b": _unit("oom", status="does-not-fit")}})["selections"]
    assert s["plan"] is None and s["reason"] == "no plan selected: 1 considered: 1 over the memory budget (oom)"
    invalid = _unit("dp", status="invalid")
    invalid["reason"] = "batch 4 is not divisible by the 32 devices of data x model"
    (s,) = select({"units": {"b": _unit("oom", status="does-not-fit"), "i": invalid}})["selections"]
    assert s["reason"] == ("no plan selected: 2 considered: 1 over the memory budget (oom); 1 invalid (dp); "
                           "e.g. batch 4 is not divisible by the 32 devices of data x model")


def test_pareto_front():
    assert pareto([("a", 1, 5), ("b", 2, 2), ("c", 3, 3), ("d", 5, 1)]) == ["a", "b", "d"]


def test_report_units_ticks_and_empty_panels_say_what_they_show():
    from capibara_export.analysis.report import byte_unit, load_figure, redundancy_reason

    assert byte_unit([3 * 2 ** 30]) == (2 ** 30, "GiB") and byte_unit([5e6, 1e3]) == (2 ** 20, "MiB")
    assert byte_unit([512]) == (1, "B") and byte_unit([]) == (1, "B")
    quiet = {"load_grid": {"comm_bytes": [[0, 0], [0, 0]], "hot_devices": []}}
    assert load_figure(quiet, "u") == "<p>u: no collective traffic (every device computes on its own data).</p>"
    busy = {"load_grid": {"comm_bytes": [[0, 3e6], [1e6, 0]], "hot_devices": [[0, 1]]}}
    assert load_figure(busy, "u").startswith('<img alt="figure"')
    unit = {"plan_description": "batch over data", "flops": {"redundancy": 2.4, "per_device_matmul": 1.0,
                                                              "global_matmul": 32.0}}
    assert "elementwise" in redundancy_reason(unit, 32) and "matmuls only 1.00x" in redundancy_reason(unit, 32)
    unit["flops"].update(redundancy=4.1, per_device_matmul=4.0)
    assert "matmuls 4.0x" in redundancy_reason(unit, 32) and "(batch over data)" in redundancy_reason(unit, 32)
    unit["flops"]["redundancy"] = 1.2
    assert redundancy_reason(unit, 32) is None


def test_the_build_records_are_what_they_were_before_models_became_families(base_build):
    """tests/golden/records_base_encode_caption_bf16.json is this build's records.jsonl made at
    fb56d16, before the pipeline read BLIP through modelapi.family: the same units, statuses,
    HLO hashes, memory, costs and reasons. Only timings, the cache flag and the two source
    hashes (code_version, cache_key, which change with any edit by design) are left out."""
    volatile = ("lower_s", "compile_s", "cached", "cache_key", "code_version")
    folder, _ = base_build
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    got = sorted(({k: v for k, v in r.items() if k not in volatile} for r in records),
                 key=lambda r: json.dumps(r["unit"], sort_keys=True))
    golden = json.loads((Path(__file__).parent / "golden" / "records_base_encode_caption_bf16.json").read_text())
    assert [r["unit"] for r in got] == [r["unit"] for r in golden]
    for mine, before in zip(got, golden):
        assert mine == before, mine["unit_id"]
