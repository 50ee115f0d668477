"""The out-in kernel layout (model/layout.py): the same model, values, names and shardings
with the text towers' dense kernels stored outputs first."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from model import BlipConfig, ConfigError, get_preset, greedy_caption
from model.hf import params_from_hf_tensors
from model.layout import canonical, from_layout, serving_layout, to_layout
from model.state import abstract_params, bind, init_params, logical_names
from sharding.precision import abstract_store, get_policy, store
from tests.test_parity import LOGITS_ATOL, _fixture, _pad_to

TINY = get_preset("tiny")
OUT_IN = TINY.with_kernel_layout("out-in")


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_to_layout_moves_values_names_and_shapes_together():
    params = init_params(TINY, 0)
    moved = to_layout(params, OUT_IN)
    assert _shapes(moved) == _shapes(abstract_params(OUT_IN)), "converted values must fit the out-in model"
    assert to_layout(logical_names(TINY), OUT_IN) == logical_names(OUT_IN)
    # the text kernels move, the vision tower and the embeddings do not
    fc1 = params["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"]          # (layers, embed, mlp)
    np.testing.assert_array_equal(moved["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"],
                                  np.swapaxes(fc1, 1, 2))
    qkv = params["text_decoder"]["blocks"]["self_qkv"]["kernel"]            # (layers, embed, 3, heads, head_dim)
    np.testing.assert_array_equal(moved["text_decoder"]["blocks"]["self_qkv"]["kernel"],
                                  np.transpose(qkv, (0, 2, 3, 4, 1)))
    out = params["text_encoder"]["blocks"]["self_out"]["kernel"]            # (layers, heads, head_dim, embed)
    np.testing.assert_array_equal(moved["text_encoder"]["blocks"]["self_out"]["kernel"],
                                  np.transpose(out, (0, 3, 1, 2)))
    assert moved["vision"]["blocks"]["mlp"]["fc1"]["kernel"] is params["vision"]["blocks"]["mlp"]["fc1"]["kernel"]
    back = from_layout(moved, OUT_IN)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, params)))
    assert to_layout(params, TINY) is params, "the canonical layout converts nothing"
    assert canonical(OUT_IN) == TINY


def test_out_in_model_matches_transformers():
    """The fixture's HF tensors, converted to out-in, give HF's logits, captions and scores."""
    from tests.hf_reference import NEW_TOKENS

    case = _fixture()
    x = case["inputs"]
    cfg = case["config"]
    pixels = jnp.asarray(x["pixels"])
    caption_cfg = cfg.with_towers("caption")
    params = to_layout(params_from_hf_tensors(caption_cfg, case["caption"]["tensors"]),
                       caption_cfg.with_kernel_layout("out-in"))
    model = bind(caption_cfg.with_kernel_layout("out-in"), jax.tree.map(jnp.asarray, params))
    image = model.encode_image(pixels)
    logits = model.decoder_logits(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), image)
    np.testing.assert_allclose(np.asarray(logits), case["caption"]["outputs"]["logits"], atol=LOGITS_ATOL)
    batch = x["pixels"].shape[0]
    prompt = jnp.full((batch, 1), cfg.text.bos_token_id, jnp.int32)
    ours = np.asarray(jax.jit(lambda px, pr: greedy_caption(model, px, pr, NEW_TOKENS))(pixels, prompt))
    np.testing.assert_array_equal(ours, _pad_to(case["caption"]["outputs"]["generate"], ours.shape[1],
                                                cfg.text.pad_token_id))
    retrieval_cfg = cfg.with_towers("retrieval")
    params = to_layout(params_from_hf_tensors(retrieval_cfg, case["retrieval"]["tensors"]),
                       retrieval_cfg.with_kernel_layout("out-in"))
    model = bind(retrieval_cfg.with_kernel_layout("out-in"), jax.tree.map(jnp.asarray, params))
    image = model.encode_image(pixels)
    itm = model.itm_logits(image, jnp.asarray(x["ids"]), jnp.asarray(x["mask"]))
    np.testing.assert_allclose(np.asarray(itm), case["retrieval"]["outputs"]["itm"], atol=LOGITS_ATOL)


def test_int8_scales_follow_their_kernels():
    """int8 scales are taken per output channel in the canonical layout, then moved: the
    out-in model dequantises to exactly the canonical model's weights."""
    policy = get_policy("int8-weights")
    params = init_params(TINY, 0)
    stored = store(params, logical_names(TINY), policy)
    moved = to_layout(stored, OUT_IN)
    q = moved["text_decoder"]["blocks"]["mlp"]["fc2"]["kernel"]          # (layers, embed, mlp) out-in
    assert q.q.shape == (TINY.text.depth, TINY.text.width, TINY.text.mlp)
    assert q.scale.shape == (TINY.text.depth, TINY.text.width, 1), "one scale per output channel"
    template = to_layout(abstract_store(abstract_params(TINY), logical_names(TINY), policy), OUT_IN)
    assert _shapes(template) == _shapes(moved)
    ids = jnp.full((1, 4), 7, jnp.int32)
    image = jnp.ones((1, TINY.vision.tokens, TINY.vision.width), jnp.bfloat16)
    a = bind(TINY, stored, jnp.bfloat16).decoder_logits(ids, None, image)
    b = bind(OUT_IN, moved, jnp.bfloat16).decoder_logits(ids, None, image)
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=0.1)
    assert float(np.mean(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))) < 0.01


def test_partition_specs_move_with_the_kernels():
    from capibara_export.build.programs import build_program, in_specs
    from sharding.plans import load_plans

    plan = load_plans()["fsdp-tp"]
    policy = get_policy("int8-weights")
    specs = {}
    for cfg in (TINY, OUT_IN):
        program = build_program(cfg, "caption", policy, 4)
        specs[cfg.text.kernel_layout] = in_specs(program, plan)[0]
        structs = program.args[0]
        assert _shapes(structs) == _shapes(to_layout(abstract_store(abstract_params(TINY), logical_names(TINY),
                                                                    policy), cfg))
    canon = specs["in-out"]["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    moved = specs["out-in"]["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    assert isinstance(moved.q, PartitionSpec)
    padded = tuple(canon.q) + (None,) * (3 - len(canon.q))
    assert tuple(moved.q) + (None,) * (3 - len(moved.q)) == (padded[0], padded[2], padded[1])
    assert moved.q != canon.q, "fsdp-tp shards fc1 on two axes: the test must see them move"
    assert to_layout(specs["in-out"], OUT_IN)["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"] == moved


def test_kernel_layout_is_config_data():
    assert serving_layout("gpu") == "out-in"
    assert serving_layout("cpu") == serving_layout("tpu") == "in-out"
    data = OUT_IN.to_dict()
    assert data["text"]["kernel_layout"] == "out-in"
    assert BlipConfig.from_dict(data) == OUT_IN
    del data["text"]["kernel_layout"]   # a manifest written before the field existed
    assert BlipConfig.from_dict(data) == TINY
    with pytest.raises(ConfigError, match="text.kernel_layout is 'columns'; choose one of in-out, out-in"):
        TINY.with_kernel_layout("columns")
    assert "kernel_layout" not in str(OUT_IN.to_hf_dict())


def test_a_short_partition_spec_is_padded_to_the_kernels_rank_before_moving():
    """A spec may leave trailing unsharded axes out: P('data') on a stacked (layers, embed, mlp)
    kernel still moves as a rank-3 spec."""
    moved = to_layout({"text_decoder": {"blocks": {"mlp": {"fc1": {"kernel": PartitionSpec(None, "data")}}}}},
                      OUT_IN)
    assert moved["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"] == PartitionSpec(None, None, "data")
