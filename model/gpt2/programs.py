"""GPT-2's entry programs: prefill, decode_step and generate, each a pure function of
(params, inputs) with abstract inputs and logical names (modelapi.family.Program).

- prefill(prompt_ids): the last position's logits and the KV cache of a batch of prompts of
  one length, the cache sized for `max_new_tokens` more.
- decode_step(input_ids, position, cache): one token per row at cache column `position`
  (the same for every row, as after `prefill`), its logits and the updated cache (donated).
- generate(prompt_ids, prompt_mask): greedy decoding as `GPT2LMHeadModel.generate(input_ids,
  attention_mask, do_sample=False)` without early stopping: the prompt followed by
  `max_new_tokens` tokens. Prompts of different lengths are left-padded with a mask (1 for a
  token), as transformers pads them for a decoder-only model; position ids are the mask's
  cumulative sum minus one. Rows keep going after the end-of-text token; a server cuts there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from modelapi.axes import BATCH, VOCAB
from modelapi.family import Program, ProgramError, ProgramOptions

from .config import Gpt2Config
from .model import KV_NAMES, Gpt2, causal
from .state import bind

ENTRIES = ("prefill", "decode_step", "generate")


def _struct(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def greedy(model: Gpt2, prompt_bp: jax.Array, mask_bp: jax.Array, new_tokens: int) -> jax.Array:
    """(B, P + new_tokens): left-padded prompts and their greedy continuation (module docstring)."""
    b, p = prompt_bp.shape
    s = p + new_tokens
    mask = mask_bp.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    key_valid = jnp.concatenate([mask.astype(bool), jnp.ones((b, new_tokens), bool)], axis=1)   # (B, S)
    logits, kv = model.step(prompt_bp, positions, model.empty_cache(b, s, model.dtype), 0,
                            causal(p, s) & key_valid[:, None, :])
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def body(carry, i):
        token, kv, pos = carry
        column = p + i
        key_ok = (jnp.arange(s)[None, :] <= column) & key_valid
        logits, kv = model.step(token[:, None], pos[:, None], kv, column, key_ok[:, None, :])
        return (jnp.argmax(logits, axis=-1).astype(jnp.int32), kv, pos + 1), token

    (last, _, _), tokens = jax.lax.scan(body, (first, kv, positions[:, -1] + 1), jnp.arange(new_tokens - 1))
    return jnp.concatenate([prompt_bp.astype(jnp.int32), tokens.T, last[:, None]], axis=1)


def build_program(cfg: Gpt2Config, entry: str, policy, batch: int, options: ProgramOptions, params) -> Program:
    """The entry's program at `batch`; `params` is the parameter template in `policy`'s storage form."""
    if entry not in ENTRIES:
        raise ProgramError(f"unknown entry {entry!r} for gpt2; choose from {', '.join(ENTRIES)}")
    p, n, s = options.prompt_len, options.max_new_tokens, options.cache_len
    if s > cfg.positions:
        raise ProgramError(f"prompt_len + max_new_tokens = {s} exceeds the model's {cfg.positions} positions")
    compute = policy.compute
    sizes = {**cfg.axis_sizes(), "batch": {batch}, "cache_seq": {s}}
    common = dict(axis_sizes=sizes, config=cfg, policy=policy)
    prompt = _struct((batch, p), jnp.int32)

    def model(q):
        return bind(cfg, q, compute)

    if entry == "prefill":
        def fn(q, ids):
            m = model(q)
            positions = jnp.broadcast_to(jnp.arange(p), ids.shape)
            key_ok = jnp.broadcast_to(causal(p, s), (ids.shape[0], p, s))
            return m.step(ids, positions, m.empty_cache(ids.shape[0], s, compute), 0, key_ok)
        return Program(entry, fn, (params, prompt), ("params", (BATCH, None)), ((BATCH, VOCAB), KV_NAMES),
                       analytic_flops=cfg.flops_prefill(batch, p, s), **common)

    if entry == "decode_step":
        def fn(q, ids, position, kv):
            key_ok = jnp.broadcast_to(jnp.arange(s)[None, None, :] <= position, (ids.shape[0], 1, s))
            return model(q).step(ids, jnp.full(ids.shape, position), kv, position, key_ok)
        cache = _struct((cfg.depth, batch, s, 2, cfg.heads, cfg.head_dim), compute)
        return Program(entry, fn, (params, _struct((batch, 1), jnp.int32), _struct((), jnp.int32), cache),
                       ("params", (BATCH, None), (), KV_NAMES), ((BATCH, VOCAB), KV_NAMES), donate=(3,),
                       analytic_flops=cfg.flops_decode_step(batch, s), **common)

    def fn(q, ids, mask):
        return greedy(model(q), ids, mask, n)
    return Program(entry, fn, (params, prompt, prompt), ("params", (BATCH, None), (BATCH, None)), (BATCH, None),
                   analytic_flops=cfg.flops_generate(batch, p, n), **common)


def example_inputs(cfg: Gpt2Config, entry: str, inputs: tuple, rng: np.random.Generator) -> tuple:
    """Fixed, reproducible inputs (what `verify` compares on): random prompts, the second row
    of a generate batch left-padded by one token, a cache of small random values."""
    out = []
    for name, spec in zip(INPUTS[entry], inputs):
        if name in ("prompt_ids", "input_ids"):
            out.append(rng.integers(0, cfg.vocab_size, size=spec.shape).astype(np.int32))
        elif name == "prompt_mask":
            mask = np.ones(spec.shape, np.int32)
            if spec.shape[0] > 1 and spec.shape[1] > 1:
                mask[1, 0] = 0
            out.append(mask)
        elif name == "position":
            out.append(np.int32(1))   # the step after a one-token prompt
        else:   # the cache
            out.append((0.5 * rng.normal(size=spec.shape)).astype(spec.dtype))
    return tuple(out)


INPUTS = {"prefill": ("prompt_ids",), "decode_step": ("input_ids", "position", "cache"),
          "generate": ("prompt_ids", "prompt_mask")}
OUTPUTS = {"prefill": ("logits", "cache"), "decode_step": ("logits", "cache"), "generate": "token_ids"}
BATCH_AXES = {"decode_step": (0, None, 1)}
