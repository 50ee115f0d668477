"""The semiotic model: one ViT image encoder serving a captioning tower and a retrieval tower.

Public entry methods (what the pipeline compiles, through `model.programs`-style wrappers):
  encode_image      pixels → image tokens
  decoder_logits    teacher-forced captioning logits (and so the training loss)
  caption_logits    the same from pixels (the image encoded first)
  prefill / decode_step   KV-cached incremental decoding
  itm / itc         image–text matching probability and contrastive similarity
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from .axes import BATCH, EMBED, VOCAB, constrain, tower
from .config import BlipConfig
from .layers import Dense
from .text import CROSS_KV_NAMES, SELF_KV_NAMES, TextTower
from .vision import VisionEncoder


class Blip(nnx.Module):
    def __init__(self, config: BlipConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: str = "none"):
        self.config = config
        self.dtype = dtype
        v, t = config.vision, config.text
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
        self.vision = VisionEncoder(v, **kw)
        self.text_decoder = TextTower(t, v.width, lm_head=True, **kw) if config.has("caption") else None
        if config.has("retrieval"):
            self.text_encoder = TextTower(t, v.width, lm_head=False, **kw)
            dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.vision_proj = Dense((v.width,), (config.projection_dim,), (EMBED,), (None,), **dense)
            self.text_proj = Dense((t.width,), (config.projection_dim,), (EMBED,), (None,), **dense)
            self.itm_head = Dense((t.width,), (2,), (EMBED,), (None,), **dense)
        else:
            self.text_encoder = self.vision_proj = self.text_proj = self.itm_head = None

    # ------------------------------------------------------------------ helpers
    def _tower(self, name: str):
        tower = self.text_decoder if name == "caption" else self.text_encoder
        if tower is None:
            raise ValueError(f"this model has no {name} tower (towers: {self.config.towers}); "
                             f"load a checkpoint that has it")
        return tower

    def encode_image(self, pixels_bchw: jax.Array) -> jax.Array:
        with tower("vision"):
            return self.vision(pixels_bchw)

    # ------------------------------------------------------------------ captioning
    def decoder_logits(self, ids_bt, mask_bt, image_bpd) -> jax.Array:
        decoder = self._tower("caption")
        with tower("text_decoder"):
            return decoder.logits(decoder(ids_bt, mask_bt, image_bpd, causal=True))

    def caption_logits(self, pixels_bchw, ids_bt, mask_bt) -> jax.Array:
        """Teacher-forced logits from pixels: the training loss's, and what every prefix of
        `ids_bt` predicts next (position k-1 for the prefix ids[:, :k]; the decoder is causal)."""
        return self.decoder_logits(ids_bt, mask_bt, self.encode_image(pixels_bchw))

    def init_cache(self, image_bpd: jax.Array, cache_len: int) -> dict:
        t = self.config.text
        if cache_len > t.max_positions:
            raise ValueError(f"cache length {cache_len} exceeds text.max_positions ({t.max_positions}); "
                             "ask for fewer new tokens or a shorter prompt")
        decoder = self._tower("caption")
        with tower("text_decoder"):
            cross_kv = decoder.image_keys_values(image_bpd)
        self_kv = jnp.zeros((t.depth, image_bpd.shape[0], cache_len, 2, t.heads, t.head_dim), self.dtype)
        return {"self_kv": constrain(self_kv, SELF_KV_NAMES),
                "cross_kv": constrain(cross_kv, CROSS_KV_NAMES[t.cross_cache])}

    def prefill(self, prompt_bt: jax.Array, image_bpd: jax.Array, cache_len: int):
        """Run the prompt through the decoder; returns last-position logits (B, V) and the cache."""
        cache = self.init_cache(image_bpd, cache_len)
        return self.decode_step(prompt_bt, 0, cache)

    def decode_step(self, ids_bt: jax.Array, pos, cache: dict, key_mask_bs: jax.Array | None = None,
                    positions_bt: jax.Array | None = None):
        """Tokens at cache slots pos..pos+T-1 → logits of the last one (B, V) and the new cache;
        `key_mask_bs` and `positions_bt` as in TextTower.decode (right-padded prompts)."""
        decoder = self._tower("caption")
        with tower("text_decoder"):
            hidden, cache = decoder.decode(ids_bt, pos, cache, key_mask_bs, positions_bt)
            logits = decoder.logits(hidden[:, -1:])[:, 0]
        return constrain(logits, (BATCH, VOCAB)), cache

    # ------------------------------------------------------------------ retrieval
    def itm_logits(self, image_bpd, ids_bt, mask_bt) -> jax.Array:
        """Image–text matching logits (B, 2); softmax[..., 1] is the match probability."""
        encoder = self._tower("retrieval")
        with tower("text_encoder"):
            hidden = encoder(ids_bt, mask_bt, image_bpd, causal=False)
        with jax.named_scope("itm_head"):
            return self.itm_head(hidden[:, 0]).astype(jnp.float32)

    def image_features(self, image_bpd) -> jax.Array:
        """L2-normalised image embedding (B, projection_dim) for contrastive similarity."""
        self._tower("retrieval")
        with jax.named_scope("itc_heads"):
            return _normalize(self.vision_proj(image_bpd[:, 0]).astype(jnp.float32))

    def text_features(self, ids_bt, mask_bt) -> jax.Array:
        """L2-normalised text embedding (B, projection_dim): the text encoder without the image."""
        encoder = self._tower("retrieval")
        with tower("text_encoder"):
            hidden = encoder(ids_bt, mask_bt, None, causal=False)
        with jax.named_scope("itc_heads"):
            return _normalize(self.text_proj(hidden[:, 0]).astype(jnp.float32))

    def itc_features(self, image_bpd, ids_bt, mask_bt) -> tuple[jax.Array, jax.Array]:
        """Image and text embeddings for contrastive similarity (row i with row i: their dot product)."""
        return self.image_features(image_bpd), self.text_features(ids_bt, mask_bt)

    def score(self, image_bpd, ids_bt, mask_bt) -> dict:
        """Pairwise scores for row i's image with row i's text."""
        itm = self.itm_logits(image_bpd, ids_bt, mask_bt)
        img, txt = self.itc_features(image_bpd, ids_bt, mask_bt)
        return {"itm_logits": itm, "itm_prob": jax.nn.softmax(itm, axis=-1)[:, 1],
                "itc_similarity": jnp.sum(img * txt, axis=-1)}



def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
