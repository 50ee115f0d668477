"""GPT-2 (transformers' GPT2LMHeadModel) in Flax NNX: the project's second model family."""

from .config import PRESETS, Gpt2Config
from .family import FAMILY
from .model import Gpt2

__all__ = ["FAMILY", "Gpt2", "Gpt2Config", "PRESETS"]
