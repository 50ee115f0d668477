"""Every valid plan's compiled program, run on the simulated 32-device CPU mesh, computes
what the unsharded program computes (tiny model, real inputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capibara_export.matrix.programs import build_program, in_specs, lower, place
from model.family import FAMILY
from capibara_export.matrix.targets import get_target, make_mesh
from model import get_preset
from model.random_params import init_params
from model.state import bind, logical_names
from sharding import get_policy, load_plans
from sharding.precision import store

pytestmark = pytest.mark.slow

CFG = get_preset("tiny")
BATCH = 32
TOLERANCE = {"fp32": 1e-5, "bf16": 0.05, "int8-weights": 0.05}
TIE_MARGIN = 0.1  # a bf16 caption may take the other branch only where two logits are this close


def real_inputs(entry: str, program) -> tuple:
    rng = np.random.default_rng(7)
    t = CFG.text
    pixels = rng.normal(size=program.args[1].shape).astype(np.float32) if entry != "decode_step" else None
    if entry == "encode_image":
        return (pixels,)
    if entry == "caption":
        return pixels, np.full(program.args[2].shape, t.bos_token_id, np.int32), np.ones(program.args[3].shape, np.int32)
    if entry == "score":
        ids = rng.integers(5, 100, size=program.args[2].shape).astype(np.int32)
        mask = (np.arange(ids.shape[1])[None] < rng.integers(4, ids.shape[1], size=(BATCH, 1))).astype(np.int32)
        return pixels, ids, mask
    cache = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), program.args[3])
    return rng.integers(5, 100, size=(BATCH, 1)).astype(np.int32), np.int32(4), cache


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(get_target("cpu"), (4, 8))


@pytest.fixture(scope="module")
def float_params():
    return init_params(CFG, seed=11)


def _run(program, plan, mesh, args):
    compiled = lower(program, plan, mesh).compile()
    shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), in_specs(program, plan),
                             is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return jax.tree.map(np.asarray, compiled(*place(args, shardings)))


def _assert_captions_equal_up_to_ties(ours, ref, params, precision, pixels):
    """Token ids equal, except that a row may diverge where the reference's two candidate
    tokens had logits within TIE_MARGIN (bf16 rounding decides a near tie either way). The
    reference's logits for all positions of the diverging rows come from one compiled call
    (the decoder is causal: position k-1 holds what the prefix ref[:, :k] predicts)."""
    rows = np.nonzero((ours != ref).any(axis=1))[0]
    if not len(rows):
        return
    compute = get_policy(precision).compute

    def logits(params, pixels, ids):
        model = bind(CFG, params, compute)
        return model.caption_logits(pixels, ids, jnp.ones_like(ids))
    all_logits = np.asarray(jax.jit(logits)(params, pixels[rows], ref[rows]), np.float32)
    for i, row in enumerate(rows):
        k = int(np.argmax(ours[row] != ref[row]))
        assert k > 0, f"row {row} differs in its prompt"
        margin = abs(all_logits[i, k - 1, ref[row, k]] - all_logits[i, k - 1, ours[row, k]])
        assert margin < TIE_MARGIN, f"row {row} diverges at {k} with logit margin {margin:.3f}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8-weights"])
@pytest.mark.parametrize("entry", FAMILY.serving_entries)
def test_every_valid_plan_matches_the_unsharded_program(entry, precision, mesh, float_params):
    policy = get_policy(precision)
    program = build_program(CFG, entry, policy, BATCH)
    params = store(float_params, logical_names(CFG), policy)
    args = (params, *real_inputs(entry, program))
    reference = jax.tree.map(np.asarray, jax.jit(program.fn)(*jax.tree.map(jnp.asarray, args)))
    # fp32 on every plan; bf16 on one plan of each kind (batch-split, 2-D, hidden); int8 on the 2-D plan
    subset = {"fp32": list(load_plans()), "bf16": ["dp", "fsdp-tp", "hidden"], "int8-weights": ["fsdp-tp"]}
    plans = [load_plans()[name] for name in subset[precision]]
    for plan in plans:
        out = _run(program, plan, mesh, args)
        if entry == "caption" and precision != "fp32":
            _assert_captions_equal_up_to_ties(out, reference, float_params, precision, args[1])
            continue
        for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
            if np.issubdtype(want.dtype, np.integer):
                np.testing.assert_array_equal(got, want, err_msg=f"{entry}/{plan.name}/{precision}")
            else:
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32),
                                           atol=TOLERANCE[precision], rtol=TOLERANCE[precision],
                                           err_msg=f"{entry}/{plan.name}/{precision}")
