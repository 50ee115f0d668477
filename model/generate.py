"""Caption generation as single jit-able functions (prefill + fixed-length decode loop).

Greedy decoding reproduces `BlipForConditionalGeneration.generate` (num_beams=1,
do_sample=False): the prompt's first token is replaced by BOS and its trailing [SEP]
dropped (done by `caption_prompt`); a row that emits [SEP] emits PAD afterwards. The loop
has a static length, so the output is always (B, prompt + max_new_tokens); Hugging Face
stops early when every row is done, which only shortens its trailing padding.

Prompts of different lengths in one batch are right-padded with a `prompt_mask` (1 for a
token, 0 for padding), exactly as `BlipForConditionalGeneration.generate(input_ids,
attention_mask)` treats them in transformers 5: padding is hidden from attention, position
ids are the mask's cumulative sum minus one (0 on padding), the first new token is read
from the last column (a padding column for a shorter row), and new tokens continue the
last column's position id. A full mask gives the plain behaviour.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .blip import Blip
from .config import TextConfig
from .layers import gpu_kernels, hoisted_layers


def caption_prompt(text_cfg: TextConfig, prompt_ids: list[int] | None = None) -> np.ndarray:
    """Decoder input ids for an optional tokenized prompt ([CLS] ... [SEP] from the tokenizer),
    as BlipForConditionalGeneration.generate builds them: BOS first, trailing [SEP] dropped."""
    if not prompt_ids:
        return np.array([text_cfg.bos_token_id], np.int32)
    ids = list(prompt_ids)
    ids[0] = text_cfg.bos_token_id
    return np.array(ids[:-1] if len(ids) > 1 else ids, np.int32)


def greedy_caption(model: Blip, pixels_bchw: jax.Array, prompt_bp: jax.Array, max_new_tokens: int,
                   prompt_mask_bp: jax.Array | None = None) -> jax.Array:
    """Token ids (B, P + max_new_tokens): the prompt followed by the greedy continuation."""
    return caption_from_image(model, model.encode_image(pixels_bchw), prompt_bp, max_new_tokens, prompt_mask_bp)


def caption_from_image(model: Blip, image_bpd: jax.Array, prompt_bp: jax.Array, max_new_tokens: int,
                       prompt_mask_bp: jax.Array | None = None) -> jax.Array:
    """Greedy caption from already encoded image tokens (so one encoding serves many calls);
    `prompt_mask_bp` marks the tokens of right-padded prompts (module docstring)."""
    with hoisted_layers(model.text_decoder.blocks, rows=prompt_bp.shape[0]):   # GPU only (layers.hoisted_layers)
        return _greedy(model, image_bpd, prompt_bp, max_new_tokens, prompt_mask_bp)


def _greedy(model: Blip, image_bpd: jax.Array, prompt_bp: jax.Array, max_new_tokens: int,
            prompt_mask_bp: jax.Array | None) -> jax.Array:
    t = model.config.text
    b, p = prompt_bp.shape
    if prompt_mask_bp is None:
        key_mask, next_pos = None, None
        logits, cache = model.prefill(prompt_bp, image_bpd, p + max_new_tokens)
    else:
        mask = prompt_mask_bp.astype(bool)
        key_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
        positions = jnp.where(mask, jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        cache = model.init_cache(image_bpd, p + max_new_tokens)
        logits, cache = model.decode_step(prompt_bp, 0, cache, key_mask, positions)
        next_pos = positions[:, -1:] + 1                                  # (B, 1): the first new token's
    cache = model.text_decoder.layer_caches(cache)   # per-layer storage (CPU): each layer's own buffers
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), t.pad_token_id, jnp.int32).at[:, 0].set(first)
    done = first == t.sep_token_id

    def step(i, state):
        out, done, cache = state
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        positions = None if next_pos is None else next_pos + (i - 1)
        logits, cache = model.decode_step(previous, p + i - 1, cache, key_mask, positions)
        tok = jnp.where(done, t.pad_token_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return out, done | (tok == t.sep_token_id), cache

    # unroll-decode (GPU only, see layers.gpu_kernels): straight-line steps, no per-step while
    unroll = max(1, max_new_tokens - 1) if "unroll-decode" in gpu_kernels() else 1
    out, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, done, cache), unroll=unroll)
    return jnp.concatenate([prompt_bp.astype(jnp.int32), out], axis=1)


def beam_search(model: Blip, image_bpd: jax.Array, prompt_bp: jax.Array, max_new_tokens: int,
                beams: int) -> tuple[jax.Array, jax.Array]:
    """The `beams` best continuations per image by summed log-probability, as one jit-able
    program: (ids (B, K, P + max_new_tokens), log_probs (B, K)), best first.

    Beams are distinct token sequences by construction: only the first beam is live at
    the start, and every step keeps the top-K distinct (beam, token) extensions. A beam
    that emits [SEP] is finished: it keeps its score and emits PAD. Scores are summed
    log-probabilities divided by the generated length (length-normalised, as Hugging
    Face's default length_penalty=1.0 does), so finished short readings compete fairly.
    """
    t = model.config.text
    b, p = prompt_bp.shape
    k = beams
    image = jnp.repeat(image_bpd, k, axis=0)                       # (B·K, P, D): beam-major within an image
    prompt = jnp.repeat(prompt_bp, k, axis=0)
    logits, cache = model.prefill(prompt, image, p + max_new_tokens)
    neg = jnp.float32(-1e9)
    score = jnp.tile(jnp.array([0.0] + [neg] * (k - 1), jnp.float32), b).reshape(b, k)
    out = jnp.full((b, k, max_new_tokens), t.pad_token_id, jnp.int32)
    done = jnp.zeros((b, k), bool)
    length = jnp.zeros((b, k), jnp.float32)

    def select(i, logits, out, score, done, length, cache):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, -1)
        vocab = logp.shape[-1]
        # a finished beam has one continuation, PAD, at no cost
        pad_only = jnp.full((vocab,), neg).at[t.pad_token_id].set(0.0)
        logp = jnp.where(done[..., None], pad_only, logp)
        candidates = (score[..., None] + logp).reshape(b, k * vocab)
        top, flat = jax.lax.top_k(candidates, k)
        parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        gather = lambda x: jnp.take_along_axis(x, parent, axis=1)  # noqa: E731
        out = jnp.take_along_axis(out, parent[..., None], axis=1)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[..., None], i, axis=2)
        was_done = gather(done)
        length = gather(length) + (~was_done).astype(jnp.float32)
        done = was_done | (token == t.sep_token_id)
        rows = (jnp.arange(b)[:, None] * k + parent).reshape(-1)
        cache = {"self_kv": jnp.take(cache["self_kv"], rows, axis=1), "cross_kv": cache["cross_kv"]}
        return out, top, done, length, cache

    out, score, done, length, cache = select(0, logits, out, score, done, length, cache)

    def step(i, state):
        out, score, done, length, cache = state
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=2).reshape(b * k, 1)
        logits, cache = model.decode_step(previous, p + i - 1, cache)
        return select(i, logits, out, score, done, length, cache)

    out, score, done, length, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, score, done, length, cache))
    normalised = score / jnp.maximum(length, 1.0)
    order = jnp.argsort(-normalised, axis=1)
    out = jnp.take_along_axis(out, order[..., None], axis=1)
    ids = jnp.concatenate([jnp.broadcast_to(prompt_bp[:, None].astype(jnp.int32), (b, k, p)), out], axis=2)
    return ids, jnp.take_along_axis(normalised, order, axis=1)
