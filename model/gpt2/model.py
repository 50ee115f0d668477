"""GPT-2 in Flax NNX (transformers' GPT2LMHeadModel): logical axis names, a KV cache, no meshes.

Pre-LN blocks (attention, then an MLP with tanh GELU), learned positions, a final layer
norm and an LM head tied to the token embeddings. The layers are stacked on a `layers`
axis and run with lax.scan (model/layers.py), so compile time does not grow with depth.

Every forward pass goes through the KV cache `(L, B, S, 2, N, H)` (keys and values fused on
axis 3, as BLIP's decoder caches them): `step` writes the new tokens' keys and values at
column `start` and attends over the whole cache, the keys a row may see given by `key_ok`.
Prefill, one decode step and the generation loop are all this one function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from modelapi.axes import BATCH, CACHE_SEQ, EMBED, HEAD_DIM, HEADS, LAYERS, SEQ, VOCAB, constrain, tower

from ..layers import Dense, LayerNorm, attention, param, scan_layers, stack_layers, weight
from .config import Gpt2Config

SCOPE = "decoder"     # the model's one scope: the top-level key of its parameters, a named scope of its programs
KV_NAMES = (LAYERS, BATCH, CACHE_SEQ, None, HEADS, HEAD_DIM)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's "gelu_new": x/2·(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return jax.nn.gelu(x, approximate=True)


class Block(nnx.Module):
    def __init__(self, cfg: Gpt2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, h = cfg.width, cfg.heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = LayerNorm(d, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.qkv = Dense((d,), (3, n, h), (EMBED,), (None, HEADS, HEAD_DIM), **kw)
        self.out = Dense((n, h), (d,), (HEADS, HEAD_DIM), (EMBED,), **kw)
        self.ln_2 = LayerNorm(d, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.fc = Dense((d,), (cfg.mlp,), (EMBED,), ("mlp",), **kw)
        self.proj = Dense((cfg.mlp,), (d,), ("mlp",), (EMBED,), **kw)

    def __call__(self, x_btd: jax.Array, kv_bs2nh: jax.Array, start, key_ok_bts: jax.Array):
        qkv = self.qkv(self.ln_1(x_btd))                                  # (B, T, 3, N, H)
        kv = jax.lax.dynamic_update_slice(kv_bs2nh, qkv[:, :, 1:].astype(kv_bs2nh.dtype), (0, start, 0, 0, 0))
        keys, values = kv[:, :, 0].astype(qkv.dtype), kv[:, :, 1].astype(qkv.dtype)
        with jax.named_scope("attention"):
            a = attention(qkv[:, :, 0], keys, values, key_ok_bts[:, None])   # (B, T, N, H)
        x = x_btd + self.out(a)
        with jax.named_scope("mlp"):
            x = x + self.proj(gelu_tanh(self.fc(self.ln_2(x))))
        return constrain(x, (BATCH, SEQ, EMBED)), kv


class Gpt2(nnx.Module):
    def __init__(self, cfg: Gpt2Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.wte = param(rngs, (cfg.vocab_size, cfg.width), (VOCAB, EMBED), param_dtype)
        self.wpe = param(rngs, (cfg.positions, cfg.width), (None, EMBED), param_dtype)
        self.layers = stack_layers(lambda r: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth,
                                   rngs)
        self.ln_f = LayerNorm(cfg.width, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)

    def empty_cache(self, batch: int, length: int, dtype) -> jax.Array:
        c = self.cfg
        return jnp.zeros((c.depth, batch, length, 2, c.heads, c.head_dim), dtype)

    def step(self, ids_bt: jax.Array, positions_bt: jax.Array, kv: jax.Array, start, key_ok_bts: jax.Array,
             last_only: bool = True):
        """Logits (f32) of the last position (or of every position) and the cache with these
        tokens' keys and values written at column `start`."""
        with tower(SCOPE):
            x = weight(self.wte, self.dtype)[ids_bt] + weight(self.wpe, self.dtype)[positions_bt]
            x = constrain(x, (BATCH, SEQ, EMBED))

            def body(block, x, kv_layer):
                return block(x, kv_layer, start, key_ok_bts)
            x, kv = scan_layers(self.layers, body, x, kv, self.remat)
            x = self.ln_f(x[:, -1:] if last_only else x)
            logits = jnp.einsum("btd,vd->btv", x, weight(self.wte, self.dtype), preferred_element_type=jnp.float32)
            logits = constrain(logits, (BATCH, SEQ, VOCAB))
        return (logits[:, 0] if last_only else logits), constrain(kv, KV_NAMES)

    def logits(self, ids_bt: jax.Array, mask_bt: jax.Array | None = None) -> jax.Array:
        """Every position's logits of a (left-padded) batch, as GPT2LMHeadModel(ids, attention_mask)."""
        b, t = ids_bt.shape
        mask = jnp.ones((b, t), jnp.int32) if mask_bt is None else mask_bt.astype(jnp.int32)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        key_ok = causal(t, t) & mask.astype(bool)[:, None, :]
        out, _ = self.step(ids_bt, positions, self.empty_cache(b, t, self.dtype), 0, key_ok, last_only=False)
        return out


def causal(queries: int, keys: int, start=0) -> jax.Array:
    """(1, T, S): query t (at cache column start + t) sees keys at columns <= start + t."""
    return (jnp.arange(keys)[None, :] <= start + jnp.arange(queries)[:, None])[None]
