"""Multi-slice targets: S TPU slices joined by the data-centre network (a `dcn` mesh axis).

libtpu describes them deviceless (`num_slices`), compiles one program per slice and turns
every collective part between slices into megascale host transfers; these tests check the
mesh, the plans' rules on it, and that the analysis finds the DCN traffic and prices it at
the DCN bandwidth."""

from __future__ import annotations

import math

import pytest
from jax.sharding import PartitionSpec

from capibara_export.matrix.targets import TargetError, describe, get_target, make_mesh
from sharding.plans import PlanError, load_plans, parse_plans

DCN_PLAN = """
[fsdp-dcn]
description = "fsdp over every device of every slice: parameters gathered across the data-centre network."
params = { embed = ["dcn", "data", "model"] }
activations = { batch = ["dcn", "data", "model"] }
"""


def test_a_multi_slice_target_is_slices_of_one_preset_on_a_dcn_axis():
    target = get_target("2xtpu-v4-16")
    assert (target.slices, target.devices, target.topology) == (2, 16, "v4:2x2x2")
    mesh = make_mesh(target, (2, 4))
    assert tuple(mesh.axis_names) == ("dcn", "data", "model") and dict(mesh.shape) == {"dcn": 2, "data": 2, "model": 4}
    for s in range(2):  # every position of dcn row s is a device of slice s
        assert {d.slice_index for d in mesh.devices[s].flat} == {s}
    hosts = describe(mesh, target)["hosts"]
    assert (hosts["slices"], hosts["processes"], hosts["devices_per_process"]) == (2, 4, 4)
    assert {p for row in hosts["process_grid"][1] for p in row} == {2, 3}   # slice 1 is hosts 2 and 3
    assert get_target("3xv4:2x2x2/megacore").name == "3xv4-2x2x2-megacore"
    with pytest.raises(TargetError, match="only TPU targets have slices; cpu is cpu"):
        get_target("2xcpu")
    with pytest.raises(TargetError, match=r"--mesh 4x4 is one slice's mesh and needs 16 devices, but each slice of "
                                          r"2xtpu-v4-16 has 8 \(e.g. 2x4, 4x2"):
        make_mesh(target, (4, 4))


def test_plans_put_the_batch_on_dcn_unless_they_name_it():
    """Golden rules: data parallelism across slices by default (parameters replicated per
    slice, MaxText's dcn_data_parallelism); a plan that names dcn is used as written, and
    loses it on one slice."""
    plans = load_plans()
    multi = ("dcn", "data", "model")
    expected = {"replicated": (("batch", ("dcn",)),),
                "dp": (("batch", ("dcn", "data", "model")),),
                "tp": (("batch", ("dcn", "data")), ("heads", ("model",)), ("mlp", ("model",)), ("vocab", ("model",))),
                "hidden": (("batch", ("dcn",)), ("embed", ("data", "model")), ("mlp", ("data", "model")))}
    for name, activations in expected.items():
        plan = plans[name].for_mesh(multi)
        assert plan.activations == activations, name
        assert plan.params == plans[name].params          # parameters keep their per-slice sharding
        assert plans[name].for_mesh(("data", "model")) is plans[name]
    named = parse_plans(DCN_PLAN, "test")["fsdp-dcn"]
    assert named.for_mesh(multi) is named
    one = named.for_mesh(("data", "model"))
    assert one.params == (("embed", ("data", "model")),) and one.activations == (("batch", ("data", "model")),)
    assert named.spec(("batch", None, "embed"), "activations") == PartitionSpec(("dcn", "data", "model"), None, None)
    with pytest.raises(PlanError, match="unknown mesh axis 'pod'; the mesh axes are dcn, data, model"):
        parse_plans("[p]\nparams = { embed = 'pod' }\n", "test")


@pytest.fixture(scope="module")
def two_slice_analysis(tmp_path_factory):
    """encode_image of the tiny model on 2 x tpu-v4-16, with dp (the default across slices)
    and a plan that gathers parameters across slices."""
    from capibara_export.matrix.analyze import analyze_build
    from capibara_export.matrix.driver import BuildRequest, run_build

    out = tmp_path_factory.mktemp("slices")
    plan_file = out / "dcn.toml"
    plan_file.write_text(DCN_PLAN)
    request = BuildRequest(target="2xtpu-v4-16", mesh=(2, 4), model="tiny", entries=("encode_image",),
                           plans=("dp", "fsdp-dcn"), plan_files=(str(plan_file),), precisions=("fp32",),
                           batches=(16,), out=out, use_cache=False)
    assert request.folder_name() == "tiny-2xtpu-v4-16-2x4"
    result = run_build(request)
    assert [r.status for r in result.records] == ["ok", "ok"], [r.reason for r in result.records]
    return result, analyze_build(result.folder)


def test_collectives_between_slices_are_dcn_bytes_priced_at_dcn_bandwidth(two_slice_analysis):
    from model.state import abstract_params, logical_names

    result, analysis = two_slice_analysis
    units = analysis["units"]
    dp, dcn = units["encode_image-dp-fp32-b16"], units["encode_image-fsdp-dcn-fp32-b16"]
    # data parallel across slices: inference never crosses the data-centre network
    assert dp["collectives"]["bytes_by_network"]["dcn"] == 0 and "dcn" not in dp["roofline"]["comm_s_by_axis"]
    # gathering the vision tower's embed-sharded parameters over 16 devices in 2 slices: each
    # device sends its shard to the other slice once per run, so 16 devices send about the
    # sharded parameter bytes in all (a few KiB more: small gathers of activations)
    plan = result.plans["fsdp-dcn"]
    params, names = abstract_params(result.config), logical_names(result.config)
    sharded = sum(math.prod(a.shape) * a.dtype.itemsize
                  for a, n in zip(_leaves(params["vision"]), _leaves(names["vision"])) if any(plan.spec(n, "params")))
    sent = dcn["collectives"]["bytes_by_network"]["dcn"] * 16
    assert sharded <= sent <= 1.02 * sharded, (sent, sharded)
    assert dcn["collectives"]["bytes_by_axis"]["dcn"] > 0
    # priced at the v4 chip's DCN figure (6.25e9 B/s per chip) plus a hop latency per transfer
    hw = result.hardware
    assert hw.dcn_bandwidth == 6.25e9
    t = dcn["roofline"]["comm_s_by_axis"]["dcn"]
    assert dcn["collectives"]["bytes_by_network"]["dcn"] / hw.dcn_bandwidth < t
    # one hop per transfer between 2 slices, two for an all-reduce (reduce-scatter + all-gather)
    transfers = sum(r["count"] * (2 if r["kind"] == "all-reduce" else 1)
                    for r in dcn["collectives"]["by_kind"] if r["axis"] == "dcn")
    assert t == pytest.approx(dcn["collectives"]["bytes_by_network"]["dcn"] / hw.dcn_bandwidth
                              + hw.dcn_latency * transfers)
    # and the ICI part is what stays within a slice (8 devices)
    assert set(dcn["collectives"]["bytes_by_axis"]) == {"dcn", "data+model"}
    assert dcn["collectives"]["bytes_by_network"]["ici"] == dcn["collectives"]["bytes_by_axis"]["data+model"]


def test_the_records_carry_the_slices_and_hosts(two_slice_analysis):
    result, analysis = two_slice_analysis
    mesh = result.records[0].mesh
    assert mesh["axis_names"] == ["dcn", "data", "model"] and mesh["hosts"]["slices"] == 2
    assert len(mesh["device_ids"]) == 2 and len(mesh["device_ids"][0]) == 2 and len(mesh["device_ids"][0][0]) == 4
    assert analysis["build"]["mesh"]["hosts"]["processes"] == 4
    grid = analysis["units"]["encode_image-fsdp-dcn-fp32-b16"]["load_grid"]["comm_bytes"]
    assert (len(grid), len(grid[0])) == (4, 4)   # dcn x data rows, model columns


def _leaves(tree):
    import jax

    from model.axes import is_names

    return jax.tree.leaves(tree, is_leaf=is_names)


def test_device_orders_of_any_mesh_rank_are_read_row_major():
    """A multi-slice bundle records (dcn, data, model) device ids; loading executables and the
    bundle's mesh read them row-major as for two axes."""
    import jax

    from capibara_export.export.executables import execution_devices

    ids = [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    manifest = {"mesh": {"platform": "cpu", "device_ids": ids}}
    assert [d.id for d in execution_devices(manifest)] == list(range(8))
    assert len(jax.devices("cpu")) >= 8
