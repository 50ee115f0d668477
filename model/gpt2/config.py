"""GPT-2 configs: the Hugging Face GPT2Config fields this implementation supports, as a frozen dataclass.

Supported is the layout every released GPT-2 uses: pre-LN blocks, learned positions, tanh
GELU ("gelu_new"), attention scaled by 1/sqrt(head_dim), the LM head tied to the token
embeddings. A config.json that asks for anything else is refused with the field named.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both the tanh approximation


@dataclass(frozen=True, slots=True)
class Gpt2Config:
    vocab_size: int = 50257
    positions: int = 1024
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    ln_eps: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    name: str = "gpt2"

    def __post_init__(self) -> None:
        for field in ("vocab_size", "positions", "width", "depth", "heads", "mlp"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"gpt2.{field} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(f"gpt2.width ({self.width}) must be divisible by gpt2.heads ({self.heads})")
        for field in ("bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"gpt2.{field} is {value!r}; it must be a token id below vocab_size "
                                  f"{self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Gpt2Config:
        return cls(**data)

    def axis_sizes(self) -> dict[str, set[int]]:
        """Every size each model-level logical axis takes (batch and sequence lengths are the program's)."""
        return {"embed": {self.width}, "heads": {self.heads}, "head_dim": {self.head_dim}, "mlp": {self.mlp},
                "vocab": {self.vocab_size}, "layers": {self.depth}}

    # ------------------------------------------------------------ counts
    def param_count(self) -> int:
        d, f = self.width, self.mlp
        layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        return self.vocab_size * d + self.positions * d + self.depth * layer + 2 * d

    def flops_tokens(self, batch: int, tokens: int, context: int, lm_head_tokens: int) -> int:
        """Matmul FLOPs of `tokens` positions per row attending over `context` keys, with the
        LM head on `lm_head_tokens` of them: 2 per multiply-add."""
        d, f = self.width, self.mlp
        dense = 2 * tokens * (3 * d * d + d * d + 2 * d * f)
        attention = 2 * 2 * tokens * context * d
        return batch * (self.depth * (dense + attention) + 2 * lm_head_tokens * d * self.vocab_size)

    def flops_prefill(self, batch: int, prompt_len: int, cache_len: int) -> int:
        return self.flops_tokens(batch, prompt_len, cache_len, 1)

    def flops_decode_step(self, batch: int, cache_len: int) -> int:
        return self.flops_tokens(batch, 1, cache_len, 1)

    def flops_generate(self, batch: int, prompt_len: int, new_tokens: int) -> int:
        """Prefill, then one decode step per generated token after the first."""
        cache = prompt_len + new_tokens
        return self.flops_prefill(batch, prompt_len, cache) + (new_tokens - 1) * self.flops_decode_step(batch, cache)

    # ------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, folder: str | Path) -> Gpt2Config:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; pass a Hugging Face GPT-2 checkpoint folder")
        try:
            raw = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{path}: not a JSON config") from None
        return cls.from_hf_dict(raw, str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> Gpt2Config:
        if not isinstance(raw, dict) or raw.get("model_type") != "gpt2":
            raise ConfigError(f"{source}: model_type is {raw.get('model_type') if isinstance(raw, dict) else raw!r}, "
                              "not gpt2")
        unsupported = {"activation_function": lambda v: v in ACTIVATIONS,
                       "scale_attn_weights": lambda v: v is True,
                       "scale_attn_by_inverse_layer_idx": lambda v: v is False,
                       "reorder_and_upcast_attn": lambda v: v is False,
                       "add_cross_attention": lambda v: v is False}
        for key, ok in unsupported.items():
            if key in raw and not ok(raw[key]):
                raise ConfigError(f"{source}: {key}={raw[key]!r} is not implemented (GPT-2's own layout is)")
        width = raw.get("n_embd", 768)
        name = raw.get("_name_or_path") or "gpt2"
        try:
            return cls(vocab_size=raw.get("vocab_size", 50257), positions=raw.get("n_positions", 1024), width=width,
                       depth=raw.get("n_layer", 12), heads=raw.get("n_head", 12),
                       mlp=raw.get("n_inner") or 4 * width, ln_eps=raw.get("layer_norm_epsilon", 1e-5),
                       bos_token_id=raw.get("bos_token_id", 50256), eos_token_id=raw.get("eos_token_id", 50256),
                       name=name if isinstance(name, str) else "gpt2")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict:
        """The config.json transformers' GPT2LMHeadModel builds the same layout from (tests, export)."""
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": self.vocab_size,
                "n_positions": self.positions, "n_embd": self.width, "n_layer": self.depth, "n_head": self.heads,
                "n_inner": self.mlp, "layer_norm_epsilon": self.ln_eps, "activation_function": "gelu_new",
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True}


PRESETS: dict[str, Gpt2Config] = {
    # every width, head count, MLP and vocabulary divides the 4x8 mesh, so each shipped plan is valid
    "gpt2-tiny": Gpt2Config(vocab_size=256, positions=64, width=64, depth=2, heads=8, mlp=256,
                            bos_token_id=255, eos_token_id=255, name="gpt2-tiny"),
    # the 124M layout of Hugging Face's `gpt2` (openai-community/gpt2)
    "gpt2": Gpt2Config(name="gpt2"),
}
