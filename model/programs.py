"""BLIP's entry programs: pure functions of (params, inputs) built from a config and a
precision, with abstract inputs and logical names for every argument and output
(modelapi.family.Program).

Nothing here knows a mesh or a plan: the pipeline hands in the parameter template in the
precision's storage form, and joins the program with a plan when it lowers it. Inputs are
ShapeDtypeStructs, so compiling `base` or `large` never materialises a weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from modelapi.family import Program, ProgramError, ProgramOptions

from .axes import BATCH, EMBED, PATCH, VOCAB
from .config import BlipConfig
from .generate import beam_search, caption_from_image, greedy_caption
from .state import bind
from .text import CROSS_KV_NAMES, SELF_KV_NAMES, cross_kv_shape

SERVING_ENTRIES = ("encode_image", "caption", "decode_step", "score")
# What the semiotic module runs: everything after the image encoder, from image tokens, so
# one encoding serves captions, readings and scores of the same image.
SEMIOTIC_ENTRIES = ("caption_image", "readings", "score_image", "image_features", "text_features")
ENTRIES = SERVING_ENTRIES + ("train_step",) + SEMIOTIC_ENTRIES
NEEDS_TOWER = {"caption": "caption", "decode_step": "caption", "train_step": "caption", "score": "retrieval",
               "caption_image": "caption", "readings": "caption", "score_image": "retrieval",
               "image_features": "retrieval", "text_features": "retrieval"}


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def build_program(cfg: BlipConfig, entry: str, policy, batch: int, options: ProgramOptions,
                  params) -> Program:
    """The entry's program at `batch`; `params` is the parameter template in `policy`'s storage
    form (the pipeline's sharding/storage.py makes it)."""
    if entry not in ENTRIES:
        raise ProgramError(f"unknown entry {entry!r}; choose from {', '.join(ENTRIES)}")
    tower = NEEDS_TOWER.get(entry)
    if tower and not cfg.has(tower):
        raise ProgramError(f"{entry} needs the {tower} tower, which this model does not have "
                           f"(towers: {', '.join(cfg.towers)})")
    if entry == "train_step" and not policy.trainable:
        raise ProgramError(f"{policy.name} is a serving precision; train_step needs float parameters")
    if entry in ("caption", "decode_step", "caption_image", "readings") and options.cache_len > cfg.text.max_positions:
        raise ProgramError(f"prompt_len + max_new_tokens = {options.cache_len} exceeds the text model's "
                           f"{cfg.text.max_positions} positions")
    if entry in ("score", "train_step", "score_image", "text_features") and options.text_len > cfg.text.max_positions:
        raise ProgramError(f"text_len {options.text_len} exceeds the text model's {cfg.text.max_positions} positions")

    v, t = cfg.vision, cfg.text
    compute, out_dtype = policy.compute, jnp.dtype(policy.output_dtype)
    pixels = _struct((batch, v.channels, v.image_size, v.image_size), jnp.float32)
    pixel_names = (BATCH, None, None, None)
    sizes = {**cfg.axis_sizes(), "batch": {batch}}
    model = lambda p, remat="none": bind(cfg, p, compute, remat)  # noqa: E731

    if entry == "encode_image":
        def fn(p, px):
            return model(p).encode_image(px).astype(out_dtype)
        return Program(entry, fn, (params, pixels), ("params", pixel_names), (BATCH, PATCH, EMBED),
                       axis_sizes=sizes, analytic_flops=cfg.flops_encode_image(batch), config=cfg, policy=policy)

    if entry == "caption":
        n_new = options.max_new_tokens

        def fn(p, px, prompt, prompt_mask):  # right-padded prompts of different lengths: model/generate.py
            return greedy_caption(model(p), px, prompt, n_new, prompt_mask)
        prompt = _struct((batch, options.prompt_len), jnp.int32)
        return Program(entry, fn, (params, pixels, prompt, prompt), ("params", pixel_names, (BATCH, None), (BATCH, None)),
                       (BATCH, None),
                       axis_sizes={**sizes, "cache_seq": {options.cache_len}},
                       analytic_flops=cfg.flops_caption(batch, n_new, options.prompt_len), config=cfg, policy=policy)

    if entry == "decode_step":
        def fn(p, ids, pos, cache):
            return model(p).decode_step(ids, pos, cache)
        s = options.cache_len
        cache = {"self_kv": _struct((t.depth, batch, s, 2, t.heads, t.head_dim), compute),
                 "cross_kv": _struct(cross_kv_shape(t, batch, v.tokens), compute)}
        cache_names = {"self_kv": SELF_KV_NAMES, "cross_kv": CROSS_KV_NAMES[t.cross_cache]}
        return Program(entry, fn, (params, _struct((batch, 1), jnp.int32), _struct((), jnp.int32), cache),
                       ("params", (BATCH, None), (), cache_names), ((BATCH, VOCAB), cache_names), donate=(3,),
                       axis_sizes={**sizes, "cache_seq": {s}},
                       analytic_flops=cfg.flops_decode_step(batch, context=s), config=cfg, policy=policy)

    text = _struct((batch, options.text_len), jnp.int32)
    image = _struct((batch, v.tokens, v.width), jnp.float32)
    image_names = (BATCH, PATCH, EMBED)
    if entry in SEMIOTIC_ENTRIES:
        return _semiotic_program(cfg, entry, policy, batch, options, params, image, image_names, text, sizes, model)
    if entry == "score":
        def fn(p, px, ids, mask):
            m = model(p)
            return m.score(m.encode_image(px), ids, mask)
        out = {"itm_logits": (BATCH, None), "itm_prob": (BATCH,), "itc_similarity": (BATCH,)}
        return Program(entry, fn, (params, pixels, text, text), ("params", pixel_names, (BATCH, None), (BATCH, None)),
                       out, axis_sizes=sizes, analytic_flops=cfg.flops_score(batch, options.text_len),
                       config=cfg, policy=policy)

    # train_step: captioning loss (teacher forcing) and one AdamW update.
    optimizer = optax.adamw(options.learning_rate)
    opt_state = jax.eval_shape(optimizer.init, params)

    def fn(p, state, px, ids, mask):
        def loss_fn(p):
            m = model(p, options.remat)
            logits = m.caption_logits(px, ids, mask)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
            weights = mask[:, 1:].astype(jnp.float32)
            return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, {"loss": loss}

    return Program(entry, fn, (params, opt_state, pixels, text, text),
                   ("params", "opt_state", pixel_names, (BATCH, None), (BATCH, None)),
                   ("params", "opt_state", {"loss": ()}), donate=(0, 1), axis_sizes=sizes,
                   analytic_flops=cfg.flops_train_step(batch, options.text_len), config=cfg, policy=policy,
                   optimizer=optimizer)


def _semiotic_program(cfg, entry, policy, batch, options, params, image, image_names, text, sizes, model) -> Program:
    prompt = _struct((batch, options.prompt_len), jnp.int32)
    text_names = (BATCH, None)
    common = dict(axis_sizes={**sizes, "cache_seq": {options.cache_len}}, config=cfg, policy=policy)
    n_new, k = options.max_new_tokens, options.beams
    if entry == "caption_image":
        def fn(p, img, prompt):
            return caption_from_image(model(p), img, prompt, n_new)
        return Program(entry, fn, (params, image, prompt), ("params", image_names, text_names), text_names,
                       analytic_flops=cfg.flops_caption(batch, n_new, options.prompt_len)
                       - cfg.flops_encode_image(batch), **common)
    if entry == "readings":
        def fn(p, img, prompt):
            return beam_search(model(p), img, prompt, n_new, k)
        return Program(entry, fn, (params, image, prompt), ("params", image_names, text_names),
                       ((BATCH, None, None), (BATCH, None)),
                       analytic_flops=k * (cfg.flops_caption(batch, n_new, options.prompt_len)
                                           - cfg.flops_encode_image(batch)), **common)
    if entry == "score_image":
        def fn(p, img, ids, mask):
            return model(p).score(img, ids, mask)
        out = {"itm_logits": (BATCH, None), "itm_prob": (BATCH,), "itc_similarity": (BATCH,)}
        return Program(entry, fn, (params, image, text, text), ("params", image_names, text_names, text_names), out,
                       analytic_flops=cfg.flops_score(batch, options.text_len) - cfg.flops_encode_image(batch),
                       **common)
    if entry == "image_features":
        def fn(p, img):
            return model(p).image_features(img)
        return Program(entry, fn, (params, image), ("params", image_names), (BATCH, None),
                       analytic_flops=2 * batch * cfg.vision.width * cfg.projection_dim, **common)

    def fn(p, ids, mask):
        return model(p).text_features(ids, mask)
    return Program(entry, fn, (params, text, text), ("params", text_names, text_names), (BATCH, None),
                   analytic_flops=batch * options.text_len * cfg.flops_text_token(options.text_len, cross=False,
                                                                                  lm_head=False), **common)

