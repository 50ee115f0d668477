"""XLA compile options by where a program runs (capibara_export/compiler_options.py): one CPU
device compiles its dots through Eigen, the simulated mesh and accelerators keep XLA's defaults,
and the options reach the compiler, the build record and the result-cache key."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from capibara_export import compiler_options
from capibara_export.analysis import report
from capibara_export.matrix.cache import cache_key
from capibara_export.matrix.compile import compile_unit
from capibara_export.matrix.programs import ProgramOptions
from capibara_export.matrix.records import Unit
from capibara_export.matrix.targets import describe, get_target, hardware_for, make_mesh
from model import get_preset
from sharding import load_plans


@pytest.mark.parametrize("platforms, expected", [
    (["cpu"], {"xla_cpu_experimental_ynn_fusion_type": ""}),
    (["cpu"] * 32, None),
    (["tpu"], None),
    (["gpu"], None),
    (["gpu"] * 8, None),
])
def test_only_one_cpu_device_changes_the_defaults(platforms, expected):
    assert compiler_options.for_devices(SimpleNamespace(platform=p) for p in platforms) == expected


def test_each_call_gets_its_own_dict():
    options = compiler_options.for_devices(jax.devices("cpu")[:1])
    options["changed"] = "yes"
    assert compiler_options.for_devices(jax.devices("cpu")[:1]) == compiler_options.ONE_CPU_DEVICE


def test_deviceless_tpu_meshes_keep_xlas_defaults():
    assert describe(make_mesh(get_target("tpu-v4-64"), (4, 8)))["compiler_options"] is None


def _mesh(shape: tuple[int, int]) -> Mesh:
    return Mesh(np.array(jax.devices("cpu")[:shape[0] * shape[1]]).reshape(shape), ("data", "model"))


@pytest.mark.parametrize("shape, ynn_fusions", [((1, 1), False), ((4, 8), True)])
def test_the_options_reach_the_compiler_and_the_cache_key(shape, ynn_fusions):
    """One device: no YNNPACK fusion is left in the compiled program; 32 devices keep them.
    The record's mesh (and so the result-cache key) says which options compiled it."""
    mesh = _mesh(shape)
    unit = Unit("cpu", "x".join(map(str, shape)), "tiny", "-", "encode_image", "dp", "fp32", shape[0] * shape[1])
    record, compiled = compile_unit(get_preset("tiny"), unit, load_plans()["dp"], mesh,
                                    hardware_for(get_target("cpu"), mesh), ProgramOptions())
    assert record.status == "ok", record.reason
    assert ("ynn_fusion" in compiled.hlo_text) is ynn_fusions
    info = describe(mesh)
    assert info["compiler_options"] == (None if ynn_fusions else compiler_options.ONE_CPU_DEVICE)
    other = {**info, "compiler_options": compiler_options.ONE_CPU_DEVICE if ynn_fusions else None}
    args = (unit.to_dict(), get_preset("tiny").to_dict(), load_plans()["dp"].to_dict())
    assert cache_key(*args, info) != cache_key(*args, other)


def test_the_report_names_the_options():
    assert report._options(compiler_options.ONE_CPU_DEVICE) == "xla_cpu_experimental_ynn_fusion_type=''"
    assert report._options(None) == "XLA's defaults"


def test_the_semiotic_engine_and_the_bench_compile_with_these_options(monkeypatch):
    """An option XLA refuses, put where one CPU device's options come from: the semiotic
    module's engine and the bench harness both fail on it, so both compile with them."""
    import warnings

    from bench import harness
    from capibara_export.semiotic.module import MnemosyneSemioModule

    monkeypatch.setattr(compiler_options, "ONE_CPU_DEVICE", {"xla_no_such_option": "1"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights warn
        module = MnemosyneSemioModule.random("tiny")
    size = get_preset("tiny").vision.image_size
    with pytest.raises(Exception, match="xla_no_such_option"):
        module.captioner.encode(np.zeros((1, 3, size, size), np.float32))
    with pytest.raises(Exception, match="xla_no_such_option"):
        harness.runnable("tiny", "encode_image", "fp32", 1)
