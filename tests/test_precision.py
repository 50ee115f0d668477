"""Precision policies: int8 weight-only quantization and its shardings."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from model import get_preset
from model.quant import QArray, quantize
from model.random_params import init_params
from model.state import abstract_params, bind, logical_names
from sharding import load_plans, param_specs
from sharding.precision import POLICIES, PrecisionError, abstract_store, contracting_axes, get_policy, storage_specs, store


@pytest.mark.parametrize("names, axes", [
    (("layers", "embed", None, "heads", "head_dim"), (1,)),        # fused qkv kernel
    (("layers", "heads", "head_dim", "embed"), (1, 2)),            # attention output kernel
    (("vocab", "embed"), (1,)),                                    # tied embedding / LM head
    (("embed", "mlp"), (0,)),
    (("layers", "embed"), None),                                   # a stacked norm scale stays float
    (("mlp",), None),
])
def test_contracting_axes_follow_the_logical_names(names, axes):
    assert contracting_axes(names) == axes


def test_int8_round_trip_error_is_within_half_a_step_per_channel():
    w = jax.random.normal(jax.random.key(0), (64, 3, 4, 16)) * jnp.linspace(0.1, 2.0, 16)
    q = quantize(w, (0,))
    assert q.q.dtype == jnp.int8 and q.scale.shape == (1, 3, 4, 16)
    err = jnp.abs(q.dequantize(jnp.float32) - w)
    assert bool(jnp.all(err <= q.scale / 2 + 1e-7))


def test_int8_model_output_stays_close_to_fp32():
    cfg = get_preset("tiny")
    params, names = init_params(cfg, 3), logical_names(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 3, 32, 32))
    ref = bind(cfg, params).encode_image(x)
    quantized = store(params, names, get_policy("int8-weights"))
    assert isinstance(quantized["vision"]["blocks"]["qkv"]["kernel"], QArray)
    assert quantized["vision"]["post_ln"]["scale"].dtype == jnp.bfloat16
    out = bind(cfg, quantized, jnp.bfloat16).encode_image(x).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) < 0.15
    assert float(jnp.mean(jnp.abs(out - ref))) < 0.02


def test_abstract_int8_store_quarters_the_weight_bytes():
    cfg = get_preset("base")
    names = logical_names(cfg)
    nbytes = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    f32 = nbytes(abstract_store(abstract_params(cfg), names, get_policy("fp32")))
    int8 = nbytes(abstract_store(abstract_params(cfg), names, get_policy("int8-weights")))
    assert 0.25 < int8 / f32 < 0.27


def test_int8_scales_are_sharded_like_their_weights_except_on_contracted_axes():
    cfg = get_preset("base")
    names = logical_names(cfg)
    specs = storage_specs(param_specs(load_plans()["fsdp-tp"], names), names, get_policy("int8-weights"))
    out = specs["text_decoder"]["blocks"]["self_out"]["kernel"]
    assert out.q == P(None, None, "model", "data") and out.scale == P(None, None, None, "data")


def test_policies_and_unknown_names():
    assert list(POLICIES) == ["fp32", "bf16-mixed", "bf16", "int8-weights"]
    assert get_policy("bf16-mixed").params == jnp.float32 and get_policy("bf16-mixed").compute == jnp.bfloat16
    with pytest.raises(PrecisionError, match="unknown precision 'fp16'; choose from fp32, bf16-mixed, bf16, int8"):
        get_policy("fp16")
