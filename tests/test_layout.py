"""The serving layouts (model/layout.py): the same model, values, names and shardings with
the text towers' dense kernels stored outputs first (out-in) or their layers stored per
layer instead of stacked."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from model import BlipConfig, ConfigError, get_preset, greedy_caption
from model.hf import params_from_hf_tensors
from model.layout import (
    canonical,
    for_platform,
    from_layout,
    serving_cross_cache,
    serving_layout,
    serving_storage,
    to_layout,
)
from model.random_params import init_params
from model.state import abstract_params, bind, logical_names
from sharding.precision import abstract_store, get_policy, store
from tests.test_parity import LOGITS_ATOL, _fixture, _pad_to

TINY = get_preset("tiny")
OUT_IN = TINY.with_kernel_layout("out-in")
PER_LAYER = TINY.with_layer_storage("per-layer")


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


@pytest.mark.parametrize("layout, storage, cross_cache", [("out-in", "stacked", "patch-major"),
                                                          ("in-out", "per-layer", "head-major")])
def test_serving_layouts_match_transformers(layout, storage, cross_cache):
    """The fixture's HF tensors in the GPU and the CPU serving layouts (out-in kernels;
    per-layer storage with the head-major cross cache) give HF's logits, captions and scores."""
    from tests.hf_reference import NEW_TOKENS

    case = _fixture()
    x = case["inputs"]
    cfg = case["config"]
    pixels = jnp.asarray(x["pixels"])
    caption_cfg = cfg.with_towers("caption")
    serving = caption_cfg.with_kernel_layout(layout).with_layer_storage(storage).with_cross_cache(cross_cache)
    params = to_layout(params_from_hf_tensors(caption_cfg, case["caption"]["tensors"]), serving)
    model = bind(serving, jax.tree.map(jnp.asarray, params))
    image = model.encode_image(pixels)
    logits = model.decoder_logits(jnp.asarray(x["ids"]), jnp.asarray(x["mask"]), image)
    np.testing.assert_allclose(np.asarray(logits), case["caption"]["outputs"]["logits"], atol=LOGITS_ATOL)
    batch = x["pixels"].shape[0]
    prompt = jnp.full((batch, 1), cfg.text.bos_token_id, jnp.int32)
    ours = np.asarray(jax.jit(lambda px, pr: greedy_caption(model, px, pr, NEW_TOKENS))(pixels, prompt))
    np.testing.assert_array_equal(ours, _pad_to(case["caption"]["outputs"]["generate"], ours.shape[1],
                                                cfg.text.pad_token_id))
    retrieval_cfg = cfg.with_towers("retrieval")
    serving = retrieval_cfg.with_kernel_layout(layout).with_layer_storage(storage).with_cross_cache(cross_cache)
    params = to_layout(params_from_hf_tensors(retrieval_cfg, case["retrieval"]["tensors"]), serving)
    model = bind(serving, jax.tree.map(jnp.asarray, params))
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
    from capibara_export.matrix.programs import build_program, in_specs
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


@pytest.mark.parametrize("config", [PER_LAYER, PER_LAYER.with_kernel_layout("out-in")], ids=["in-out", "out-in"])
def test_per_layer_storage_splits_values_names_and_specs_together(config):
    """Each tower's stacked leaves become one entry per layer, the leading `layers` axis
    dropped from values, int8 scales, logical names and PartitionSpecs alike (only the text
    kernels move to out-in); joining gives the canonical tree back."""
    from sharding.plans import load_plans
    from model.family import FAMILY
    from sharding.storage import stored_params, stored_specs, stored_template

    params = init_params(TINY, 0)
    split = to_layout(params, config)
    assert _shapes(split) == _shapes(abstract_params(config)), "split values must fit the per-layer model"
    assert to_layout(logical_names(TINY), config) == logical_names(config)
    assert sorted(split["text_decoder"]["blocks"]) == list(range(TINY.text.depth))
    assert sorted(split["text_encoder"]["blocks"]) == list(range(TINY.text.depth))
    fc2 = params["text_decoder"]["blocks"]["mlp"]["fc2"]["kernel"]            # (layers, mlp, embed)
    moved = np.swapaxes(fc2, 1, 2) if config.text.kernel_layout == "out-in" else fc2
    for i in range(TINY.text.depth):
        np.testing.assert_array_equal(split["text_decoder"]["blocks"][i]["mlp"]["fc2"]["kernel"], moved[i])
    assert sorted(split["vision"]["blocks"]) == list(range(TINY.vision.depth))
    np.testing.assert_array_equal(split["vision"]["blocks"][1]["mlp"]["fc1"]["kernel"],
                                  params["vision"]["blocks"]["mlp"]["fc1"]["kernel"][1])
    assert split["vision"]["class_embed"] is params["vision"]["class_embed"]
    back = from_layout(split, config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, params)))
    assert canonical(config) == TINY

    policy = get_policy("int8-weights")
    stored = stored_params(FAMILY, params, config, policy)
    assert _shapes(stored) == _shapes(stored_template(FAMILY, config, policy))
    q = stored["text_decoder"]["blocks"][1]["mlp"]["fc1"]["kernel"]
    whole = store(params, logical_names(TINY), policy)["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"]
    layer1 = (np.swapaxes(whole.q[1], 0, 1), np.swapaxes(whole.scale[1], 0, 1)) \
        if config.text.kernel_layout == "out-in" else (whole.q[1], whole.scale[1])
    np.testing.assert_array_equal(q.q, layer1[0])
    np.testing.assert_array_equal(q.scale, layer1[1])
    specs = stored_specs(FAMILY, load_plans()["fsdp-tp"], config, policy)
    canon = stored_specs(FAMILY, load_plans()["fsdp-tp"], canonical(config), policy)
    layer_spec = specs["text_decoder"]["blocks"][0]["mlp"]["fc1"]["kernel"].q
    canon_spec = canon["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"].q
    padded = tuple(canon_spec) + (None,) * (3 - len(canon_spec))
    expected = (padded[2], padded[1]) if config.text.kernel_layout == "out-in" else padded[1:]
    assert tuple(layer_spec) + (None,) * (2 - len(layer_spec)) == expected
    assert any(expected), "fsdp-tp shards fc1: the test must see the spec carried over"


@pytest.mark.parametrize("cross_cache", ["patch-major", "head-major", "kv-major"])
def test_per_layer_model_equals_the_stacked_model(cross_cache):
    """Same parameters, same numbers: the per-layer model's logits and captions equal the
    stacked model's (both run the same ops, one loop written out; the head-major and
    kv-major caches only reorder the cached keys and values)."""
    cfg = TINY.with_towers("caption")
    per_layer = cfg.with_layer_storage("per-layer").with_cross_cache(cross_cache)
    params = init_params(cfg, 3)
    stacked_model, split_model = bind(cfg, params), bind(per_layer, to_layout(params, per_layer))
    pixels = jax.random.normal(jax.random.key(0), (2, 3, cfg.vision.image_size, cfg.vision.image_size))
    prompt = jnp.full((2, 1), cfg.text.bos_token_id, jnp.int32)
    captions = [np.asarray(jax.jit(lambda px, pr, m=m: greedy_caption(m, px, pr, 6))(pixels, prompt))
                for m in (stacked_model, split_model)]
    np.testing.assert_array_equal(*captions)
    image = stacked_model.encode_image(pixels)
    ids = jnp.array([[cfg.text.bos_token_id, 5, 9], [cfg.text.bos_token_id, 7, 2]], jnp.int32)
    np.testing.assert_allclose(np.asarray(stacked_model.decoder_logits(ids, None, image)),
                               np.asarray(split_model.decoder_logits(ids, None, image)), atol=1e-6)


def _copies_in_cpu_caption(config) -> tuple[int, int]:
    """(weight-sized dynamic slices of the text decoder's parameters, copies or slices of the
    cached cross-attention keys or values in the decode loop) in the compiled CPU caption program."""
    import re

    from capibara_export.matrix.programs import build_program

    program = build_program(config, "caption", get_policy("fp32"), 1)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), program.args)
    text = jax.jit(program.fn).lower(*zeros).compile().as_text()
    slices = re.findall(r'%dynamic-slice[\w.-]* = f32\[(\d+),(\d+)\][^\n]*op_name="[^"]*text_decoder', text)
    in_loop = r'op_name="[^"]*while/body[^"]*cross_attention'
    copies = re.findall(r'%\w*(?:copy|slice)[\w.-]* = f32\[([\d,]+)\][^\n]*' + in_loop, text)
    one_layer = config.text.width * config.vision.tokens   # a layer's keys (or values) for one image
    return (sum(1 for rows, cols in slices if int(rows) > 1 and int(cols) > 1),
            sum(1 for dims in copies if np.prod([int(d) for d in dims.split(",")]) >= one_layer))


def test_cpu_serving_layout_reads_weights_and_cross_cache_in_place():
    """The platform choice, and what it is for: compiled for the CPU, the stacked decoder
    slices (copies) its layers' weights inside the loops and the patch-major cross cache is
    transposed before the attention dots; the CPU serving layout does neither."""
    assert serving_storage("cpu") == "per-layer" and serving_cross_cache("cpu") == "head-major"
    assert serving_storage("tpu") == serving_storage("gpu") == "stacked"
    assert serving_cross_cache("tpu") == serving_cross_cache("gpu") == "patch-major"
    cpu = for_platform(TINY, "cpu")
    assert (cpu.text.layer_storage, cpu.vision.layer_storage, cpu.text.cross_cache) == \
        ("per-layer", "per-layer", "head-major")
    assert for_platform(TINY, "gpu").text.kernel_layout == "out-in"
    overridden = for_platform(TINY, "cpu", layer_storage="stacked")   # build --layer-storage stacked
    assert (overridden.text.layer_storage, overridden.text.cross_cache) == ("stacked", "head-major")
    cfg = TINY.with_towers("caption")
    slices, copies = _copies_in_cpu_caption(cfg)
    assert slices > 0 and copies > 0, "the stacked program must show the copies this test guards"
    assert _copies_in_cpu_caption(for_platform(cfg, "cpu")) == (0, 0)


def test_the_cpu_decode_loop_reads_each_layers_cache_in_place(monkeypatch):
    """Per-layer storage carries the decode cache as each layer's own buffers
    (TextTower.layer_caches): with the stacked cache instead, every step copies each layer's
    cross-attention keys or values out of it (XLA:CPU hands a dot only a whole buffer)."""
    from model.text import TextTower

    cpu = for_platform(TINY.with_towers("caption"), "cpu")
    assert _copies_in_cpu_caption(cpu)[1] == 0
    monkeypatch.setattr(TextTower, "layer_caches", lambda self, cache: cache)
    assert _copies_in_cpu_caption(cpu)[1] >= cpu.text.depth, "a copy per layer per step without layer_caches"


def test_layer_storage_is_config_data():
    data = PER_LAYER.to_dict()
    assert data["text"]["layer_storage"] == "per-layer"
    assert data["vision"]["layer_storage"] == "per-layer"
    assert BlipConfig.from_dict(data) == PER_LAYER
    del data["text"]["layer_storage"], data["vision"]["layer_storage"]   # a manifest from before the field
    assert BlipConfig.from_dict(data) == TINY
    with pytest.raises(ConfigError, match="layer_storage is 'rows'; choose one of stacked, per-layer"):
        TINY.with_layer_storage("rows")
    assert "layer_storage" not in str(PER_LAYER.to_hf_dict())
