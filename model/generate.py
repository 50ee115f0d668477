"""Caption generation as single jit-able functions (prefill + fixed-length decode loop).

Greedy decoding reproduces `BlipForConditionalGeneration.generate` (num_beams=1,
do_sample=False): the prompt's first token is replaced by BOS and its trailing [SEP]
dropped (done by `caption_prompt`); a row that emits [SEP] emits PAD afterwards. The loop
has a static length, so the output is always (B, prompt + max_new_tokens); Hugging Face
stops early when every row is done, which only shortens its trailing padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .blip import Blip
from .config import TextConfig


def caption_prompt(text_cfg: TextConfig, prompt_ids: list[int] | None = None) -> np.ndarray:
    """Decoder input ids for an optional tokenized prompt ([CLS] ... [SEP] from the tokenizer),
    as BlipForConditionalGeneration.generate builds them: BOS first, trailing [SEP] dropped."""
    if not prompt_ids:
        return np.array([text_cfg.bos_token_id], np.int32)
    ids = list(prompt_ids)
    ids[0] = text_cfg.bos_token_id
    return np.array(ids[:-1] if len(ids) > 1 else ids, np.int32)


def greedy_caption(model: Blip, pixels_bchw: jax.Array, prompt_bp: jax.Array, max_new_tokens: int) -> jax.Array:
    """Token ids (B, P + max_new_tokens): the prompt followed by the greedy continuation."""
    t = model.config.text
    b, p = prompt_bp.shape
    image = model.encode_image(pixels_bchw)
    logits, cache = model.prefill(prompt_bp, image, p + max_new_tokens)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), t.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = first == t.sep_token_id

    def step(i, state):
        out, done, cache = state
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits, cache = model.decode_step(previous, p + i - 1, cache)
        tok = jnp.where(done, t.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return out, done | (tok == t.sep_token_id), cache

    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, done, cache))
    return jnp.concatenate([prompt_bp.astype(jnp.int32), out], axis=1)
