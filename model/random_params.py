"""Random parameters for a config, drawn on the host: what `--random-weights` builds and tests use.

Its own module because it needs both the model's abstract structure (state.py) and the
layout conversions (layout.py), and layout.py itself builds on state.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import BlipConfig
from .layout import canonical, to_layout
from .state import abstract_state


def init_params(config: BlipConfig, seed: int = 0) -> dict:
    """Random parameters (normal(0, 0.02) weights, unit layer-norm scales, zero biases, each
    as its layers.param declared), in `config`'s layout.

    Drawn on the host by numpy, one generator for every parameter in the canonical tree's
    order, then moved into `config`'s layout (so every layout holds the same values for one
    seed). Running the modules' own jax.random draws instead compiles a threefry program
    per parameter shape: 16 s of XLA:CPU compiling for the tiny preset, paid by every
    `--random-weights` export and test (docs/performance.md); numpy compiles nothing."""
    return to_layout(draw_params(abstract_state(canonical(config)), seed), config)


def draw_params(state: nnx.State, seed: int = 0) -> dict:
    """Random values for an abstract NNX state whose variables were made by layers.param (any
    model built from model/layers.py): a nested dict of arrays, drawn on the host."""
    rng = np.random.default_rng(seed)

    def draw(v: nnx.Variable) -> nnx.Variable:
        shape, dtype, meta = v.get_value().shape, v.get_value().dtype, v.get_metadata()
        if meta["init_std"] is None:
            return v.replace(jnp.full(shape, meta["init_fill"], dtype))
        drawn = rng.standard_normal(shape, np.float32)
        drawn *= meta["init_std"]   # in place: the base preset is 361M draws, an extra pass ~0.5 s
        return v.replace(jnp.asarray(drawn.astype(dtype, copy=False)))

    return nnx.to_pure_dict(jax.tree.map(draw, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
