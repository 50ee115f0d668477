"""Named model sizes (big_vision's size-table idea): one place, no flags scattered around.

- tiny:  for tests; every width, head count, MLP and vocab divides the 4x8 mesh so each
         shipped sharding plan is valid on it, and vision and text differ in width and
         head count so parity tests catch a swapped dimension.
- small: ViT-S/16 at 224 with a 6-layer 384-wide BERT; CPU benchmarks.
- base:  Salesforce/blip-image-captioning-base (ViT-B/16 at 384, BERT-base decoder),
         plus the blip-itm-base-coco retrieval tower on the same vision encoder.
- large: Salesforce/blip-image-captioning-large (ViT-L/16 at 384, BERT-base text with
         1024-wide cross-attention inputs), plus the retrieval tower.
"""

from __future__ import annotations

from .config import BlipConfig, ConfigError, TextConfig, VisionConfig

PRESETS: dict[str, BlipConfig] = {
    "tiny": BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=128, depth=2, heads=16, mlp=128),
        text=TextConfig(vocab_size=128, width=64, depth=2, heads=8, mlp=128, max_positions=32,
                        bos_token_id=126, sep_token_id=3, pad_token_id=0),
        projection_dim=32, name="tiny"),
    "small": BlipConfig(
        vision=VisionConfig(image_size=224, patch_size=16, width=384, depth=6, heads=6, mlp=1536),
        text=TextConfig(width=384, depth=6, heads=6, mlp=1536),
        projection_dim=256, name="small"),
    "base": BlipConfig(name="base"),
    "large": BlipConfig(
        vision=VisionConfig(width=1024, depth=24, heads=16, mlp=4096),
        projection_dim=256, name="large"),
}


def get_preset(name: str) -> BlipConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
