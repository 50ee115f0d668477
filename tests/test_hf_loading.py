"""Loading Hugging Face BLIP folders: both architectures, tied-head variants, clear errors."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from model.hf import CheckpointError, load_checkpoint
from model.state import abstract_params
from tests.test_parity import _fixture

TIED_COPY = "text_decoder.cls.predictions.decoder.weight"


def _write(folder, tower, tensors=None, config=None):
    case = _fixture()
    cfg = case["config"].with_towers(tower)
    tensors = dict(case[tower]["tensors"]) if tensors is None else tensors
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or cfg.to_hf_dict()))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return cfg, tensors


@pytest.mark.parametrize("tower", ["caption", "retrieval"])
def test_both_architectures_load_with_the_right_tree(tmp_path, tower):
    cfg, _ = _write(tmp_path, tower)
    loaded_cfg, params = load_checkpoint(tmp_path)
    assert loaded_cfg.towers == (tower,)
    expected = abstract_params(cfg)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert all(p.shape == e.shape for p, e in zip(jax.tree.leaves(params), jax.tree.leaves(expected)))


def test_untied_lm_head_copy_is_optional(tmp_path):
    _, tensors = _write(tmp_path / "with", "caption")
    assert TIED_COPY in tensors, "save_pretrained writes the tied copy; this test needs it present"
    with_copy = load_checkpoint(tmp_path / "with")[1]
    without = {k: v for k, v in tensors.items() if not k.startswith("text_decoder.cls.predictions.decoder")}
    _write(tmp_path / "without", "caption", without)
    without_copy = load_checkpoint(tmp_path / "without")[1]
    for a, b in zip(jax.tree.leaves(with_copy), jax.tree.leaves(without_copy)):
        np.testing.assert_array_equal(a, b)


def test_position_ids_buffers_are_ignored(tmp_path):
    tensors = dict(_fixture()["caption"]["tensors"])
    tensors["text_decoder.bert.embeddings.position_ids"] = np.arange(32)[None].astype(np.int64)
    _write(tmp_path, "caption", tensors)
    load_checkpoint(tmp_path)


def test_an_untied_head_that_differs_is_refused(tmp_path):
    tensors = dict(_fixture()["caption"]["tensors"])
    tensors[TIED_COPY] = tensors[TIED_COPY] + 1.0
    _write(tmp_path, "caption", tensors)
    with pytest.raises(CheckpointError, match="differs from text_decoder.bert.embeddings.word_embeddings.weight"):
        load_checkpoint(tmp_path)


def test_missing_and_unexpected_tensors_are_listed_in_one_error(tmp_path):
    tensors = dict(_fixture()["caption"]["tensors"])
    del tensors["vision_model.post_layernorm.bias"]
    del tensors["text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"]
    tensors["text_decoder.extra_head.weight"] = np.zeros((2, 2), np.float32)
    _write(tmp_path, "caption", tensors)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert "2 missing (vision_model.post_layernorm.bias, " \
           "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight)" in message
    assert "1 unexpected (text_decoder.extra_head.weight)" in message
    assert "\n" not in message


def test_retrieval_tensors_in_a_captioning_folder_are_unexpected(tmp_path):
    case = _fixture()
    tensors = {**case["caption"]["tensors"], "itm_head.weight": case["retrieval"]["tensors"]["itm_head.weight"]}
    _write(tmp_path, "caption", tensors)
    with pytest.raises(CheckpointError, match=r"1 unexpected \(itm_head.weight\)"):
        load_checkpoint(tmp_path)


def test_shape_that_disagrees_with_config_names_the_tensor(tmp_path):
    cfg = _fixture()["config"].with_towers("caption")
    raw = cfg.to_hf_dict()
    raw["text_config"]["max_position_embeddings"] = 64
    _write(tmp_path, "caption", config=raw)
    with pytest.raises(CheckpointError, match=r"\['text_decoder'\]\['pos_embed'\] is \(32, 64\), config says \(64, 64\)"):
        load_checkpoint(tmp_path)


def test_folder_problems_give_one_clear_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder does not exist"):
        load_checkpoint(tmp_path / "nope")
    tmp_path.joinpath("config.json").write_text(json.dumps(_fixture()["config"].with_towers("caption").to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="no model.safetensors .*re-save it with safe_serialization=True"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file"):
        load_checkpoint(tmp_path)


def test_sharded_checkpoint_with_index(tmp_path):
    tensors = dict(_fixture()["retrieval"]["tensors"])
    cfg = _fixture()["config"].with_towers("retrieval")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, str(tmp_path / shard))
        weight_map.update({k: shard for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert load_checkpoint(tmp_path)[0].towers == ("retrieval",)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard"):
        load_checkpoint(tmp_path)


@pytest.mark.torch
def test_save_pretrained_folder_loads_and_reproduces_hf(tmp_path):
    torch = pytest.importorskip("torch")
    from model.state import bind
    from tests import hf_reference as ref

    cfg = _fixture()["config"]
    hf = ref.random_hf_model(cfg, "caption")
    ref.save_checkpoint(hf, tmp_path)
    loaded_cfg, params = load_checkpoint(tmp_path)
    x = ref.inputs(cfg)
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=torch.from_numpy(x["pixels"])).last_hidden_state.numpy()
    ours = bind(loaded_cfg, params).encode_image(x["pixels"])
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


@pytest.mark.parametrize("key, value, message", [
    ("pad_token_id", None, "text.pad_token_id is None; it must be an integer"),
    ("bos_token_id", None, "text.bos_token_id is None; it must be an integer"),
    ("sep_token_id", None, "text.sep_token_id is None; it must be an integer"),
    ("num_attention_heads", None, "text.heads is None; it must be an integer"),
    ("vocab_size", "30524", "text.vocab_size is '30524'; it must be an integer"),
])
def test_wrongly_typed_config_values_are_one_checkpoint_error(tmp_path, key, value, message):
    config = _fixture()["config"].with_towers("caption").to_hf_dict()
    config["text_config"][key] = value
    _write(tmp_path, "caption", config=config)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_checkpoint(tmp_path)


def test_bos_equal_to_pad_warns_that_captions_will_differ(tmp_path):
    config = _fixture()["config"].with_towers("caption").to_hf_dict()
    config["text_config"]["bos_token_id"] = config["text_config"]["pad_token_id"]
    _write(tmp_path, "caption", config=config)
    with pytest.warns(UserWarning, match="bos_token_id == pad_token_id .* masks the BOS token"):
        load_checkpoint(tmp_path)
