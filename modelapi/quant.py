"""Weight-only int8: a quantized weight the model layers dequantize where they use it.

Written by hand because none of flax, optax or orbax offers a weight-only int8 value that
can sit inside an NNX state and be scanned over layers; AQT/qwix would, but pull in a
training-time quantization framework for a 30-line need.

`QArray` holds int8 values and a float scale broadcastable against them (one scale per
output channel, reduced over the contracting axes). Layers call `materialize` on every
weight, so an int8 stack is dequantized one layer at a time inside the layer scan, and
XLA can fuse the multiply into the consuming matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QArray:
    q: jax.Array       # int8 values
    scale: jax.Array   # float32, same rank as q, size 1 on contracting axes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def ndim(self) -> int:
        return self.q.ndim

    def dequantize(self, dtype) -> jax.Array:
        return self.q.astype(dtype) * self.scale.astype(dtype)


def quantize(w: jax.Array, contract_axes: Sequence[int]) -> QArray:
    """Symmetric per-channel int8: scale = max|w| / 127 over the contracting axes."""
    axes = tuple(a % w.ndim for a in contract_axes)
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return QArray(q=q, scale=scale)


def materialize(value, dtype) -> jax.Array:
    """A weight in the compute dtype, whether it is stored as float or as QArray."""
    if isinstance(value, QArray):
        return value.dequantize(dtype)
    return value.astype(dtype)
