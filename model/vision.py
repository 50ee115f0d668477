"""ViT image encoder in the BLIP layout (BlipVisionModel).

Pre-LN blocks with a fused [q|k|v] projection and exact-erf GELU; the post-layernorm is
applied to every token, and the output is the full token sequence (class token first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .axes import BATCH, EMBED, HEAD_DIM, HEADS, PATCH, constrain
from .config import VisionConfig
from .layers import Dense, LayerNorm, Mlp, attention, param, scan_layers, stack_layers, weight


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.ln1 = LayerNorm(cfg.width, cfg.ln_eps, **kw)
        self.qkv = Dense((cfg.width,), (3, cfg.heads, cfg.head_dim), (EMBED,), (None, HEADS, HEAD_DIM),
                         rngs=rngs, **kw)
        self.out = Dense((cfg.heads, cfg.head_dim), (cfg.width,), (HEADS, HEAD_DIM), (EMBED,), rngs=rngs, **kw)
        self.ln2 = LayerNorm(cfg.width, cfg.ln_eps, **kw)
        self.mlp = Mlp(cfg.width, cfg.mlp, rngs=rngs, **kw)

    def __call__(self, x_bpd: jax.Array) -> jax.Array:
        with jax.named_scope("attention"):
            qkv = self.qkv(self.ln1(x_bpd))
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            q = constrain(q, (BATCH, PATCH, HEADS, HEAD_DIM))
            x_bpd = x_bpd + self.out(attention(q, k, v, None))
        x_bpd = x_bpd + self.mlp(self.ln2(x_bpd))
        return constrain(x_bpd, (BATCH, PATCH, EMBED))


class VisionEncoder(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, remat: str = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = Dense((cfg.patch_dim,), (cfg.width,), (None,), (EMBED,), rngs=rngs, **kw)
        self.class_embed = param(rngs, (cfg.width,), (EMBED,), param_dtype)
        self.pos_embed = param(rngs, (cfg.tokens, cfg.width), (None, EMBED), param_dtype)
        self.blocks = stack_layers(lambda r: VisionBlock(cfg, rngs=r, **kw), cfg.depth, rngs,
                                   storage=cfg.layer_storage)
        self.post_ln = LayerNorm(cfg.width, cfg.ln_eps, **kw)

    def patchify(self, pixels_bchw: jax.Array) -> jax.Array:
        """(B, C, H, W) → (B, patches, C·p·p), flattened in the (C, p, p) order of HF's conv weight."""
        b, c, h, w = pixels_bchw.shape
        p = self.cfg.patch_size
        x = pixels_bchw.reshape(b, c, h // p, p, w // p, p)
        x = x.transpose(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def __call__(self, pixels_bchw: jax.Array) -> jax.Array:
        cfg = self.cfg
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if tuple(pixels_bchw.shape[1:]) != expected:
            raise ValueError(f"pixel_values have shape {tuple(pixels_bchw.shape)}; "
                             f"this model expects (batch, {', '.join(map(str, expected))})")
        with jax.named_scope("vision_embed"):
            x = self.patch_embed(self.patchify(pixels_bchw))
            cls = jnp.broadcast_to(weight(self.class_embed, self.dtype), (x.shape[0], 1, cfg.width))
            x = jnp.concatenate([cls, x], axis=1) + weight(self.pos_embed, self.dtype)
            x = constrain(x, (BATCH, PATCH, EMBED))

        def body(block, x, _):
            return block(x), None

        with jax.named_scope("vision_blocks"):
            x, _ = scan_layers(self.blocks, body, x, remat=self.remat)
        return self.post_ln(x)
