"""Load a local Hugging Face BLIP checkpoint folder (config.json + safetensors) into our params.

Supports BlipForConditionalGeneration (vision + caption tower) and BlipForImageTextRetrieval
(vision + retrieval tower), single-file or sharded (model.safetensors.index.json). The LM
head's untied copy (`cls.predictions.decoder.*`) may be present or absent; when present it
must equal the tied weights, since the model ties them. `position_ids` buffers are ignored.
Missing or unexpected tensors are reported together in one CheckpointError.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from .config import BlipConfig, ConfigError
from .errors import UserError
from .state import abstract_params


class CheckpointError(UserError):
    """A checkpoint folder that does not hold the tensors its config promises."""


# ----------------------------------------------------------------------- converters
def _linear(n_out_axes: tuple[int, ...] = ()):
    """torch Linear weight (out, in) → kernel (in, *out_shape)."""
    def convert(w: np.ndarray) -> np.ndarray:
        k = w.T
        return k.reshape(k.shape[0], *n_out_axes) if n_out_axes else k
    return convert


def _out_proj(heads: int, head_dim: int):
    """(out, heads·head_dim) → (heads, head_dim, out)."""
    return lambda w: w.T.reshape(heads, head_dim, w.shape[0])


def _bias(shape: tuple[int, ...] = ()):
    return lambda b: b.reshape(shape) if shape else b


_identity = lambda x: x  # noqa: E731


def _vision_table(cfg: BlipConfig) -> tuple[dict, dict]:
    """(top-level tensors, per-layer tensors): HF suffix → (our path, converter)."""
    v = cfg.vision
    n, h = v.heads, v.head_dim
    top = {
        "vision_model.embeddings.patch_embedding.weight": (("vision", "patch_embed", "kernel"),
                                                           lambda w: w.reshape(w.shape[0], -1).T),
        "vision_model.embeddings.patch_embedding.bias": (("vision", "patch_embed", "bias"), _identity),
        "vision_model.embeddings.class_embedding": (("vision", "class_embed"), lambda w: w.reshape(-1)),
        "vision_model.embeddings.position_embedding": (("vision", "pos_embed"), lambda w: w.reshape(w.shape[-2:])),
        "vision_model.post_layernorm.weight": (("vision", "post_ln", "scale"), _identity),
        "vision_model.post_layernorm.bias": (("vision", "post_ln", "bias"), _identity),
    }
    layer = {
        "layer_norm1.weight": (("ln1", "scale"), _identity),
        "layer_norm1.bias": (("ln1", "bias"), _identity),
        "self_attn.qkv.weight": (("qkv", "kernel"), _linear((3, n, h))),
        "self_attn.qkv.bias": (("qkv", "bias"), _bias((3, n, h))),
        "self_attn.projection.weight": (("out", "kernel"), _out_proj(n, h)),
        "self_attn.projection.bias": (("out", "bias"), _identity),
        "layer_norm2.weight": (("ln2", "scale"), _identity),
        "layer_norm2.bias": (("ln2", "bias"), _identity),
        "mlp.fc1.weight": (("mlp", "fc1", "kernel"), _linear()),
        "mlp.fc1.bias": (("mlp", "fc1", "bias"), _identity),
        "mlp.fc2.weight": (("mlp", "fc2", "kernel"), _linear()),
        "mlp.fc2.bias": (("mlp", "fc2", "bias"), _identity),
    }
    return top, {f"vision_model.encoder.layers.{{i}}.{k}": val for k, val in layer.items()}


def _text_table(cfg: BlipConfig, prefix: str, ours: str) -> tuple[dict, dict, dict]:
    """(top-level, per-layer, fused-per-layer) tables for one BERT tower.

    Fused entries combine several HF tensors (q, k, v) into one of ours:
    our path → (list of HF suffixes, converter applied to the list).
    """
    t = cfg.text
    n, h = t.heads, t.head_dim
    top = {
        f"{prefix}embeddings.word_embeddings.weight": ((ours, "word_embed"), _identity),
        f"{prefix}embeddings.position_embeddings.weight": ((ours, "pos_embed"), _identity),
        f"{prefix}embeddings.LayerNorm.weight": ((ours, "ln_embed", "scale"), _identity),
        f"{prefix}embeddings.LayerNorm.bias": ((ours, "ln_embed", "bias"), _identity),
    }
    layer = {
        "attention.output.dense.weight": (("self_out", "kernel"), _out_proj(n, h)),
        "attention.output.dense.bias": (("self_out", "bias"), _identity),
        "attention.output.LayerNorm.weight": (("ln_self", "scale"), _identity),
        "attention.output.LayerNorm.bias": (("ln_self", "bias"), _identity),
        "crossattention.self.query.weight": (("cross_q", "kernel"), _linear((n, h))),
        "crossattention.self.query.bias": (("cross_q", "bias"), _bias((n, h))),
        "crossattention.output.dense.weight": (("cross_out", "kernel"), _out_proj(n, h)),
        "crossattention.output.dense.bias": (("cross_out", "bias"), _identity),
        "crossattention.output.LayerNorm.weight": (("ln_cross", "scale"), _identity),
        "crossattention.output.LayerNorm.bias": (("ln_cross", "bias"), _identity),
        "intermediate.dense.weight": (("mlp", "fc1", "kernel"), _linear()),
        "intermediate.dense.bias": (("mlp", "fc1", "bias"), _identity),
        "output.dense.weight": (("mlp", "fc2", "kernel"), _linear()),
        "output.dense.bias": (("mlp", "fc2", "bias"), _identity),
        "output.LayerNorm.weight": (("ln_mlp", "scale"), _identity),
        "output.LayerNorm.bias": (("ln_mlp", "bias"), _identity),
    }
    stack_kernels = lambda ws: np.stack([_linear((n, h))(w) for w in ws], axis=1)  # noqa: E731
    stack_biases = lambda bs: np.stack([b.reshape(n, h) for b in bs], axis=0)  # noqa: E731
    fused = {
        ("self_qkv", "kernel"): ([f"attention.self.{x}.weight" for x in ("query", "key", "value")], stack_kernels),
        ("self_qkv", "bias"): ([f"attention.self.{x}.bias" for x in ("query", "key", "value")], stack_biases),
        ("cross_kv", "kernel"): ([f"crossattention.self.{x}.weight" for x in ("key", "value")], stack_kernels),
        ("cross_kv", "bias"): ([f"crossattention.self.{x}.bias" for x in ("key", "value")], stack_biases),
    }
    layer_prefix = f"{prefix}encoder.layer.{{i}}."
    return (top, {layer_prefix + k: v for k, v in layer.items()},
            {path: ([layer_prefix + s for s in suffixes], fn) for path, (suffixes, fn) in fused.items()})


def _tables(cfg: BlipConfig):
    top, layers = {}, {}
    vtop, vlayers = _vision_table(cfg)
    top.update(vtop)
    layers["vision"] = (cfg.vision.depth, vlayers, {})
    if cfg.has("caption"):
        ttop, tlayers, tfused = _text_table(cfg, "text_decoder.bert.", "text_decoder")
        top.update(ttop)
        top["text_decoder.cls.predictions.bias"] = (("text_decoder", "head_bias"), _identity)
        for name, path in (("dense.weight", ("head_dense", "kernel")), ("dense.bias", ("head_dense", "bias")),
                           ("LayerNorm.weight", ("head_ln", "scale")), ("LayerNorm.bias", ("head_ln", "bias"))):
            top[f"text_decoder.cls.predictions.transform.{name}"] = (
                ("text_decoder", *path), _linear() if name == "dense.weight" else _identity)
        layers["text_decoder"] = (cfg.text.depth, tlayers, tfused)
    if cfg.has("retrieval"):
        ttop, tlayers, tfused = _text_table(cfg, "text_encoder.", "text_encoder")
        top.update(ttop)
        for head in ("vision_proj", "text_proj", "itm_head"):
            top[f"{head}.weight"] = ((head, "kernel"), _linear())
            top[f"{head}.bias"] = ((head, "bias"), _identity)
        layers["text_encoder"] = (cfg.text.depth, tlayers, tfused)
    return top, layers


# Tensors that may appear and carry nothing of their own: tied copies and buffers.
_TIED = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def params_from_hf_tensors(cfg: BlipConfig, tensors: dict[str, np.ndarray], source: str = "checkpoint",
                           dtype=np.float32) -> dict:
    """Our nested params from a flat HF state dict; raises CheckpointError listing every
    missing and unexpected tensor at once."""
    top, layers = _tables(cfg)
    params: dict = {}
    used: set[str] = set()
    missing: list[str] = []

    def take(key: str):
        if key not in tensors:
            missing.append(key)
            return None
        used.add(key)
        return np.asarray(tensors[key], dtype=dtype)

    def convert(what: str, fn, value):
        try:
            return fn(value)
        except ValueError:
            shape = [v.shape for v in value] if isinstance(value, list) else value.shape
            raise CheckpointError(f"{source}: {what} has shape {shape}, which does not fit config.json "
                                  f"(vision {cfg.vision}, text {cfg.text})") from None

    for key, (path, fn) in top.items():
        value = take(key)
        if value is not None:
            _set(params, path, convert(key, fn, value))
    for tower, (depth, table, fused) in layers.items():
        for template, (path, fn) in table.items():
            values = [take(template.format(i=i)) for i in range(depth)]
            if all(v is not None for v in values):
                _set(params, (tower, "blocks", *path),
                     np.stack([convert(template.format(i=i), fn, v) for i, v in enumerate(values)]))
        for path, (templates, fn) in fused.items():
            per_layer = [[take(t.format(i=i)) for t in templates] for i in range(depth)]
            if all(v is not None for group in per_layer for v in group):
                _set(params, (tower, "blocks", *path),
                     np.stack([convert(templates[0].format(i=i), fn, g) for i, g in enumerate(per_layer)]))

    for copy, original in _TIED.items():
        if copy in tensors and cfg.has("caption"):
            used.add(copy)
            if original in tensors and not np.array_equal(tensors[copy], tensors[original]):
                raise CheckpointError(f"{source}: {copy} differs from {original}; this model ties the LM head "
                                      "to the word embeddings and cannot load an untied head")
    unexpected = sorted(k for k in tensors if k not in used and not k.endswith("position_ids"))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_summarise(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_summarise(unexpected)})")
        raise CheckpointError(f"{source}: tensors do not match a {'+'.join(cfg.towers)} BLIP layout: "
                              + "; ".join(parts))
    return params


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … {len(keys) - limit} more" if len(keys) > limit else "")


def read_safetensors(folder: Path) -> dict[str, np.ndarray]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            shard_names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map of "
                                  "tensor name -> shard file); re-save the checkpoint") from None
        bad = [n for n in shard_names if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors")]
        if not shard_names:
            raise CheckpointError(f"{index}: its weight_map lists no shard files")
        if bad:
            raise CheckpointError(f"{index}: shard {bad[0]!r} is not a .safetensors file name in the folder")
        files = [folder / name for name in shard_names]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shard(s) that are not in the folder: {', '.join(absent)}")
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({err})") from None
    return tensors


def checkpoint_config(folder: str | Path) -> BlipConfig:
    """The config of a checkpoint folder, after checking the folder and its weights file exist."""
    return read_checkpoint_config(folder, BlipConfig.from_hf)


def read_checkpoint_config(folder: str | Path, read):
    """`read(folder)`'s config of a Hugging Face checkpoint folder (any model family's), after
    checking the folder exists and holds safetensors weights; every problem a CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder does not exist")
    try:
        cfg = read(folder)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    if not ((folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()):
        hint = " (found pytorch_model.bin: re-save it with safe_serialization=True)" \
            if (folder / "pytorch_model.bin").exists() else ""
        raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    return cfg


def load_checkpoint(folder: str | Path) -> tuple[BlipConfig, dict]:
    """(config, float32 params) from a Hugging Face BLIP folder."""
    folder = Path(folder)
    cfg = checkpoint_config(folder)
    params = params_from_hf_tensors(cfg, read_safetensors(folder), source=str(folder))
    check_shapes(params, abstract_params(cfg), str(folder))
    return cfg, params


def check_shapes(params: dict, expected: dict, source: str) -> None:
    """Raise CheckpointError naming every tensor whose shape disagrees with the config."""
    bad = []
    flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, spec in jax.tree_util.tree_flatten_with_path(expected)[0]:
        got = flat_p.get(path)
        if got is not None and tuple(got.shape) != tuple(spec.shape):
            bad.append(f"{jax.tree_util.keystr(path)} is {tuple(got.shape)}, config says {tuple(spec.shape)}")
    if bad:
        raise CheckpointError(f"{source}: shapes disagree with config.json: {_summarise(bad, 4)}")

