"""Building blocks shared by the vision and text towers.

Small NNX modules written here rather than taken from `flax.nnx` because every weight
must (a) carry logical axis names without eager sharding (the model never sees a mesh),
(b) accept int8 `QArray` values, and (c) be cast to the compute dtype at the point of use
so f32 parameters feed bf16 matmuls one scanned layer at a time. Layer norms keep their
statistics in f32 whatever the compute dtype.

On a local GPU (and only there) two kernel choices change, see `gpu_kernels`: unmasked
bf16 self-attention goes to cuDNN's fused flash attention, and the layer loops are
unrolled so XLA can put a whole decode step into one CUDA graph instead of paying a
host round trip per layer. TPU programs are traced on a CPU host (the build pins
JAX_PLATFORMS=cpu) and keep XLA's attention and rolled loops.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from .quant import materialize

Names = tuple[str | None, ...]

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots-saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Names, dtype, std: float | None = 0.02,
          fill: float = 0.0) -> nnx.Param:
    """A parameter with logical axis names; normal(0, std) when std is set, else constant `fill`."""
    assert len(shape) == len(names), (shape, names)
    if std is None:
        value = jnp.full(tuple(shape), fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def weight(p: nnx.Param, dtype) -> jax.Array:
    return materialize(p.get_value(), dtype)


class Dense(nnx.Module):
    """y = x·W + b where W has shape in_shape + out_shape and contracts x's trailing axes."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_names: Names, out_names: Names,
                 *, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = True):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = param(rngs, (*in_shape, *out_shape), (*in_names, *out_names), param_dtype)
        self.bias = param(None, out_shape, out_names, param_dtype, std=None) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), weight(self.kernel, self.dtype), axes=self.n_in)
        if self.bias is not None:
            y = y + weight(self.bias, self.dtype)
        return y


class LayerNorm(nnx.Module):
    def __init__(self, width: int, eps: float, *, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(None, (width,), ("embed",), param_dtype, std=None, fill=1.0)
        self.bias = param(None, (width,), ("embed",), param_dtype, std=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * weight(self.scale, jnp.float32) + weight(self.bias, jnp.float32)
        return y.astype(self.dtype)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense((width,), (hidden,), ("embed",), ("mlp",), **kw)
        self.fc2 = Dense((hidden,), (width,), ("mlp",), ("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def gpu_kernels() -> bool:
    """True when tracing for a local GPU with the fused kernels on. CAPIBARA_GPU_KERNELS=xla
    turns them off (to compare, or if a cuDNN version rejects a shape)."""
    return jax.default_backend() == "gpu" and os.environ.get("CAPIBARA_GPU_KERNELS", "fused") != "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention over (batch, len, heads, head_dim) tensors; mask is boolean,
    broadcastable to (batch, heads, q_len, k_len), True where attending is allowed."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    fused = (mask is None and q.shape[1] == k.shape[1] and q.dtype in (jnp.bfloat16, jnp.float16)
             and gpu_kernels())
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn" if fused else None)


def stack_layers(create: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """`depth` copies of a layer with their parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return create(layer_rngs)

    return build(rngs)


def scan_layers(stack: nnx.Module, body: Callable, carry, xs=None, remat: str = "none"):
    """Run `body(layer, carry, x) -> (carry, y)` over a stacked layer module with
    `jax.lax.scan`, so compile time does not grow with depth. `remat` names a
    rematerialisation policy from REMAT_POLICIES (used by training)."""
    graphdef, state = nnx.split(stack)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=True if gpu_kernels() else 1)
