"""BLIP as a model family (modelapi.family): what the pipeline reads about this model.

Every entry's signature is written here once: the names a SavedModel signature, a
jax.export artifact, the manifest and the server use, and which axis of each input is
the batch.
"""

from __future__ import annotations

import jax
import numpy as np

from modelapi.family import Entry, ModelFamily

from .axes import TOWERS
from .config import KERNEL_LAYOUTS, LAYER_STORAGES, BlipConfig
from .hf import checkpoint_config, load_checkpoint
from .layers import portable_kernels
from .layout import canonical, for_platform, to_layout
from .presets import PRESETS
from .programs import ENTRIES, NEEDS_TOWER, SEMIOTIC_ENTRIES, SERVING_ENTRIES, build_program
from .random_params import init_params
from .state import abstract_params, logical_names
from .tie_checks import tie_check

INPUTS = {
    "encode_image": ("pixel_values",),
    "caption": ("pixel_values", "prompt_ids", "prompt_mask"),
    "score": ("pixel_values", "input_ids", "attention_mask"),
    "decode_step": ("input_ids", "position", "cache"),
    "train_step": ("opt_state", "pixel_values", "input_ids", "attention_mask"),
    "caption_image": ("image_embeds", "prompt_ids"),
    "readings": ("image_embeds", "prompt_ids"),
    "score_image": ("image_embeds", "input_ids", "attention_mask"),
    "image_features": ("image_embeds",),
    "text_features": ("input_ids", "attention_mask"),
}
# The name of an entry's output, or of each element when it returns a tuple; dict outputs
# are named by their keys, in JAX's flattening order.
OUTPUTS = {
    "encode_image": "image_embeds",
    "caption": "token_ids",
    "score": None,
    "decode_step": ("logits", "cache"),
    "train_step": ("params", "opt_state", "metrics"),
    "caption_image": "token_ids",
    "readings": ("token_ids", "log_probs"),
    "score_image": None,
    "image_features": "image_features",
    "text_features": "text_features",
}
TF_SIGNATURES = ("caption", "encode_image", "score")   # the SavedModels' signatures (caption: serving_default)
BATCH_AXES = {"decode_step": (0, None, 1),   # the position is a scalar; the cache is (layers, batch, ...)
              "train_step": (None, 0, 0, 0)}


def example_inputs(cfg: BlipConfig, entry: str, inputs: tuple, rng: np.random.Generator) -> tuple:
    """Fixed, reproducible inputs for an entry (the ones `verify` compares on)."""
    out = []
    for name, spec in zip(INPUTS[entry], inputs):
        if name in ("pixel_values", "image_embeds"):
            out.append(rng.normal(size=spec.shape).astype(np.float32))
        elif name == "prompt_ids":
            out.append(np.full(spec.shape, cfg.text.bos_token_id, np.int32))
        elif name == "prompt_mask":
            out.append(np.ones(spec.shape, np.int32))
        elif name == "input_ids":
            out.append(rng.integers(5, min(cfg.text.vocab_size, 100), size=spec.shape).astype(np.int32))
        elif name == "attention_mask":
            lengths = rng.integers(max(spec.shape[1] // 2, 1), spec.shape[1] + 1, size=(spec.shape[0], 1))
            out.append((np.arange(spec.shape[1])[None] < lengths).astype(np.int32))
        elif name == "position":
            out.append(np.int32(1))  # the step after a one-token prompt
        else:  # cache
            out.append(jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), spec))
    return tuple(out)


def bundle_entries(cfg: BlipConfig) -> tuple[str, ...]:
    """What a bundle exports: the serving entries and the semiotic module's, where the config has their tower."""
    return tuple(e for e in SERVING_ENTRIES + SEMIOTIC_ENTRIES if cfg.has(NEEDS_TOWER.get(e, "caption")))


def write_processor(folder, cfg: BlipConfig, checkpoint, allowed: tuple[str, ...]) -> str:
    """The tokenizer and image processor serving needs: the checkpoint's own files (those of
    `allowed` it has), or a synthetic vocabulary for random weights (documented as such)."""
    import shutil
    from pathlib import Path

    from .processor import write_synthetic_processor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and (Path(checkpoint) / "tokenizer_config.json").is_file():
        for name in allowed:
            if (Path(checkpoint) / name).is_file():
                shutil.copy2(Path(checkpoint) / name, folder / name)
        return f"copied from {Path(checkpoint).resolve()}"
    write_synthetic_processor(folder, cfg)
    return "synthetic vocabulary (random weights or a checkpoint without a tokenizer): decoded text is meaningless"


def open_processor(folder, cfg: BlipConfig):
    """The tokenizer and image processor of a checkpoint or a bundle's processor/ folder."""
    from .processor import Preprocessor

    return Preprocessor.from_folder(folder, cfg)


def check_processor(folder, cfg: BlipConfig) -> str:
    """Load a bundle's processor as serving does, and tokenize a text with it."""
    pre = open_processor(folder, cfg)
    pre.texts(["a picture"], 8)
    return f"tokenizer of {len(pre.tokenizer)} tokens, images to {cfg.vision.image_size}px"


FAMILY = ModelFamily(
    name="blip",
    description=("serving teams running the Mnemosyne semiotic model (BLIP layout: captioning, image-text "
                 "matching, contrastive similarity)"),
    config_type=BlipConfig,
    presets=PRESETS,
    entries=tuple(Entry(e, INPUTS[e], OUTPUTS[e], BATCH_AXES.get(e, ()), serving=e in SERVING_ENTRIES,
                        trains=e == "train_step", tf_signature=e in TF_SIGNATURES) for e in ENTRIES),
    config_from_dict=BlipConfig.from_dict,
    abstract_params=abstract_params,
    logical_names=logical_names,
    build=build_program,
    axis_sizes=lambda cfg: cfg.axis_sizes(),
    example_inputs=example_inputs,
    scopes=TOWERS,
    for_platform=for_platform,
    kernel_layouts=KERNEL_LAYOUTS,
    layer_storages=LAYER_STORAGES,
    canonical=canonical,
    to_layout=to_layout,
    init_params=init_params,
    checkpoint_config=checkpoint_config,
    load_checkpoint=load_checkpoint,
    portable=portable_kernels,
    write_assets=write_processor,
    bundle_entries=bundle_entries,
    manifest_fields=lambda cfg: {"towers": list(cfg.towers)},
    default_signature="caption",
    tie_check=tie_check,
    check_assets=check_processor,
    open_processor=open_processor,
)
