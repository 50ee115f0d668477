"""Single-query attention over a fused key/value cache, as one Pallas (Triton) GPU kernel.

The decoder's decode step attends one new token per row to its self-attention cache and to
the image's cross-attention keys and values. XLA:GPU lowers that, per layer and step, to a
score reduction, softmax reductions, a value reduction and a few elementwise kernels
(docs/performance.md: ~2 us each, and the batch-1 caption's time is the kernel count). This
kernel does the whole attention of one (row, head) in one program: scores, masked online
softmax and the weighted values, reading keys and values once, straight out of the
(B, S, 2, N, H) cache (no slice copies).

Written by hand: JAX's own Pallas decode attention (jax.experimental.pallas.ops.gpu.
decode_attention) serves multi-query attention with one contiguous key range per row and
needs the key length divisible by its block; our caches are multi-head, fused (keys and
values on one axis), masked by an arbitrary boolean key mask (right-padded prompts) and 577
image tokens long (a prime). Same online-softmax scheme (FlashAttention-2) as that kernel.

Used only where model.layers.gpu_kernels() holds `pallas-decode` (traced for a local GPU);
`interpret=True` runs the same kernel on a CPU for tests. JAX 0.11 marks Pallas' Triton
backend deprecated in favour of Mosaic GPU; this kernel uses only pallas_call, BlockSpecs,
ref indexing and CompilerParams, so a port is small.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)   # a masked score: finite, so exp(m - m) never sees inf - inf

BLOCK = 128          # keys per loop step
FILL_PROGRAMS = 64   # split long key sets until about this many programs run (an H200 has 132 SMs)
# Launch settings forced for one attention ("self" or "cross"): tools/studies/gpu_decode.py's `pallas`
# study sets the fastest it timed before it traces the model. Empty: `launch_settings` decides.
OVERRIDE: dict[str, dict] = {}


def launch_settings(which: str, batch: int, heads: int, keys: int) -> dict:
    """decode_attention's keyword settings for one of the decoder's attentions, the rule the
    kernel probe measured on an H200 (docs/performance.md, 2026-11-28): a cache longer than
    two blocks (the 577 image tokens) is split over programs until ~64 run (batch 1: 5
    chunks, 13.2 -> 7.1 us a call), and a program that still loops over several blocks runs 8
    warps (batch 32: 27.8 -> 26.3 us); a short self-attention cache stays one program of 4 warps
    (splitting it costs the merge: 4.7 -> 6.3 us)."""
    if which in OVERRIDE:
        return dict(OVERRIDE[which])
    block = key_block(keys, BLOCK)
    blocks = -(-keys // block)
    chunks = max(1, min(blocks, FILL_PROGRAMS // (batch * heads))) if blocks > 2 else 1
    return {"block": BLOCK, "chunks": chunks, "num_warps": 8 if -(-blocks // chunks) > 2 else 4}


def key_block(keys: int, block: int = 128) -> int:
    """The keys read per loop iteration: `block`, or the largest power of two within a
    shorter cache (Triton arrays have power-of-two sizes)."""
    if keys < 1:
        raise ValueError(f"attention over {keys} keys")
    return min(block, 1 << (keys.bit_length() - 1))


def _kernel(*refs, keys: int, block: int, chunk: int, scale: float, fresh: bool, stacked: bool, biased: bool):
    """One (row, head, key chunk). refs, in order: q_ref (H,); with `fresh` this token's own
    key and value (H,) each; the cache as k_ref / v_ref (S, H), or `stacked` as the whole
    (L, B, S, 2, N, H) cache and a (1,) layer index read in place; bias_ref (S,) if `biased`;
    then the outputs. With one chunk that is o_ref (H,), the normalised output; with several,
    the chunk's unnormalised sum, running max and total, each (H,) (the max and the total
    broadcast), for `_merge`. Key blocks are a static loop; a block that would run past the
    end starts at S - block instead (no load reads out of bounds) and masks the rows an
    earlier block took. A fresh token starts the softmax (chunk 0 only), so the cache need not
    hold it yet."""
    refs = list(refs)
    q_ref = refs.pop(0)
    new_k_ref, new_v_ref = (refs.pop(0), refs.pop(0)) if fresh else (None, None)
    if stacked:
        cache_ref, layer_ref = refs.pop(0), refs.pop(0)
        layer, row, head = layer_ref[0], pl.program_id(0), pl.program_id(1)
        keys_at = lambda window: cache_ref[layer, row, window, 0, head, :]    # noqa: E731
        values_at = lambda window: cache_ref[layer, row, window, 1, head, :]  # noqa: E731
    else:
        k_ref, v_ref = refs.pop(0), refs.pop(0)
        keys_at = lambda window: k_ref[window, :]    # noqa: E731
        values_at = lambda window: v_ref[window, :]  # noqa: E731
    bias_ref = refs.pop(0) if biased else None
    out_refs = refs
    q = q_ref[...].astype(jnp.float32) * scale
    split = chunk < keys
    base = pl.program_id(2) * chunk if split else 0
    if fresh:
        own = jnp.sum(new_k_ref[...].astype(jnp.float32) * q)
        first_chunk = (base == 0).astype(jnp.float32) if split else 1.0   # arithmetic, not a scalar select:
        m = first_chunk * own + (1.0 - first_chunk) * MASKED               # Triton lowers no i1 scalar where
        total = first_chunk * jnp.ones((), jnp.float32)
        acc = first_chunk * new_v_ref[...].astype(jnp.float32)
    else:
        m = jnp.full((), MASKED, jnp.float32)
        total = jnp.zeros((), jnp.float32)
        acc = jnp.zeros(q.shape, jnp.float32)
    rows = jnp.arange(block)
    for offset in range(0, chunk, block):
        first = base + offset
        start = jnp.minimum(first, keys - block) if split else min(first, keys - block)
        window = pl.ds(start, block)
        s = jnp.sum(keys_at(window).astype(jnp.float32) * q[None, :], axis=1)
        if bias_ref is not None:
            s = s + bias_ref[window]
        if split:   # rows before `first` (taken already) or past this chunk's end are not this block's
            s = jnp.where((rows + start >= first) & (rows + start < base + chunk), s, MASKED)
        elif start != first:
            s = jnp.where(rows + start >= first, s, MASKED)
        m_next = jnp.maximum(m, jnp.max(s))
        p = jnp.exp(s - m_next)
        correction = jnp.exp(m - m_next)
        acc = acc * correction + jnp.sum(p[:, None] * values_at(window).astype(jnp.float32), axis=0)
        total = total * correction + jnp.sum(p)
        m = m_next
    if split:
        o_ref, m_ref, total_ref = out_refs
        o_ref[...] = acc
        m_ref[...] = jnp.full(acc.shape, m)
        total_ref[...] = jnp.full(acc.shape, total)
    else:
        (o_ref,) = out_refs
        o_ref[...] = (acc / total).astype(o_ref.dtype)


def _merge(acc, m, total, dtype):
    """Chunks' partial softmax sums (C, B, 1, N, H) into the normalised output (B, 1, N, H)."""
    top = jnp.max(m, axis=0)
    weight = jnp.exp(m - top)
    return (jnp.sum(acc * weight, axis=0) / jnp.sum(total * weight, axis=0)).astype(dtype)


def key_bias(allowed: jax.Array, keys: int) -> jax.Array:
    """A boolean key mask broadcastable to (B, 1, 1, S) as an additive f32 bias (B or 1, S)."""
    mask = jnp.broadcast_to(allowed, (*allowed.shape[:-1], keys)).reshape(allowed.shape[0], -1, keys)
    if mask.shape[1] != 1:
        raise ValueError(f"decode attention takes one query row and one mask per batch row, got mask "
                         f"{allowed.shape}")
    return jnp.where(mask[:, 0], 0.0, MASKED).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("q_slot", "fresh", "block", "chunks", "num_warps", "interpret"))
def decode_attention(q: jax.Array, kv: jax.Array, bias: jax.Array | None = None, *, q_slot: int | None = None,
                     layer: jax.Array | int | None = None, fresh: bool = False, block: int = 128, chunks: int = 1,
                     num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """Attention of one query per row: q (B, 1, N, H), or (B, 1, 3, N, H) with `q_slot`
    picking the query out of a fused projection without copying it; kv (B, S, 2, N, H) with
    keys at [:, :, 0] and values at [:, :, 1], or with `layer` the whole stacked cache
    (L, B, S, 2, N, H), read at that layer in place (no slice copied out first); bias
    (B or 1, S) f32 added to the scores (key_bias). With `fresh` (q fused, q_slot 0) the
    token's own key and value, slots 1 and 2 of q, are attended to as well, so the cache need
    not hold them yet: the bias must then hide the slot they will take. `chunks` > 1 splits the
    keys over that many programs per (row, head) and merges their partial sums after (more
    parallel work at batch 1, one more kernel). Returns (B, 1, N, H) in q's dtype, the same
    values (to rounding) as jax.nn.dot_product_attention with the scale 1/sqrt(H)."""
    stacked = layer is not None
    b, keys, two, n, h = kv.shape[-5:] if kv.ndim == 5 + stacked else (None,) * 5
    if two != 2 or q.shape[0] != b or q.shape[1] != 1 or q.shape[-2:] != (n, h):
        raise ValueError(f"decode attention: q {q.shape} and kv {kv.shape} are not (B, 1, [3,] N, H) and "
                         f"{'(L, B, S, 2, N, H)' if stacked else '(B, S, 2, N, H)'}")
    if (q.ndim == 5) != (q_slot is not None) or (fresh and q_slot != 0):
        raise ValueError("decode attention: q_slot names the query in a fused (B, 1, 3, N, H) projection "
                         "(slot 0 with `fresh`: the token's key and value are slots 1 and 2)")
    block = key_block(keys, block)
    chunk = max(block, -(-keys // chunks // block) * block) if chunks > 1 else keys
    grid = (b, n, -(-keys // chunk))
    slot_spec = lambda slot: pl.BlockSpec((None, None, *(None,) * (q.ndim - 4), None, h),  # noqa: E731
                                          lambda i, j, c: (i, 0, *(() if slot is None else (slot,)), j, 0))
    in_specs, operands = [slot_spec(q_slot)], [q]
    if fresh:
        in_specs += [slot_spec(1), slot_spec(2)]
        operands += [q, q]
    if stacked:
        in_specs += [pl.BlockSpec(kv.shape, lambda i, j, c: (0,) * 6), pl.BlockSpec((1,), lambda i, j, c: (0,))]
        operands += [kv, jnp.asarray(layer, jnp.int32).reshape(1)]
    else:
        in_specs += [pl.BlockSpec((None, keys, None, None, h), lambda i, j, c: (i, 0, 0, j, 0)),    # keys
                     pl.BlockSpec((None, keys, None, None, h), lambda i, j, c: (i, 0, 1, j, 0))]    # values
        operands += [kv, kv]
    if bias is not None:
        shared = bias.shape[0] == 1
        in_specs.append(pl.BlockSpec((None, keys), lambda i, j, c: (0 if shared else i, 0)))
        operands.append(bias)
    kernel = functools.partial(_kernel, keys=keys, block=block, chunk=chunk, scale=1.0 / math.sqrt(h), fresh=fresh,
                               stacked=stacked, biased=bias is not None)
    if grid[2] == 1:
        out_specs = pl.BlockSpec((None, None, None, h), lambda i, j, c: (i, 0, j, 0))
        out_shape = jax.ShapeDtypeStruct((b, 1, n, h), q.dtype)
    else:
        out_specs = [pl.BlockSpec((None, None, None, None, h), lambda i, j, c: (c, i, 0, j, 0))] * 3
        out_shape = [jax.ShapeDtypeStruct((grid[2], b, 1, n, h), jnp.float32)] * 3
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_attention",
    )(*operands)
    return out if grid[2] == 1 else _merge(*out, q.dtype)
