"""train_step: the captioning loss and one AdamW update, with each rematerialisation policy."""

import jax
import numpy as np
import pytest

from capibara_export.matrix.programs import ProgramError, ProgramOptions, build_program, lower
from capibara_export.matrix.targets import get_target, make_mesh
from model import get_preset
from model.random_params import init_params
from sharding import get_policy, load_plans

CFG = get_preset("tiny")


def _batch(program):
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=program.args[2].shape).astype(np.float32)
    ids = rng.integers(5, 100, size=program.args[3].shape).astype(np.int32)
    ids[:, 0] = CFG.text.bos_token_id
    return pixels, ids, np.ones_like(ids)


def test_one_step_lowers_the_loss_on_the_same_batch():
    program = build_program(CFG, "train_step", get_policy("fp32"), 4, ProgramOptions(text_len=8, learning_rate=1e-3))
    params = init_params(CFG, 0)
    state = program.optimizer.init(params)
    step = jax.jit(program.fn)
    batch = _batch(program)
    params, state, first = step(params, state, *batch)
    for _ in range(3):
        params, state, last = step(params, state, *batch)
    assert np.isfinite(float(first["loss"])) and float(last["loss"]) < float(first["loss"])


@pytest.fixture(scope="module")
def step_without_remat():
    """One step without rematerialisation: (params, batch, its result), shared by the policies."""
    base = build_program(CFG, "train_step", get_policy("fp32"), 4, ProgramOptions(text_len=8))
    params = init_params(CFG, 1)
    batch = _batch(base)
    return params, batch, jax.jit(base.fn)(params, base.optimizer.init(params), *batch)


@pytest.mark.parametrize("remat", ["full", "dots-saveable"])
def test_remat_policies_compute_the_same_loss_and_gradients(remat, step_without_remat):
    params, batch, a = step_without_remat
    other = build_program(CFG, "train_step", get_policy("fp32"), 4, ProgramOptions(text_len=8, remat=remat))
    b = jax.jit(other.fn)(params, other.optimizer.init(params), *batch)
    np.testing.assert_allclose(float(a[2]["loss"]), float(b[2]["loss"]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_remat_full_lowers_peak_memory_on_tpu():
    mesh = make_mesh(get_target("v4:2x2x4"), (4, 8))   # 32 TensorCores as devices
    peaks = {}
    for remat in ("none", "full"):
        # tiny at batch 256: its saved activations (34 MB a device without remat, 21 MB with) outweigh
        # what XLA keeps anyway, at a quarter of small's compile time (at batch 32 both need 0 bytes)
        program = build_program(CFG, "train_step", get_policy("bf16-mixed"), 256,
                                ProgramOptions(text_len=32, remat=remat))
        peaks[remat] = lower(program, load_plans()["fsdp"], mesh).compile().memory_analysis().temp_size_in_bytes
    assert peaks["full"] < 0.9 * peaks["none"], peaks


def test_int8_is_a_serving_precision():
    with pytest.raises(ProgramError, match="int8-weights is a serving precision"):
        build_program(CFG, "train_step", get_policy("int8-weights"), 4)
