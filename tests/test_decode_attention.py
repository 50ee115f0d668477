"""The decode-step attention kernel (model/decode_attention.py): the Pallas program run in
interpret mode on this CPU against jax.nn.dot_product_attention, its lowering to one Triton
kernel for a GPU (lowered here, no GPU needed), the measured launch rule, and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import decode_attention as da
from model.decode_attention import decode_attention, key_bias, launch_settings


def _case(batch, keys, heads, head_dim, dtype, seed=0, fused_q=False):
    rng = np.random.default_rng(seed)
    kv = jnp.asarray(rng.normal(size=(batch, keys, 2, heads, head_dim)), dtype)
    q = jnp.asarray(rng.normal(size=(batch, 1, 3, heads, head_dim) if fused_q else (batch, 1, heads, head_dim)), dtype)
    allowed = rng.random((batch, 1, 1, keys)) > 0.35
    allowed[..., 0] = True   # every row attends somewhere, as the decoder's own token guarantees
    return q, kv, jnp.asarray(allowed)


def _reference(q, kv, allowed):
    return np.asarray(jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1], mask=allowed), np.float32)


@pytest.mark.parametrize("batch,keys,heads,head_dim,chunks", [
    (1, 577, 3, 64, 1),    # the image tokens: a prime length, the last block clamped back
    (1, 577, 3, 64, 5),    # split over 5 programs and merged
    (2, 24, 4, 16, 1),     # a short self-attention cache: one block of 16 and a clamped second
    (3, 40, 2, 8, 8),      # more chunks asked for than blocks exist
    (2, 16, 2, 8, 1),      # exactly one block
])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_dot_product_attention(batch, keys, heads, head_dim, chunks, masked):
    q, kv, allowed = _case(batch, keys, heads, head_dim, jnp.float32)
    bias = key_bias(allowed, keys) if masked else None
    out = decode_attention(q, kv, bias, chunks=chunks, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(np.asarray(out), _reference(q, kv, allowed if masked else None), atol=2e-6)


def test_bf16_fused_query_and_a_shared_mask():
    """bf16 in, f32 arithmetic inside; the query picked out of a fused (B, 1, 3, N, H)
    projection by q_slot; one mask row shared by every batch row (the decoder's causal mask)."""
    q3, kv, allowed = _case(3, 30, 4, 32, jnp.bfloat16, seed=1, fused_q=True)
    shared = allowed[:1]
    out = decode_attention(q3, kv, key_bias(shared, 30), q_slot=1, interpret=True)
    expected = _reference(q3[:, :, 1], kv, jnp.broadcast_to(shared, allowed.shape))
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=1.6e-2)   # bf16 output rounding
    assert np.max(np.abs(np.asarray(out, np.float32) - expected)) > 0, "compared nothing"


def test_masked_keys_do_not_contribute():
    """Changing a masked key's values changes nothing; changing an allowed one does."""
    q, kv, allowed = _case(1, 50, 2, 16, jnp.float32, seed=2)
    bias = key_bias(allowed, 50)
    base = np.asarray(decode_attention(q, kv, bias, interpret=True))
    hidden = int(np.flatnonzero(~np.asarray(allowed[0, 0, 0]))[0])
    shown = int(np.flatnonzero(np.asarray(allowed[0, 0, 0]))[-1])
    moved = decode_attention(q, kv.at[:, hidden].add(100.0), bias, interpret=True)
    np.testing.assert_array_equal(np.asarray(moved), base)
    assert not np.allclose(np.asarray(decode_attention(q, kv.at[:, shown].add(100.0), bias, interpret=True)), base)


@pytest.mark.parametrize("chunks", [1, 3])
def test_stacked_cache_read_in_place_with_the_fresh_token(chunks):
    """`layer` + `fresh`: the kernel reads one layer of the whole stacked (L, B, S, 2, N, H)
    cache, which does not hold this token yet, plus the token's own key and value from the
    fused projection: the same as writing them at `pos` first and attending over that layer."""
    layers_, batch, keys, heads, head_dim, pos = 3, 2, 40, 2, 16, 29
    rng = np.random.default_rng(3)
    cache = jnp.asarray(rng.normal(size=(layers_, batch, keys, 2, heads, head_dim)), jnp.float32)
    qkv = jnp.asarray(rng.normal(size=(batch, 1, 3, heads, head_dim)), jnp.float32)
    allowed = (np.arange(keys) <= pos)[None, None, None, :] & (rng.random((batch, 1, 1, keys)) > 0.3)
    allowed[..., pos] = True
    for layer in range(layers_):
        written = cache[layer].at[:, pos].set(qkv[:, 0, 1:])
        expected = _reference(qkv[:, :, 0], written, jnp.asarray(allowed))
        hidden = jnp.asarray(allowed & (np.arange(keys) != pos))   # the stale slot the token will take
        out = decode_attention(qkv, cache, key_bias(hidden, keys), q_slot=0, layer=jnp.int32(layer), fresh=True,
                               chunks=chunks, block=16, interpret=True)
        np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)


@pytest.mark.parametrize("chunks,kernels", [(1, 1), (5, 1)])
def test_lowers_to_one_triton_kernel_for_a_gpu(chunks, kernels):
    """Lowered for CUDA on this CPU host: Pallas' Triton lowering accepts the kernel (every
    loaded array a power of two) and emits one Triton call; the chunked form adds only XLA ops.
    So does the stacked-cache form with the fresh token and a traced layer index."""
    q = jax.ShapeDtypeStruct((1, 1, 3, 12, 64), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 577, 2, 12, 64), jnp.bfloat16)
    bias = jax.ShapeDtypeStruct((1, 577), jnp.float32)
    lowered = jax.jit(lambda q, kv, b: decode_attention(q, kv, b, q_slot=0, chunks=chunks)).trace(q, kv, bias) \
        .lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == kernels
    stacked = jax.ShapeDtypeStruct((12, 1, 24, 2, 12, 64), jnp.bfloat16)
    lowered = jax.jit(lambda q, kv, b, layer: decode_attention(q, kv, b, q_slot=0, layer=layer, fresh=True,
                                                               chunks=chunks)).trace(
        q, stacked, jax.ShapeDtypeStruct((1, 24), jnp.float32), jax.ShapeDtypeStruct((), jnp.int32)) \
        .lower(lowering_platforms=("cuda",))
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == kernels


def test_launch_rule_measured_on_an_h200(monkeypatch):
    """The rule in launch_settings, at the shapes the H200 probe timed (docs/performance.md)."""
    assert launch_settings("cross", 1, 12, 577) == {"block": 128, "chunks": 5, "num_warps": 4}
    assert launch_settings("cross", 32, 12, 577) == {"block": 128, "chunks": 1, "num_warps": 8}
    assert launch_settings("self", 1, 12, 24) == {"block": 128, "chunks": 1, "num_warps": 4}
    assert launch_settings("self", 32, 12, 24) == {"block": 128, "chunks": 1, "num_warps": 4}
    monkeypatch.setitem(da.OVERRIDE, "cross", {"block": 64, "chunks": 4, "num_warps": 2})
    assert launch_settings("cross", 1, 12, 577) == {"block": 64, "chunks": 4, "num_warps": 2}
    assert da.key_block(24) == 16 and da.key_block(577) == 128 and da.key_block(1) == 1


def test_bad_shapes_are_one_clear_error():
    q, kv, allowed = _case(2, 20, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match=r"\(B, 1, \[3,\] N, H\)"):
        decode_attention(jnp.concatenate([q, q], axis=1), kv, interpret=True)
    with pytest.raises(ValueError, match="q_slot"):
        decode_attention(jnp.stack([q] * 3, axis=2), kv, interpret=True)
    with pytest.raises(ValueError, match="one query row"):
        key_bias(jnp.ones((2, 1, 2, 20), bool), 20)
    with pytest.raises(ValueError, match="0 keys"):
        da.key_block(0)


def test_exports_trace_without_gpu_kernels(monkeypatch):
    """On a GPU host the model traces GPU-only kernels (cuDNN, this Pallas kernel), which
    jax.export cannot carry; the bundle's exports trace under model.portable_kernels, so a
    portable bf16 encode_image exported "on a GPU" holds neither (traced with them, the
    export fails: "cuDNN is not detected")."""
    from capibara_export.matrix.programs import ProgramOptions
    from capibara_export.matrix.serving import serving_function
    from capibara_export.export.stablehlo import export_portable
    from model import get_preset, layers, portable_kernels
    from sharding.precision import get_policy

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert {"cudnn", "pallas-decode"} <= layers.gpu_kernels()
    with portable_kernels():
        assert layers.gpu_kernels() == frozenset()
    assert "pallas-decode" in layers.gpu_kernels(), "the context restores the choices"
    serving = serving_function(get_preset("tiny").with_towers("caption"), "encode_image", get_policy("bf16"), 2,
                               ProgramOptions())
    text = export_portable(serving).mlir_module()
    assert "cudnn" not in text and "triton" not in text and "stablehlo.dot_general" in text
