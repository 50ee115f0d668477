"""Export: time to write each artifact kind and to load it cold (deserialize or restore,
then the first call, which includes that format's compilation), for `tiny` caption fp32."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.experimental import serialize_executable

from bench.harness import attach
from capibara_export.export import params as params_io, saved_model, stablehlo
from capibara_export.matrix.serving import example_inputs, flatten, serving_function
from model import get_preset
from model.random_params import init_params
from model.state import logical_names
from sharding import get_policy
from sharding.precision import store

MODEL, ENTRY, PRECISION, BATCH = "tiny", "caption", "fp32", 2
ROUNDS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg, policy = get_preset(MODEL), get_policy(PRECISION)
    serving = serving_function(cfg, ENTRY, policy, BATCH)
    flat = flatten(store(init_params(cfg, 0), logical_names(cfg), policy))
    inputs = example_inputs(serving, BATCH)
    reference = np.asarray(jax.jit(serving.fn)(flat, *inputs))
    return serving, flat, inputs, reference, tmp_path_factory.mktemp("formats")


def _info(benchmark, what: str):
    attach(benchmark, entry=ENTRY, plan=what, precision=PRECISION, batch=BATCH, target="local", model=MODEL,
           flops=0, analytic_flops=0, memory_peak=0, predicted_s=0.0, items=1, item_name="artifacts")


def test_jax_export(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export write"
    path = folder / "caption.jaxexport"
    benchmark.pedantic(lambda: stablehlo.save(stablehlo.export_portable(serving), path), rounds=ROUNDS)
    _info(benchmark, "jax.export")
    assert path.stat().st_size > 0


def test_jax_export_cold_load(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export load (cold start)"
    path = folder / "caption-load.jaxexport"
    stablehlo.save(stablehlo.export_portable(serving), path)
    out = benchmark.pedantic(lambda: np.asarray(stablehlo.load(path).call(flat, *inputs)), rounds=ROUNDS)
    _info(benchmark, "jax.export")
    np.testing.assert_array_equal(out, reference)


def _time_writes(benchmark, kind: str, write, folder, prefix: str) -> None:
    """Each round writes a fresh folder (no overwrite shortcuts); every one must hold files."""
    benchmark.group = "export write"
    written = []

    def once():
        written.append(folder / f"{prefix}{len(written)}")
        write(written[-1])
    benchmark.pedantic(once, rounds=ROUNDS)
    _info(benchmark, kind)
    assert written and all(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) > 0 for p in written)


def test_saved_model(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    _time_writes(benchmark, "saved_model", lambda p: saved_model.save(p, {ENTRY: serving}, flat, MODEL), folder, "sm")


def test_saved_model_cold_load(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export load (cold start)"
    saved_model.save(folder / "sm-load", {ENTRY: serving}, flat, MODEL)
    named = dict(zip(serving.input_names, inputs))
    out = benchmark.pedantic(lambda: saved_model.run(saved_model.load(folder / "sm-load"), ENTRY, named)["token_ids"],
                             rounds=ROUNDS)
    _info(benchmark, "saved_model")
    np.testing.assert_array_equal(out, reference)


def test_params_checkpoint(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    _time_writes(benchmark, "params", lambda p: params_io.save(p, flat), folder, "params")


def test_params_cold_restore(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export load (cold start)"
    params_io.save(folder / "params-load", flat)
    restored = benchmark.pedantic(lambda: params_io.restore(folder / "params-load"), rounds=ROUNDS)
    _info(benchmark, "params")
    assert all(np.array_equal(restored[k], np.asarray(v)) for k, v in flat.items())


def test_executable(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export write"
    compiled = jax.jit(serving.fn).lower(flat, *inputs).compile()
    payload = benchmark.pedantic(lambda: serialize_executable.serialize(compiled)[0], rounds=ROUNDS)
    _info(benchmark, "executable")
    assert len(payload) > 0


def test_executable_cold_load(benchmark, setup):
    serving, flat, inputs, reference, folder = setup
    benchmark.group = "export load (cold start)"
    from capibara_export.matrix.cache import jax_cache_disabled

    with jax_cache_disabled():
        compiled = jax.jit(serving.fn).lower(flat, *inputs).compile()
    payload, in_tree, out_tree = serialize_executable.serialize(compiled)

    def load_and_call():
        loaded = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, backend="cpu",
                                                           execution_devices=jax.devices("cpu")[:1])
        return np.asarray(loaded(flat, *inputs))

    out = benchmark.pedantic(load_and_call, rounds=ROUNDS)
    _info(benchmark, "executable")
    np.testing.assert_array_equal(out, reference)
