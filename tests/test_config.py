"""Model configuration: counts, FLOPs, validation and HF config reading."""

import dataclasses
import json

import jax
import pytest

from model import BlipConfig, ConfigError, TextConfig, VisionConfig, get_preset
from model.random_params import init_params
from model.state import abstract_params


def test_base_caption_layout_has_the_published_parameter_count():
    counts = get_preset("base").param_breakdown()
    assert counts["vision"] == 86_090_496
    assert counts["text_decoder"] == 137_881_148
    assert get_preset("base").with_towers("caption").param_count() == 223_971_644


@pytest.mark.parametrize("towers", [("caption",), ("retrieval",), ("caption", "retrieval")])
def test_analytic_parameter_count_equals_the_built_model(towers):
    cfg = get_preset("tiny").with_towers(*towers)
    built = sum(x.size for x in jax.tree.leaves(abstract_params(cfg)))
    assert built == cfg.param_count()


def test_base_parameter_tree_matches_the_analytic_count_without_allocating():
    cfg = get_preset("base")
    assert sum(x.size for x in jax.tree.leaves(abstract_params(cfg))) == cfg.param_count()


def test_base_analytic_flops_match_the_reference_figures():
    cfg = get_preset("base")
    assert cfg.flops_encode_image(1) == pytest.approx(111e9, rel=0.10)
    assert cfg.flops_caption(1, new_tokens=20) == pytest.approx(132e9, rel=0.10)
    assert cfg.flops_encode_image(32) == 32 * cfg.flops_encode_image(1)


def test_decode_step_flops_grow_with_context_and_batch():
    cfg = get_preset("base")
    assert cfg.flops_decode_step(1, context=40) > cfg.flops_decode_step(1, context=1)
    assert cfg.flops_decode_step(8, context=5) == 8 * cfg.flops_decode_step(1, context=5)


@pytest.mark.parametrize("build, message", [
    (lambda: VisionConfig(width=770, heads=12), "vision.width (770) must be divisible by vision.heads (12)"),
    (lambda: VisionConfig(image_size=385), "vision.image_size (385) must be divisible by vision.patch_size"),
    (lambda: TextConfig(heads=7), "text.width (768) must be divisible by text.heads (7)"),
    (lambda: TextConfig(vocab_size=100), "text.bos_token_id (30522) must be a token id below text.vocab_size"),
    (lambda: BlipConfig(towers=("captions",)), "towers: unknown tower(s) ['captions']"),
    (lambda: BlipConfig(towers=()), "towers must name at least one"),
])
def test_invalid_configs_fail_at_construction_naming_the_field(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_config_round_trips_through_a_dict():
    cfg = get_preset("small")
    assert BlipConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_hf_reads_a_captioning_config(tmp_path):
    cfg = get_preset("base").with_towers("caption")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    loaded = BlipConfig.from_hf(tmp_path)
    assert loaded.vision == cfg.vision and loaded.text == cfg.text and loaded.towers == ("caption",)


def test_from_hf_errors_name_the_file_or_field(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        BlipConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        BlipConfig.from_hf(tmp_path)
    raw = get_preset("tiny").with_towers("caption").to_hf_dict()
    raw["architectures"] = ["BertModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="names neither BlipForConditionalGeneration"):
        BlipConfig.from_hf(tmp_path)
    raw = get_preset("tiny").with_towers("caption").to_hf_dict()
    raw["text_config"]["num_attention_heads"] = 5
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: text.width \(64\) must be divisible by text.heads \(5\)"):
        BlipConfig.from_hf(tmp_path)


def test_presets_are_frozen_and_hashable():
    cfg = get_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]
    assert hash(cfg) == hash(get_preset("tiny"))
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        get_preset("huge")


def test_init_params_are_random_where_hf_randomises_and_unit_where_norms_start():
    params = init_params(get_preset("tiny"), seed=0)
    assert float(abs(params["vision"]["blocks"]["qkv"]["kernel"]).mean()) > 1e-3
    assert float(params["vision"]["post_ln"]["scale"].min()) == 1.0


def test_init_params_draws_each_declared_rule_on_the_host_without_compiling():
    """normal(0, 0.02) kernels, unit scales, zero biases; the same seed gives the same values in
    every layout (drawn in the canonical tree, then moved), another seed others; and no XLA
    program is compiled for it (tracing the modules' jax.random draws compiled one per shape)."""
    import jax
    import numpy as np

    from model.layout import for_platform, from_layout

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    cfg = get_preset("tiny")
    params = init_params(cfg, seed=5)
    assert compiles == []
    kernel = np.asarray(params["text_decoder"]["blocks"]["mlp"]["fc1"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    assert not np.asarray(params["text_decoder"]["blocks"]["mlp"]["fc1"]["bias"]).any()
    assert (np.asarray(params["text_decoder"]["head_ln"]["scale"]) == 1.0).all()
    same = jax.tree.map(np.asarray, init_params(cfg, seed=5))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)))
    other = init_params(cfg, seed=6)
    assert not np.array_equal(np.asarray(other["itm_head"]["kernel"]), np.asarray(params["itm_head"]["kernel"]))
    served = for_platform(cfg, "cpu", kernel_layout="out-in")   # per-layer towers, out-in text kernels
    back = from_layout(init_params(served, seed=5), served)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(back),
                                                                          jax.tree.leaves(params)))
