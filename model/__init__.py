"""The Mnemosyne semiotic model in Flax NNX: BLIP layout, logical axis names, no meshes."""

from .blip import Blip
from .config import BlipConfig, ConfigError, TextConfig, VisionConfig
from .generate import caption_prompt, greedy_caption
from .layers import portable_kernels
from .presets import PRESETS, get_preset

__all__ = ["Blip", "BlipConfig", "ConfigError", "TextConfig", "VisionConfig", "PRESETS", "get_preset",
           "caption_prompt", "greedy_caption", "portable_kernels"]
