"""Entry programs: pure functions of (params, inputs) built from a model config and a
precision policy, with abstract inputs and logical names for every argument and output.

Nothing here knows a mesh. `lower` joins a program with a sharding plan and a mesh:
parameters take the plan's parameter rules, inputs, outputs and the model's internal
activation annotations take its activation rules. Inputs are ShapeDtypeStructs, so
compiling `base` or `large` never materialises a weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from model import BlipConfig, greedy_caption
from model.axes import BATCH, EMBED, PATCH, VOCAB, is_names
from model.errors import UserError
from model.generate import beam_search, caption_from_image
from model.state import bind
from model.text import CROSS_KV_NAMES, SELF_KV_NAMES, cross_kv_shape
from sharding.plans import ShardingPlan
from sharding.precision import PrecisionPolicy
from sharding.storage import stored_specs, stored_template

SERVING_ENTRIES = ("encode_image", "caption", "decode_step", "score")
# What the semiotic module runs: everything after the image encoder, from image tokens, so
# one encoding serves captions, readings and scores of the same image.
SEMIOTIC_ENTRIES = ("caption_image", "readings", "score_image", "image_features", "text_features")
ENTRIES = SERVING_ENTRIES + ("train_step",) + SEMIOTIC_ENTRIES
NEEDS_TOWER = {"caption": "caption", "decode_step": "caption", "train_step": "caption", "score": "retrieval",
               "caption_image": "caption", "readings": "caption", "score_image": "retrieval",
               "image_features": "retrieval", "text_features": "retrieval"}


class ProgramError(UserError):
    """An entry that cannot be built for this model and options (reported as invalid)."""


@dataclass(frozen=True)
class ProgramOptions:
    """The static shapes and settings of the entry programs: caption length and prompt length,
    the padded text length, rematerialisation and learning rate for training, beam width."""
    max_new_tokens: int = 20      # caption: generated tokens (static loop length)
    prompt_len: int = 1           # caption: decoder prompt length ([BOS] alone by default)
    text_len: int = 32            # score / train_step: padded text length
    remat: str = "none"           # train_step: none | full | dots-saveable
    learning_rate: float = 1e-5   # train_step: AdamW
    beams: int = 3                # readings: beam width (the most readings one call returns)

    @property
    def cache_len(self) -> int:
        """The decoder's KV-cache length: the prompt and every generated token."""
        return self.prompt_len + self.max_new_tokens


@dataclass
class Program:
    entry: str
    fn: Callable
    args: tuple                   # pytrees of ShapeDtypeStruct (QArray for int8 weights)
    arg_names: tuple              # logical names per argument; "params" / "opt_state" for those
    out_names: Any                # pytree of logical-name tuples, or "params"/"opt_state" markers
    donate: tuple[int, ...] = ()
    axis_sizes: dict[str, set[int]] = field(default_factory=dict)
    analytic_flops: int = 0       # whole program, all devices (model config's count)
    config: BlipConfig | None = None
    policy: PrecisionPolicy | None = None
    optimizer: Any = None         # train_step: the optax transformation (for opt_state specs)


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def build_program(cfg: BlipConfig, entry: str, policy: PrecisionPolicy, batch: int,
                  options: ProgramOptions = ProgramOptions()) -> Program:
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
    params = stored_template(cfg, policy)
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


def _specs(program: Program, plan: ShardingPlan, names_or_marker, struct_tree=None):
    """PartitionSpec tree for one argument or output description."""
    cfg, policy = program.config, program.policy
    if isinstance(names_or_marker, str):
        pspecs = stored_specs(plan, cfg, policy)
        if names_or_marker == "params":
            return pspecs
        return optax.tree_map_params(program.optimizer, lambda _, spec: spec, struct_tree, pspecs,
                                     transform_non_params=lambda x: jax.tree.map(lambda _: PartitionSpec(), x),
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree.map(lambda n: plan.spec(n, "activations"), names_or_marker,
                        is_leaf=is_names)


def in_specs(program: Program, plan: ShardingPlan) -> tuple:
    return tuple(_specs(program, plan, names, struct) for names, struct in zip(program.arg_names, program.args))


def place(args, shardings):
    """`args` on the devices of `shardings` (a matching tree), placed from host copies.

    jax.device_put of an array already committed to one device onto a sharding over other
    devices compiles a resharding program per array shape: 9.7 s for the tiny model's
    parameters onto the 32 simulated CPU devices of a plan, 0.04 s from numpy arrays
    (docs/performance.md). On a CPU host the copies are free; on an accelerator they cost a
    transfer, still far less than the compiles."""
    return jax.device_put(jax.tree.map(np.asarray, args), shardings)


def out_specs(program: Program, plan: ShardingPlan):
    if program.entry == "train_step":
        return (_specs(program, plan, "params"), _specs(program, plan, "opt_state", program.args[1]),
                {"loss": PartitionSpec()})
    return _specs(program, plan, program.out_names)


def traced_afresh(fn: Callable) -> Callable:
    """A new function object that calls `fn`, for jax.jit to trace under the current context.

    JAX caches a traced jaxpr per function object, argument types and JAX's own config; the
    plan's activation rules (flax's logical_axis_rules) and the model's kernel choices are
    Python context it does not see. Jitting the same `fn` under a second plan reused the
    first plan's trace, sharding constraints and all (measured: a decode_step lowered under
    dp, then under replicated, ran replicated with dp's batch split). Every lowering under a
    plan or a kernel context therefore traces a fresh object."""
    return lambda *args: fn(*args)


def lower(program: Program, plan: ShardingPlan, mesh) -> jax.stages.Lowered:
    """jit(...).lower(...) with every argument and output sharded by the plan on `mesh`
    (traced afresh: the plan's activation rules are in effect, whatever was traced before)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    to_sharding = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree, is_leaf=is_spec)  # noqa: E731
    in_shardings = tuple(to_sharding(s) for s in in_specs(program, plan))
    out_shardings = to_sharding(out_specs(program, plan))
    args = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), program.args, in_shardings)
    jitted = jax.jit(traced_afresh(program.fn), in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=program.donate)
    with jax.set_mesh(mesh), plan.activated():
        return jitted.lower(*args)
