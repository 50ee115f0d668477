"""BERT text tower with cross-attention to image tokens (BlipTextModel / BlipTextLMHeadModel).

Post-LN blocks: self-attention, cross-attention over the image tokens, MLP. The same
tower serves as the captioning decoder (causal, with the LM head tied to the word
embeddings plus its own bias) and as the retrieval text encoder (bidirectional, no head).

Decoding keeps a KV cache: `{"self_kv": (L, B, S, 2, N, H), "cross_kv": (L, B, P, 2, N, H)}`
with keys and values fused on axis 3; with `cross_cache="head-major"` (the CPU serving
choice) the cross entry is (L, B, 2, N, H, P) instead, with "kv-major" (L, 2, B, P, N, H).
The cross-attention keys and values depend only on the image, so they are computed once at
prefill and read by every step. A tower that stores its layers per layer (the CPU serving
layout) decodes the caption loop over `layer_caches`: the same cache as lists of each layer's
own arrays, keys and values apart, so no step copies a layer's slice out of a stacked array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .axes import BATCH, CACHE_SEQ, EMBED, HEAD_DIM, HEADS, LAYERS, PATCH, SEQ, VOCAB, constrain
from .config import TextConfig
from .decode_attention import decode_attention, key_bias, launch_settings
from .layers import (
    Dense,
    LayerNorm,
    Mlp,
    attention,
    gelu,
    gpu_kernels,
    pallas_interpret,
    param,
    scan_layers,
    stack_layers,
    weight,
)

SELF_KV_NAMES = (LAYERS, BATCH, CACHE_SEQ, None, HEADS, HEAD_DIM)
# A layer's cross-attention keys and values are computed as (B, P, 2, N, H); each cache layout
# (TextConfig.cross_cache) stores them in this axis order, behind the leading layers axis.
CROSS_KV_ORDER = {"patch-major": (0, 1, 2, 3, 4), "head-major": (0, 2, 3, 4, 1), "kv-major": (2, 0, 1, 3, 4)}
_CROSS_KV_AXES = (BATCH, PATCH, None, HEADS, HEAD_DIM)
CROSS_KV_NAMES = {layout: (LAYERS, *(_CROSS_KV_AXES[i] for i in order)) for layout, order in CROSS_KV_ORDER.items()}


def cross_kv_shape(cfg: TextConfig, batch: int, patches: int) -> tuple[int, ...]:
    """The cross-attention cache's shape in `cfg.cross_cache`'s layout (names: CROSS_KV_NAMES)."""
    computed = (batch, patches, 2, cfg.heads, cfg.head_dim)
    return (cfg.depth, *(computed[i] for i in CROSS_KV_ORDER[cfg.cross_cache]))


def _kv_axis(layout: str) -> int:
    """Where a layer's cross-attention entry in `layout` holds keys and values apart (the 2)."""
    return CROSS_KV_ORDER[layout].index(2)


def split_cross_kv(layer_kv: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
    """One layer's cross-attention entry in `layout` as (keys, values), each in that layout's
    order without the fused axis: (B, N, H, P) head-major, (B, P, N, H) otherwise."""
    return tuple(jax.lax.index_in_dim(layer_kv, i, _kv_axis(layout), keepdims=False) for i in (0, 1))


def pallas_decoding(x_btd: jax.Array) -> bool:
    """Whether this step's attention runs as Pallas kernels: one token per row, on a local GPU
    with `pallas-decode`, and a concrete batch (a symbolic one cannot size a Triton grid)."""
    return x_btd.shape[1] == 1 and isinstance(x_btd.shape[0], int) and "pallas-decode" in gpu_kernels()


class TextBlock(nnx.Module):
    def __init__(self, cfg: TextConfig, vision_width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, layout=cfg.kernel_layout)
        n, h, d = cfg.heads, cfg.head_dim, cfg.width
        self.self_qkv = Dense((d,), (3, n, h), (EMBED,), (None, HEADS, HEAD_DIM), **kw)
        self.self_out = Dense((n, h), (d,), (HEADS, HEAD_DIM), (EMBED,), **kw)
        self.ln_self = LayerNorm(d, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.cross_q = Dense((d,), (n, h), (EMBED,), (HEADS, HEAD_DIM), **kw)
        self.cross_kv = Dense((vision_width,), (2, n, h), (EMBED,), (None, HEADS, HEAD_DIM), **kw)
        self.cross_out = Dense((n, h), (d,), (HEADS, HEAD_DIM), (EMBED,), **kw)
        self.ln_cross = LayerNorm(d, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.mlp = Mlp(d, cfg.mlp, **kw)
        self.ln_mlp = LayerNorm(d, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.cross_cache = cfg.cross_cache

    def image_keys_values(self, image_bpd: jax.Array) -> jax.Array:
        """This layer's cross-attention keys and values: (B, P, 2, N, H), (B, 2, N, H, P) head-major
        or (2, B, P, N, H) kv-major."""
        with jax.named_scope("cross_kv"):
            kv = self.cross_kv(image_bpd)
            order = CROSS_KV_ORDER[self.cross_cache]
            return kv if order == tuple(range(kv.ndim)) else jnp.transpose(kv, order)

    def cross_attention(self, q, cross_kv, one_query: bool):
        """Queries (B, T, N, H) against the image tokens' keys and values in this block's cache
        layout: the layer's fused entry, or its (keys, values) pair (TextTower.layer_caches)."""
        if isinstance(cross_kv, tuple):
            k, v = cross_kv
        elif one_query and self.cross_cache == "patch-major":   # the Pallas decode kernel reads the cache in place
            b, keys, _, n, _ = cross_kv.shape
            return decode_attention(q, cross_kv, None, interpret=pallas_interpret(),
                                    **launch_settings("cross", b, n, keys))
        else:
            k, v = split_cross_kv(cross_kv, self.cross_cache)
        if self.cross_cache == "head-major":   # (B, N, H, P): read as (B, P, N, H) without a copy
            k, v = (jnp.transpose(a, (0, 3, 1, 2)) for a in (k, v))
        return attention(q, k, v, None)

    def __call__(self, x_btd, self_mask, *, self_kv=None, pos=None, cross_kv=None, stacked_kv=None):
        """One block. With `self_kv` (B, S, 2, N, H) the new keys/values are written at
        `pos` and attention reads the whole cache; returns (x, updated self_kv or None).
        A decode step (one token per row) on a local GPU with `pallas-decode` attends with one
        Pallas kernel per attention (model/decode_attention.py) instead of XLA's reductions.
        `stacked_kv` = (the whole (L, B, S, 2, N, H) cache, this layer's index), `pallas-cache`:
        the kernel reads the cache in place and this token's key and value from the projection,
        and the block returns them, (B, 1, 2, N, H), for the caller to write once per step;
        `self_mask` must then hide slot `pos`."""
        with jax.named_scope("self_attention"):
            qkv = self.self_qkv(x_btd)
            q, kv = qkv[:, :, 0], qkv[:, :, 1:]
            if stacked_kv is not None:   # pallas-cache: the cache is read as it was; the new rows go back
                (cache, layer), self_kv = stacked_kv, kv
            else:
                if self_kv is not None:
                    self_kv = jax.lax.dynamic_update_slice(self_kv, kv.astype(self_kv.dtype), (0, pos, 0, 0, 0))
                    kv = self_kv
                cache, layer = self_kv, None
            one_query = stacked_kv is not None or pallas_decoding(x_btd)
            if one_query and cache is not None:
                b, keys, _, n, _ = cache.shape[-5:]
                a = decode_attention(qkv, cache, key_bias(self_mask, keys), q_slot=0, layer=layer,
                                     fresh=layer is not None, interpret=pallas_interpret(),
                                     **launch_settings("self", b, n, keys))
            else:
                a = attention(q, kv[:, :, 0], kv[:, :, 1], self_mask)
            x_btd = self.ln_self(x_btd + self.self_out(a))
        if cross_kv is not None:
            with jax.named_scope("cross_attention"):
                a = self.cross_attention(self.cross_q(x_btd), cross_kv, one_query)
                x_btd = self.ln_cross(x_btd + self.cross_out(a))
        x_btd = self.ln_mlp(x_btd + self.mlp(x_btd))
        return constrain(x_btd, (BATCH, SEQ, EMBED)), self_kv


class TextTower(nnx.Module):
    def __init__(self, cfg: TextConfig, vision_width: int, *, lm_head: bool, dtype, param_dtype,
                 rngs: nnx.Rngs, remat: str = "none"):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.word_embed = param(rngs, (cfg.vocab_size, cfg.width), (VOCAB, EMBED), param_dtype)
        self.pos_embed = param(rngs, (cfg.max_positions, cfg.width), (None, EMBED), param_dtype)
        self.ln_embed = LayerNorm(cfg.width, cfg.ln_eps, dtype=dtype, param_dtype=param_dtype)
        self.blocks = stack_layers(
            lambda r: TextBlock(cfg, vision_width, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.depth, rngs,
            storage=cfg.layer_storage)
        if lm_head:
            kw = dict(dtype=dtype, param_dtype=param_dtype)
            # A square kernel cannot name `embed` twice; its output axis stays unsharded.
            self.head_dense = Dense((cfg.width,), (cfg.width,), (EMBED,), (None,), rngs=rngs,
                                    layout=cfg.kernel_layout, **kw)
            self.head_ln = LayerNorm(cfg.width, cfg.ln_eps, **kw)
            self.head_bias = param(None, (cfg.vocab_size,), (VOCAB,), param_dtype, std=None)
        else:
            self.head_dense = self.head_ln = self.head_bias = None

    # ------------------------------------------------------------------ pieces
    def embed(self, ids_bt: jax.Array, start, positions_bt: jax.Array | None = None) -> jax.Array:
        """Word plus position embeddings: positions start..start+T-1, or per token when
        `positions_bt` is given (right-padded prompts, see generate.py)."""
        with jax.named_scope("text_embed"):
            words = jnp.take(weight(self.word_embed, self.dtype), ids_bt, axis=0)
            table = weight(self.pos_embed, self.dtype)
            if positions_bt is None:
                positions = jax.lax.dynamic_slice_in_dim(table, start, ids_bt.shape[1], axis=0)[None]
            else:
                positions = jnp.take(table, positions_bt, axis=0)
            return constrain(self.ln_embed(words + positions), (BATCH, SEQ, EMBED))

    def image_keys_values(self, image_bpd: jax.Array) -> jax.Array:
        """Cross-attention keys/values for every layer: (L, B, P, 2, N, H), head-major (L, B, 2, N, H, P)
        or kv-major (L, 2, B, P, N, H)."""
        def body(block, carry, _):
            return carry, block.image_keys_values(image_bpd)

        _, kv = scan_layers(self.blocks, body, None, remat=self.remat)
        return constrain(kv, CROSS_KV_NAMES[self.cfg.cross_cache])

    def logits(self, hidden_btd: jax.Array) -> jax.Array:
        """LM head: dense, GELU, LN, then the tied embedding matrix plus bias; float32 out."""
        if self.head_dense is None:
            raise ValueError("this text tower has no LM head (it is the retrieval encoder)")
        with jax.named_scope("lm_head"):
            h = self.head_ln(gelu(self.head_dense(hidden_btd)))
            out = jnp.einsum("btd,vd->btv", h, weight(self.word_embed, self.dtype))
            out = out + weight(self.head_bias, self.dtype)
            return constrain(out.astype(jnp.float32), (BATCH, SEQ, VOCAB))

    # ------------------------------------------------------------------ full passes
    def __call__(self, ids_bt: jax.Array, mask_bt: jax.Array | None, image_bpd: jax.Array | None,
                 *, causal: bool) -> jax.Array:
        """Hidden states for a whole sequence (no cache): the decoder with `causal=True`,
        the retrieval encoder with `causal=False`; no cross-attention when image is None."""
        b, t = ids_bt.shape
        x = self.embed(ids_bt, 0)
        allowed = jnp.ones((b, 1, 1, t), bool) if mask_bt is None else mask_bt[:, None, None, :].astype(bool)
        if causal:
            allowed = allowed & jnp.tril(jnp.ones((t, t), bool))[None, None]

        def body(block, x, _):
            cross = None if image_bpd is None else block.image_keys_values(image_bpd)
            x, _ = block(x, allowed, cross_kv=cross)
            return x, None

        x, _ = scan_layers(self.blocks, body, x, remat=self.remat)
        return x

    def decode(self, ids_bt: jax.Array, pos, cache: dict, key_mask_bs: jax.Array | None = None,
               positions_bt: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """Process `ids_bt` at cache slots pos..pos+T-1 against the cache; returns hidden
        states and the cache with these slots written. `key_mask_bs` (B, cache) hides slots
        (a right-padded prompt's padding); `positions_bt` gives each token's position id."""
        t = ids_bt.shape[1]
        layered = isinstance(cache["self_kv"], list)   # layer_caches
        cache_len = cache["self_kv"][0].shape[1] if layered else cache["self_kv"].shape[2]
        x = self.embed(ids_bt, pos, positions_bt)
        query_pos = pos + jnp.arange(t)
        allowed = (jnp.arange(cache_len)[None, :] <= query_pos[:, None])[None, None]
        if key_mask_bs is not None:
            allowed = allowed & key_mask_bs.astype(bool)[:, None, None, :]

        if pallas_decoding(x) and "pallas-cache" in gpu_kernels() and self.remat == "none":
            # every layer's kernel reads the stacked cache in place; the new rows are written once
            stale = allowed & (jnp.arange(cache_len) != pos)[None, None, None, :]

            def fresh(block, x, inputs):
                layer, cross_kv = inputs
                return block(x, stale, cross_kv=cross_kv, stacked_kv=(cache["self_kv"], layer))

            x, rows = scan_layers(self.blocks, fresh, x, xs=(jnp.arange(self.cfg.depth), cache["cross_kv"]))
            self_kv = jax.lax.dynamic_update_slice(cache["self_kv"], rows.astype(cache["self_kv"].dtype),
                                                   (0, 0, pos, 0, 0, 0))
            return x, {"self_kv": constrain(self_kv, SELF_KV_NAMES), "cross_kv": cache["cross_kv"]}

        if layered:   # each layer's own buffers, straight-line
            written = []
            for block, self_kv, cross_kv in zip(self.blocks, cache["self_kv"], cache["cross_kv"]):
                x, self_kv = block(x, allowed, self_kv=self_kv, pos=pos, cross_kv=cross_kv)
                written.append(constrain(self_kv, SELF_KV_NAMES[1:]))
            return x, {"self_kv": written, "cross_kv": cache["cross_kv"]}

        def body(block, x, layer_cache):
            self_kv, cross_kv = layer_cache
            x, self_kv = block(x, allowed, self_kv=self_kv, pos=pos, cross_kv=cross_kv)
            return x, self_kv

        x, self_kv = scan_layers(self.blocks, body, x, xs=(cache["self_kv"], cache["cross_kv"]),
                                 remat=self.remat)
        return x, {"self_kv": constrain(self_kv, SELF_KV_NAMES), "cross_kv": cache["cross_kv"]}

    def layer_caches(self, cache: dict) -> dict:
        """The stacked decode cache as each layer's own arrays, for a tower that stores its layers
        per layer (the CPU serving layout): `self_kv` a list of (B, S, 2, N, H), `cross_kv` a list
        of (keys, values) pairs (split_cross_kv). XLA:CPU hands a dot only a whole buffer, so a
        layer's slice of the stacked cache was copied out before every step's attention (small
        caption, fp32: 240 copies, 14.5 ms of ~185 at batch 1, 130 of ~1000 ms at batch 8);
        split once after the prefill, a decode loop carries buffers its dots read in place.
        Other towers get `cache` back: their scan reads slices in place."""
        if not isinstance(self.blocks, nnx.List):
            return cache
        layout = self.cfg.cross_cache
        halves = tuple(n for i, n in enumerate(CROSS_KV_NAMES[layout][1:]) if i != _kv_axis(layout))
        depth = self.cfg.depth
        return {"self_kv": [constrain(cache["self_kv"][i], SELF_KV_NAMES[1:]) for i in range(depth)],
                "cross_kv": [tuple(constrain(a, halves) for a in split_cross_kv(cache["cross_kv"][i], layout))
                             for i in range(depth)]}
