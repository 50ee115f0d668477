"""GPT-2's parameters as plain nested dicts (as model/state.py does for BLIP), and the model bound to them.

The tree is `{"decoder": {...}}`: the model's one scope is the top-level key of its
parameters, so a plan's per-scope rules find them (sharding/plans.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..random_params import draw_params
from .config import Gpt2Config
from .model import SCOPE, Gpt2


@functools.lru_cache(maxsize=16)
def _abstract(config: Gpt2Config, dtype, remat: str):
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):   # no mesh resolves the names
        model = nnx.eval_shape(lambda: Gpt2(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    return nnx.split(model)


def _state(config: Gpt2Config) -> nnx.State:
    return _abstract(config, jnp.dtype(jnp.float32), "none")[1]


def abstract_params(config: Gpt2Config) -> dict:
    """ShapeDtypeStructs of every parameter (f32); nothing is allocated."""
    return {SCOPE: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), nnx.to_pure_dict(_state(config)))}


def logical_names(config: Gpt2Config) -> dict:
    specs = nnx.to_pure_dict(nnx.get_partition_spec(_state(config)))
    return {SCOPE: jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))}


def init_params(config: Gpt2Config, seed: int = 0) -> dict:
    """Random parameters (normal(0, 0.02) weights, unit layer-norm scales, zero biases), on the host."""
    return {SCOPE: draw_params(_state(config), seed)}


def bind(config: Gpt2Config, params: dict, dtype=jnp.float32, remat: str = "none") -> Gpt2:
    """The model over `params` (arrays, tracers or int8 QArrays), computing in `dtype`."""
    return nnx.merge(_abstract(config, jnp.dtype(dtype), remat)[0], params[SCOPE])
