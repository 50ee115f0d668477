"""Targets and meshes: deviceless TPU slices, simulated CPU devices, clear errors."""

import pytest

from capibara_export.targets import TARGETS, TargetError, device_grid, get_target, make_mesh, parse_mesh


@pytest.mark.parametrize("text, shape", [("4x8", (4, 8)), ("8x4", (8, 4)), (" 2 x 16 ", (2, 16)), ("1x32", (1, 32))])
def test_parse_mesh(text, shape):
    assert parse_mesh(text) == shape


@pytest.mark.parametrize("text", ["abc", "4x", "4x0", "4*8", ""])
def test_parse_mesh_rejects_malformed_shapes(text):
    with pytest.raises(TargetError, match="is not of the form DATAxMODEL"):
        parse_mesh(text)


@pytest.mark.parametrize("name, kind", [("tpu-v4-32", "TPU v4"), ("tpu-v4-64", "TPU v4"), ("tpu-v5e-32", "TPU v5 lite")])
@pytest.mark.parametrize("shape", [(4, 8), (8, 4), (2, 16), (1, 32)])
def test_tpu_targets_build_32_device_meshes_without_a_tpu(name, kind, shape):
    mesh = make_mesh(get_target(name), shape)
    assert dict(mesh.shape) == {"data": shape[0], "model": shape[1]}
    assert mesh.devices.flat[0].device_kind == kind
    assert len({d.id for d in mesh.devices.flat}) == 32


def test_v4_32_model_axis_pairs_the_two_cores_of_a_chip():
    mesh = make_mesh(get_target("tpu-v4-32"), (4, 8))
    row = mesh.devices[0]
    assert [tuple(d.coords) for d in row[:2]] == [tuple(row[0].coords)] * 2
    assert [d.core_on_chip for d in row[:2]] == [0, 1]


def test_wrong_device_count_says_what_fits():
    with pytest.raises(TargetError, match=r"--mesh 4x9 needs 36 devices but tpu-v4-32 has 32 devices; .*4x8, 8x4"):
        make_mesh(get_target("tpu-v4-32"), (4, 9))
    with pytest.raises(TargetError, match="jax_num_cpu_devices"):
        make_mesh(get_target("cpu"), (4, 4))


def test_unknown_target():
    with pytest.raises(TargetError, match="unknown target 'tpu-v9'; choose one of tpu-v4-32"):
        get_target("tpu-v9")
    assert set(TARGETS) == {"tpu-v4-32", "tpu-v4-64", "tpu-v5e-32", "cpu", "local"}


def test_cpu_grid_is_row_major_by_id():
    import jax

    grid = device_grid(jax.devices("cpu"), (4, 8))
    assert [d.id for d in grid[1]] == list(range(8, 16))
