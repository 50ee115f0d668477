"""Parameters as plain nested dicts, and the model bound to them.

The pipeline handles parameters as a pure pytree (nested dicts of arrays) so they can be
sharded, exported and checkpointed by ordinary JAX tools; `bind` rebuilds the NNX module
around them inside a traced function.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from .blip import Blip
from .config import BlipConfig


@functools.lru_cache(maxsize=64)
def _abstract(config: BlipConfig, dtype, remat: str):
    # Under an active mesh nnx.eval_shape would resolve the logical names against it;
    # the model's structure must not depend on any mesh, so build it with none.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        model = nnx.eval_shape(lambda: Blip(config, rngs=nnx.Rngs(0), dtype=dtype, remat=remat))
    return nnx.split(model)


def abstract_model(config: BlipConfig) -> Blip:
    """The module with ShapeDtypeStructs for parameters, for walking its structure."""
    return nnx.merge(*_abstract(config, jnp.dtype(jnp.float32), "none"))


def abstract_state(config: BlipConfig) -> nnx.State:
    """The f32 parameter state with its variables' metadata (init_std, logical names), no arrays."""
    return _abstract(config, jnp.dtype(jnp.float32), "none")[1]


def graphdef(config: BlipConfig, dtype=jnp.float32, remat: str = "none") -> nnx.GraphDef:
    return _abstract(config, jnp.dtype(dtype), remat)[0]


def abstract_params(config: BlipConfig, param_dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of every parameter; nothing is allocated."""
    state = _abstract(config, jnp.dtype(jnp.float32), "none")[1]
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(param_dtype)), nnx.to_pure_dict(state))


def logical_names(config: BlipConfig) -> dict:
    """The logical axis names of every parameter, in the same tree as the parameters."""
    state = _abstract(config, jnp.dtype(jnp.float32), "none")[1]
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def bind(config: BlipConfig, params: dict, dtype=jnp.float32, remat: str = "none") -> Blip:
    """The model over `params` (arrays, tracers or int8 QArrays), computing in `dtype`."""
    return nnx.merge(graphdef(config, dtype, remat), params)
