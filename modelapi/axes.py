"""Logical axis names: the only sharding vocabulary a model speaks.

Every parameter carries a tuple of these names (its `out_sharding` metadata) and key
activations are annotated with `constrain`. A model never sees a mesh: sharding plans
in `sharding/` map these names to mesh axes, and the pipeline activates a plan with
`jax.set_mesh(mesh)` and `flax.linen.logical_axis_rules(rules)` while it traces.

`LOGICAL_AXES` is the shared vocabulary the shipped plans are written in; a model may add
names of its own (its family's `logical_axes`, docs/models.md), which plan files may then
map. A scope (`tower`, activated by `tower_rules`) is a named part of a model, such as
BLIP's vision tower, that a plan may give rules of its own.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import linen

BATCH = "batch"
SEQ = "seq"            # text tokens
PATCH = "patch"        # image tokens
EMBED = "embed"        # model width (vision or text)
HEADS = "heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
CACHE_SEQ = "cache_seq"
LAYERS = "layers"      # the scanned layer axis

LOGICAL_AXES = (BATCH, SEQ, PATCH, EMBED, HEADS, HEAD_DIM, MLP, VOCAB, CACHE_SEQ, LAYERS)


def is_names(x) -> bool:
    """True for one array's logical names: a tuple of axis names and Nones (() for a scalar).
    Use as `is_leaf` when mapping over trees of names."""
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op unless the caller has
    activated logical-axis rules and a mesh (Flax's `with_logical_constraint`)."""
    return linen.with_logical_constraint(x, names)


_TOWER_RULES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("tower_rules", default=None)


@contextlib.contextmanager
def tower_rules(rules_by_tower: dict[str, list]):
    """Activate per-scope logical-axis rules (flax rule lists by scope name) for `tower`
    scopes entered while tracing; the pipeline's business, like flax's own rules."""
    token = _TOWER_RULES.set(dict(rules_by_tower))
    try:
        yield
    finally:
        _TOWER_RULES.reset(token)


@contextlib.contextmanager
def tower(name: str):
    """The named scope of one part of a model (a tower); inside it, that scope's rules if a plan
    gave it any. A scope's name is also the top-level key of its parameters."""
    with jax.named_scope(name):
        rules = (_TOWER_RULES.get() or {}).get(name)
        if rules is None:
            yield
        else:
            with linen.logical_axis_rules(rules):
                yield
