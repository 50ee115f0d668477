"""Model configuration: frozen dataclasses, size presets, HF config reading, counts.

A config knows its own parameter count and analytic FLOPs (Levanter style), so the
analysis can cross-check what the compiler reports against what the model should cost.

FLOP convention: a matmul of (m, k) by (k, n) costs 2*m*k*n. Attention scores and the
attention-weighted sum are counted as matmuls. Element-wise work (layer norms, GELU,
softmax, residual adds) is not counted: under 1% of the total for BLIP layouts.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

TOWERS = ("caption", "retrieval")


KERNEL_LAYOUTS = ("in-out", "out-in")
LAYER_STORAGES = ("stacked", "per-layer")
CROSS_CACHE_LAYOUTS = ("patch-major", "head-major", "kv-major")   # their axis orders: model.text.CROSS_KV_ORDER


class ConfigError(UserError):
    """A configuration that cannot describe a working model."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_ints(section: str, obj, names: tuple[str, ...]) -> None:
    """Integer fields must be integers (a config.json may hold null or "30524")."""
    for name in names:
        value = getattr(obj, name)
        _check(isinstance(value, int) and not isinstance(value, bool),
               f"{section}.{name} is {value!r}; it must be an integer")


@dataclass(frozen=True, slots=True)
class VisionConfig:
    """ViT encoder: pre-LN, fused qkv, exact-erf GELU, post-LN on every token."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    ln_eps: float = 1e-5
    channels: int = 3
    # "stacked" or "per-layer", as TextConfig.layer_storage. Not a Hugging Face field.
    layer_storage: str = "stacked"

    def __post_init__(self) -> None:
        _check(self.layer_storage in LAYER_STORAGES,
               f"vision.layer_storage is {self.layer_storage!r}; choose one of {', '.join(LAYER_STORAGES)}")
        _check_ints("vision", self, ("image_size", "patch_size", "width", "depth", "heads", "mlp", "channels"))
        _check(isinstance(self.ln_eps, (int, float)) and not isinstance(self.ln_eps, bool),
               f"vision.ln_eps is {self.ln_eps!r}; it must be a number")
        for name in ("image_size", "patch_size", "width", "depth", "heads", "mlp", "channels"):
            _check(getattr(self, name) > 0, f"vision.{name} must be positive, got {getattr(self, name)}")
        _check(self.width % self.heads == 0,
               f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size ({self.image_size}) must be divisible by vision.patch_size ({self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_size * self.patch_size


@dataclass(frozen=True, slots=True)
class TextConfig:
    """BERT with cross-attention to the image tokens: post-LN, LM head tied to the embeddings."""

    vocab_size: int = 30524
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp: int = 3072
    max_positions: int = 512
    ln_eps: float = 1e-12
    bos_token_id: int = 30522
    sep_token_id: int = 102
    pad_token_id: int = 0
    # How the tower's dense kernels are stored: "in-out" (inputs first: checkpoints, TPU and
    # CPU programs) or "out-in" (outputs first: a batch-1 dot reads each output's weights
    # contiguously; the GPU serving layout, see model/layout.py). Not a Hugging Face field.
    kernel_layout: str = "in-out"
    # How the tower's layers are stored: "stacked" (one array per weight with a leading
    # `layers` axis, run with lax.scan: checkpoints, TPU and GPU programs) or "per-layer"
    # (each layer's weights their own arrays, run straight-line: the CPU serving layout,
    # because XLA:CPU copies a stacked weight's layer slice before every dot; see
    # model/layout.py). Not a Hugging Face field.
    layer_storage: str = "stacked"
    # How decoding caches the cross-attention keys and values: "patch-major" (L, B, P, 2, N, H)
    # or "head-major" (L, B, 2, N, H, P), each head's keys and values with the image patches
    # last: the layout XLA:CPU's attention dots read in place (patch-major is transposed
    # every step; the CPU serving choice, model/layout.py) or "kv-major" (L, 2, B, P, N, H):
    # each layer's keys, and its values, one contiguous (B, P, N, H) array, what a fused
    # attention kernel (cuDNN) reads without a copy; measured no faster on an H200, so no
    # platform's default (docs/performance.md). Not a Hugging Face field.
    cross_cache: str = "patch-major"

    def __post_init__(self) -> None:
        _check(self.cross_cache in CROSS_CACHE_LAYOUTS,
               f"text.cross_cache is {self.cross_cache!r}; choose one of {', '.join(CROSS_CACHE_LAYOUTS)}")
        _check(self.kernel_layout in KERNEL_LAYOUTS,
               f"text.kernel_layout is {self.kernel_layout!r}; choose one of {', '.join(KERNEL_LAYOUTS)}")
        _check(self.layer_storage in LAYER_STORAGES,
               f"text.layer_storage is {self.layer_storage!r}; choose one of {', '.join(LAYER_STORAGES)}")
        _check_ints("text", self, ("vocab_size", "width", "depth", "heads", "mlp", "max_positions", "bos_token_id",
                                   "sep_token_id", "pad_token_id"))
        _check(isinstance(self.ln_eps, (int, float)) and not isinstance(self.ln_eps, bool),
               f"text.ln_eps is {self.ln_eps!r}; it must be a number")
        for name in ("vocab_size", "width", "depth", "heads", "mlp", "max_positions"):
            _check(getattr(self, name) > 0, f"text.{name} must be positive, got {getattr(self, name)}")
        _check(self.width % self.heads == 0,
               f"text.width ({self.width}) must be divisible by text.heads ({self.heads})")
        for name in ("bos_token_id", "sep_token_id", "pad_token_id"):
            token = getattr(self, name)
            _check(0 <= token < self.vocab_size,
                   f"text.{name} ({token}) must be a token id below text.vocab_size ({self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True, slots=True)
class BlipConfig:
    """The whole semiotic model: one vision encoder and the text towers it serves.

    towers: "caption" is the BERT decoder with its LM head (BlipForConditionalGeneration);
    "retrieval" is the BERT text encoder with the ITM head and ITC projections
    (BlipForImageTextRetrieval). Hugging Face ships each tower with its own vision
    encoder, so a model loaded from one HF folder has exactly one tower.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projection_dim: int = 256
    towers: tuple[str, ...] = TOWERS
    name: str = "custom"

    def __post_init__(self) -> None:
        _check(len(self.towers) > 0, "towers must name at least one of 'caption', 'retrieval'")
        unknown = [t for t in self.towers if t not in TOWERS]
        _check(not unknown, f"towers: unknown tower(s) {unknown}; known: {list(TOWERS)}")
        _check(len(set(self.towers)) == len(self.towers), f"towers: repeated tower in {self.towers}")
        _check_ints("model", self, ("projection_dim",))
        _check(self.projection_dim > 0, f"projection_dim must be positive, got {self.projection_dim}")
        _check(isinstance(self.name, str), f"name is {self.name!r}; it must be a string")

    # ----------------------------------------------------------------- variants
    def has(self, tower: str) -> bool:
        return tower in self.towers

    def with_towers(self, *towers: str) -> BlipConfig:
        return dataclasses.replace(self, towers=tuple(towers))

    def with_kernel_layout(self, layout: str) -> BlipConfig:
        """The same model with its text towers' dense kernels stored in `layout`."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, kernel_layout=layout))

    def with_cross_cache(self, layout: str) -> BlipConfig:
        """The same model caching cross-attention keys and values `layout` (TextConfig.cross_cache)."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, cross_cache=layout))

    def with_layer_storage(self, storage: str) -> BlipConfig:
        """The same model with every tower's layers stored `storage` ("stacked", "per-layer")."""
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, layer_storage=storage),
                                   text=dataclasses.replace(self.text, layer_storage=storage))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BlipConfig:
        return cls(
            vision=VisionConfig(**data["vision"]),
            text=TextConfig(**data["text"]),
            projection_dim=data["projection_dim"],
            towers=tuple(data["towers"]),
            name=data.get("name", "custom"),
        )

    def axis_sizes(self) -> dict[str, set[int]]:
        """Every size each model-level logical axis takes (batch and sequence lengths are the program's)."""
        v, t = self.vision, self.text
        return {"embed": {v.width, t.width}, "heads": {v.heads, t.heads}, "head_dim": {v.head_dim, t.head_dim},
                "mlp": {v.mlp, t.mlp}, "vocab": {t.vocab_size}, "patch": {v.tokens}, "layers": {v.depth, t.depth}}

    # ------------------------------------------------------------ parameter counts
    def param_breakdown(self) -> dict[str, int]:
        """Parameters per part; only the towers this config has are listed."""
        v, t = self.vision, self.text
        ln = lambda d: 2 * d  # noqa: E731 - scale and bias
        dense = lambda i, o: i * o + o  # noqa: E731
        vision = (
            dense(v.patch_dim, v.width) + v.width + v.tokens * v.width
            + v.depth * (ln(v.width) + dense(v.width, 3 * v.width) + dense(v.width, v.width)
                         + ln(v.width) + dense(v.width, v.mlp) + dense(v.mlp, v.width))
            + ln(v.width)
        )
        embeddings = t.vocab_size * t.width + t.max_positions * t.width + ln(t.width)
        block = (
            4 * dense(t.width, t.width) + ln(t.width)  # self-attention q, k, v, out
            + 2 * dense(t.width, t.width) + 2 * dense(v.width, t.width) + ln(t.width)  # cross-attention
            + dense(t.width, t.mlp) + dense(t.mlp, t.width) + ln(t.width)
        )
        counts = {"vision": vision}
        if self.has("caption"):
            lm_head = dense(t.width, t.width) + ln(t.width) + t.vocab_size  # tied weight, own bias
            counts["text_decoder"] = embeddings + t.depth * block + lm_head
        if self.has("retrieval"):
            heads = dense(v.width, self.projection_dim) + dense(t.width, self.projection_dim) + dense(t.width, 2)
            counts["text_encoder"] = embeddings + t.depth * block
            counts["retrieval_heads"] = heads
        return counts

    def param_count(self) -> int:
        return sum(self.param_breakdown().values())

    # ------------------------------------------------------------------ FLOPs
    def flops_encode_image(self, batch: int = 1) -> int:
        v = self.vision
        n = v.tokens
        per_layer = (2 * n * v.width * 3 * v.width      # fused qkv
                     + 2 * 2 * n * n * v.width          # scores and weighted sum
                     + 2 * n * v.width * v.width        # output projection
                     + 2 * 2 * n * v.width * v.mlp)     # MLP
        return batch * (2 * v.num_patches * v.patch_dim * v.width + v.depth * per_layer)

    def flops_cross_kv(self, batch: int = 1) -> int:
        """Cross-attention keys and values over the image tokens, computed once per image."""
        v, t = self.vision, self.text
        return batch * t.depth * 2 * (2 * v.tokens * v.width * t.width)

    def flops_text_token(self, context: int, cross: bool = True, lm_head: bool = True) -> int:
        """One text token through the tower, attending to `context` earlier tokens (itself included)."""
        v, t = self.vision, self.text
        d = t.width
        per_layer = 2 * d * 3 * d + 2 * 2 * context * d + 2 * d * d + 2 * 2 * d * t.mlp
        if cross:
            per_layer += 2 * d * d + 2 * 2 * v.tokens * d + 2 * d * d
        return t.depth * per_layer + (self.flops_lm_head() if lm_head else 0)

    def flops_lm_head(self) -> int:
        d = self.text.width
        return 2 * d * d + 2 * d * self.text.vocab_size

    def flops_decode_step(self, batch: int = 1, context: int = 1) -> int:
        return batch * self.flops_text_token(context)

    def flops_caption(self, batch: int = 1, new_tokens: int = 20, prompt_len: int = 1) -> int:
        """Vision encoder, cross K/V once, then one decoder pass per generated token.

        The prompt is prefilled in one pass; the LM head runs only on its last position.
        """
        steps = sum(self.flops_text_token(prompt_len + i + 1) for i in range(new_tokens - 1))
        prefill = (sum(self.flops_text_token(i + 1, lm_head=False) for i in range(prompt_len))
                   + self.flops_lm_head())
        return self.flops_encode_image(batch) + self.flops_cross_kv(batch) + batch * (prefill + steps)

    def flops_score(self, batch: int = 1, seq_len: int = 32) -> int:
        """ITM (text encoder with cross-attention) and ITC (text encoder alone) for one pair each."""
        v, t = self.vision, self.text
        itm = self.flops_cross_kv(1) + sum(self.flops_text_token(seq_len, cross=True, lm_head=False)
                                           for _ in range(seq_len))
        itc = sum(self.flops_text_token(seq_len, cross=False, lm_head=False) for _ in range(seq_len))
        heads = 2 * v.width * self.projection_dim + 2 * t.width * self.projection_dim + 2 * t.width * 2
        return self.flops_encode_image(batch) + batch * (itm + itc + heads)

    def flops_caption_loss(self, batch: int = 1, seq_len: int = 32) -> int:
        """Forward of the captioning loss (teacher forcing over seq_len tokens)."""
        text = sum(self.flops_text_token(seq_len) for _ in range(seq_len))
        return self.flops_encode_image(batch) + self.flops_cross_kv(batch) + batch * text

    def flops_train_step(self, batch: int = 1, seq_len: int = 32) -> int:
        """Forward plus backward (about twice the forward) of the captioning loss."""
        return 3 * self.flops_caption_loss(batch, seq_len)

    # ------------------------------------------------------------ HF config
    @classmethod
    def from_hf(cls, folder: str | Path) -> BlipConfig:
        """Read a Hugging Face BLIP config.json (BlipForConditionalGeneration or
        BlipForImageTextRetrieval) into a config with the one tower that folder holds."""
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json; pass a Hugging Face BLIP checkpoint folder")
        try:
            raw = json.loads(path.read_bytes())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (binary data where config.json was expected)") from None
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> BlipConfig:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: not a JSON object")
        architectures = raw.get("architectures") or []
        if not isinstance(architectures, list):
            raise ConfigError(f"{source}: architectures is {architectures!r}; it must be a list of class names")
        if "BlipForImageTextRetrieval" in architectures:
            towers = ("retrieval",)
        elif "BlipForConditionalGeneration" in architectures:
            towers = ("caption",)
        else:
            raise ConfigError(
                f"{source}: architectures {architectures} names neither BlipForConditionalGeneration "
                "nor BlipForImageTextRetrieval")
        vraw, traw = raw.get("vision_config") or {}, raw.get("text_config") or {}
        for key, section in (("vision_config", vraw), ("text_config", traw)):
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: {key} is {section!r}; it must be an object")
        vision_defaults, text_defaults = VisionConfig(), TextConfig()

        def pick(section: dict, key: str, default):
            value = section.get(key, default)
            if isinstance(value, (list, tuple)):  # HF allows (h, w) sizes; BLIP is square
                if not value or any(v != value[0] for v in value):
                    raise ConfigError(f"{source}: {key}={value}: only square sizes are supported")
                value = value[0]
            return value

        try:
            vision = VisionConfig(
                image_size=pick(vraw, "image_size", vision_defaults.image_size),
                patch_size=pick(vraw, "patch_size", vision_defaults.patch_size),
                width=pick(vraw, "hidden_size", vision_defaults.width),
                depth=pick(vraw, "num_hidden_layers", vision_defaults.depth),
                heads=pick(vraw, "num_attention_heads", vision_defaults.heads),
                mlp=pick(vraw, "intermediate_size", vision_defaults.mlp),
                ln_eps=pick(vraw, "layer_norm_eps", vision_defaults.ln_eps),
            )
            text = TextConfig(
                vocab_size=pick(traw, "vocab_size", text_defaults.vocab_size),
                width=pick(traw, "hidden_size", text_defaults.width),
                depth=pick(traw, "num_hidden_layers", text_defaults.depth),
                # BlipTextConfig() defaults to 8 heads, which is wrong for the released
                # checkpoints; their config.json always states the count.
                heads=pick(traw, "num_attention_heads", 8),
                mlp=pick(traw, "intermediate_size", text_defaults.mlp),
                max_positions=pick(traw, "max_position_embeddings", text_defaults.max_positions),
                ln_eps=pick(traw, "layer_norm_eps", text_defaults.ln_eps),
                bos_token_id=pick(traw, "bos_token_id", text_defaults.bos_token_id),
                sep_token_id=pick(traw, "sep_token_id", text_defaults.sep_token_id),
                pad_token_id=pick(traw, "pad_token_id", text_defaults.pad_token_id),
            )
            if text.bos_token_id == text.pad_token_id:
                warnings.warn(f"{source}: bos_token_id == pad_token_id ({text.pad_token_id}): transformers masks the "
                              "BOS token as padding there, so its captions will differ from this model's",
                              stacklevel=2)
            for act_key, section in (("vision_config.hidden_act", vraw), ("text_config.hidden_act", traw)):
                act = section.get("hidden_act", "gelu")
                _check(act == "gelu", f"{act_key}={act!r}: only exact-erf 'gelu' is implemented")
            name = raw.get("_name_or_path") or "hf"
            return cls(vision=vision, text=text,
                       projection_dim=raw.get("image_text_hidden_size", 256), towers=towers,
                       name=name if isinstance(name, str) else "hf")
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    def to_hf_dict(self) -> dict:
        """The config.json Hugging Face needs to build the same layout (used by tests and export)."""
        v, t = self.vision, self.text
        arch = "BlipForConditionalGeneration" if self.towers == ("caption",) else "BlipForImageTextRetrieval"
        return {
            "architectures": [arch],
            "model_type": "blip",
            "image_text_hidden_size": self.projection_dim,
            "vision_config": {
                "image_size": v.image_size, "patch_size": v.patch_size, "hidden_size": v.width,
                "num_hidden_layers": v.depth, "num_attention_heads": v.heads, "intermediate_size": v.mlp,
                "layer_norm_eps": v.ln_eps, "hidden_act": "gelu",
            },
            "text_config": {
                "vocab_size": t.vocab_size, "hidden_size": t.width, "num_hidden_layers": t.depth,
                "num_attention_heads": t.heads, "intermediate_size": t.mlp,
                "max_position_embeddings": t.max_positions, "layer_norm_eps": t.ln_eps,
                "bos_token_id": t.bos_token_id, "sep_token_id": t.sep_token_id,
                "pad_token_id": t.pad_token_id, "encoder_hidden_size": v.width, "hidden_act": "gelu",
            },
        }
