"""Targets and meshes: deviceless TPU slices, simulated CPU devices, clear errors."""

import pytest

from capibara_export.matrix.targets import TARGETS, TargetError, device_grid, get_target, make_mesh, parse_mesh


@pytest.mark.parametrize("text, shape", [("4x8", (4, 8)), ("8x4", (8, 4)), (" 2 x 16 ", (2, 16)), ("1x32", (1, 32))])
def test_parse_mesh(text, shape):
    assert parse_mesh(text) == shape


@pytest.mark.parametrize("text", ["abc", "4x", "4x0", "4*8", ""])
def test_parse_mesh_rejects_malformed_shapes(text):
    with pytest.raises(TargetError, match="is not of the form DATAxMODEL"):
        parse_mesh(text)


@pytest.mark.parametrize("name, kind", [("v4:2x2x4", "TPU v4"), ("tpu-v4-64", "TPU v4"), ("tpu-v5e-32", "TPU v5 lite")])
@pytest.mark.parametrize("shape", [(4, 8), (8, 4), (2, 16), (1, 32)])
def test_tpu_targets_build_32_device_meshes_without_a_tpu(name, kind, shape):
    mesh = make_mesh(get_target(name), shape)
    assert dict(mesh.shape) == {"data": shape[0], "model": shape[1]}
    assert mesh.devices.flat[0].device_kind == kind
    assert len({d.id for d in mesh.devices.flat}) == 32


def test_per_core_v4_model_axis_pairs_the_two_cores_of_a_chip():
    mesh = make_mesh(get_target("v4:2x2x4"), (4, 8))
    row = mesh.devices[0]
    assert [tuple(d.coords) for d in row[:2]] == [tuple(row[0].coords)] * 2
    assert [d.core_on_chip for d in row[:2]] == [0, 1]


def test_wrong_device_count_says_what_fits():
    with pytest.raises(TargetError, match=r"--mesh 4x9 needs 36 devices but tpu-v4-64 has 32 devices; .*4x8, 8x4"):
        make_mesh(get_target("tpu-v4-64"), (4, 9))
    with pytest.raises(TargetError, match=r"--mesh 4x8 needs 32 devices but tpu-v4-32 has 16 devices; .*4x4, 2x8"):
        make_mesh(get_target("tpu-v4-32"), (4, 8))
    with pytest.raises(TargetError, match="jax_num_cpu_devices"):
        make_mesh(get_target("cpu"), (4, 4))


def test_unknown_target():
    with pytest.raises(TargetError, match=r"unknown target 'tpu-v9'; choose a named slice \(tpu-v4-8 .. tpu-v4-4096"):
        get_target("tpu-v9")
    assert {"tpu-v4-8", "tpu-v4-32", "tpu-v4-64", "tpu-v4-4096", "tpu-v5e-32", "tpu-v5e-256", "cpu",
            "local"} <= set(TARGETS)


@pytest.mark.parametrize("name, topology, chips, processes", [
    ("tpu-v4-8", "v4:2x2x1", 4, 1), ("tpu-v4-32", "v4:2x2x4", 16, 4), ("tpu-v4-128", "v4:4x4x4", 64, 16),
    ("tpu-v4-4096", "v4:8x16x16", 2048, 512), ("tpu-v5e-4", "v5e:2x2", 4, 1), ("tpu-v5e-256", "v5e:16x16", 256, 64),
])
def test_named_slices_are_cloud_names_on_a_default_runtime(name, topology, chips, processes):
    """v4-N is N TensorCores = N/2 chips, one megacore device each (MaxText's table); v5e-N is N chips."""
    from capibara_export.matrix.targets import devices

    target = get_target(name)
    devs = devices(target)
    assert (target.topology, len(devs), len({d.process_index for d in devs})) == (topology, chips, processes)
    assert target.chip_config == ("megacore" if name.startswith("tpu-v4") else None)


def test_cpu_grid_is_row_major_by_id():
    import jax

    grid = device_grid(jax.devices("cpu"), (4, 8))
    assert [d.id for d in grid[1]] == list(range(8, 16))


@pytest.mark.parametrize("name, procs, per, chip, loads, grid_row", [
    ("v4:2x2x4", 4, 8, "one device per TensorCore", False, [0, 0, 1, 1, 2, 2, 3, 3]),
    ("tpu-v4-64", 8, 4, "megacore (one device per chip)", True, [0, 2, 4, 6, 0, 2, 4, 6]),
    ("tpu-v5e-32", 8, 4, "one device per chip", True, [0, 0, 2, 2, 4, 4, 6, 6]),
])
def test_host_layout_of_each_tpu_target(name, procs, per, chip, loads, grid_row):
    """Which host (JAX process) owns each mesh position, from the deviceless topology."""
    from capibara_export.matrix.targets import describe

    target = get_target(name)
    hosts = describe(make_mesh(target, (4, 8)), target)["hosts"]
    assert (hosts["processes"], hosts["devices_per_process"], hosts["chip_config"]) == (procs, per, chip)
    assert hosts["default_runtime_loads"] is loads and hosts["process_grid"][0] == grid_row
    assert sorted(p for row in hosts["process_grid"] for p in row) == sorted(list(range(procs)) * per)


def test_the_default_target_is_what_a_default_runtime_exposes():
    from capibara_export.matrix.driver import BuildRequest
    from capibara_export.cli import parser
    from capibara_export.matrix.targets import DEFAULT_TARGET

    assert DEFAULT_TARGET == BuildRequest().target == parser().parse_args(["build"]).target == "tpu-v4-64"
    assert get_target(DEFAULT_TARGET).chip_config == "megacore"


def test_a_runtime_that_is_not_the_bundles_is_named_with_both_sides_and_the_fix():
    from capibara_export.export.executables import runtime_mismatch
    from capibara_export.matrix.targets import describe

    target = get_target("v4:2x2x4")
    manifest = {"mesh": {**describe(make_mesh(target, (4, 8)), target), "devices": 32}}
    message = runtime_mismatch(manifest)
    assert message.startswith("compiled for 4 process(es) x 8 TPU v4 device(s), one device per TensorCore; "
                              "this runtime has 1 process(es) with 0 tpu device(s) each; start one process per "
                              "host of the target slice; note: a default Cloud TPU v4 runtime exposes one megacore")
    import jax

    n = len(jax.devices("cpu"))   # whatever this test process configured
    cpu = make_mesh(get_target("cpu"), (1, n))
    assert describe(cpu)["hosts"]["processes"] == 1
    assert runtime_mismatch({"mesh": {**describe(cpu), "devices": n}}) is None


def test_any_libtpu_topology_is_a_target_beyond_32_devices(tmp_path):
    """v4:4x4x4 in megacore mode (64 chips, 16 hosts x 4) compiles deviceless like the presets,
    under a file-name-safe folder name; generations without hardware constants are refused."""
    from capibara_export.matrix.driver import BuildRequest, run_build

    request = BuildRequest(target="v4:4x4x4/megacore", mesh=(8, 8), model="tiny", entries=("encode_image",),
                           plans=("dp",), precisions=("fp32",), batches=(64,), out=tmp_path)
    assert request.folder_name() == "tiny-v4-4x4x4-megacore-8x8"
    (record,) = run_build(request).records
    assert record.status == "ok", record.reason
    hosts = record.mesh["hosts"]
    assert (hosts["processes"], hosts["devices_per_process"], hosts["default_runtime_loads"]) == (16, 4, True)
    assert get_target("v4-4x4x4-megacore") == get_target("v4:4x4x4/megacore")
    assert get_target("v5e:16x16").hardware == "tpu-v5e-chip"
    with pytest.raises(TargetError, match="libtpu knows v6e, but capibara-export has no hardware constants"):
        get_target("v6e:4x8")
    with pytest.raises(TargetError, match="v5e has one TensorCore per chip"):
        get_target("v5e:4x8/megacore")
    with pytest.raises(TargetError, match=r"has 64 devices; use a mesh whose sizes multiply to 64 \(e.g. 8x8, 4x16"):
        make_mesh(get_target("v4:4x4x4/megacore"), (4, 8))


def test_a_command_called_in_process_after_jax_started_uses_the_devices_it_has():
    """environment.prepare after JAX started (the CLI's main() called in a test process of 32
    simulated devices): fewer devices are served by the first ones; more is one clear error."""
    import jax

    from capibara_export import environment
    from model.errors import UserError

    assert len(jax.devices("cpu")) == 32     # JAX is running: the conftest's 32 devices
    environment.prepare(target=None, cpu_devices=4)
    with pytest.raises(UserError, match="already runs JAX on 32 CPU device.*64 are needed"):
        environment.prepare(target=None, cpu_devices=64)
