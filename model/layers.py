"""Building blocks shared by the vision and text towers.

Small NNX modules written here rather than taken from `flax.nnx` because every weight
must (a) carry logical axis names without eager sharding (the model never sees a mesh),
(b) accept int8 `QArray` values, and (c) be cast to the compute dtype at the point of use
so f32 parameters feed bf16 matmuls one scanned layer at a time. Layer norms keep their
statistics in f32 whatever the compute dtype.

On a local GPU (and only there) some kernel choices change, see `gpu_kernels`: unmasked
bf16 self-attention goes to cuDNN's fused flash attention, the layer loops are unrolled,
dots contract one flattened axis, and layer norms take E[x^2] - E[x]^2 (one reduction
instead of two). Each was measured on a lent H100 (docs/performance.md). TPU programs are
traced on a CPU host (the build pins JAX_PLATFORMS=cpu) and keep none of these.
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
        w = weight(self.kernel, self.dtype)
        if "flat-dots" in gpu_kernels() and w.ndim > 2:
            # one contracting and one output dim: XLA:GPU lowers a batch-1 dot over (heads,
            # head_dim) as a reduction with a handful of blocks (docs/performance.md)
            k = math.prod(w.shape[:self.n_in])
            out_shape = w.shape[self.n_in:]
            flat = x.astype(self.dtype).reshape(*x.shape[:x.ndim - self.n_in], k)
            y = jnp.dot(flat, w.reshape(k, -1)).reshape(*x.shape[:x.ndim - self.n_in], *out_shape)
        else:
            y = jnp.tensordot(x.astype(self.dtype), w, axes=self.n_in)
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
        if "fast-ln" in gpu_kernels():   # E[x²] - E[x]², as flax's use_fast_variance: one fused reduction
            var = jnp.maximum(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
        else:
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


GPU_KERNEL_CHOICES = ("cudnn", "unroll-layers", "unroll-decode", "flat-dots", "fast-ln")
# `unroll-decode` (the whole greedy loop straight-line) is measured but not in the default:
# no faster on the H100 and a 3x longer compile (docs/performance.md).
GPU_KERNEL_PRESETS = {"fused": ("cudnn", "unroll-layers", "flat-dots", "fast-ln"), "xla": ()}


def _tracing_for_local_gpu() -> bool:
    return jax.default_backend() == "gpu"


def gpu_kernels() -> frozenset[str]:
    """The GPU kernel choices in force: empty unless tracing for a local GPU. Read from
    CAPIBARA_GPU_KERNELS at trace time: a preset (`fused`, the default; `xla`, none) or
    choices joined by `+` (`cudnn+unroll-layers+unroll-decode`), so bench/gpu_decode.py can
    compare them in one process."""
    if not _tracing_for_local_gpu():
        return frozenset()
    value = os.environ.get("CAPIBARA_GPU_KERNELS", "fused").strip()
    if value in GPU_KERNEL_PRESETS:
        return frozenset(GPU_KERNEL_PRESETS[value])
    chosen = frozenset(part for part in value.split("+") if part)
    unknown = sorted(chosen - set(GPU_KERNEL_CHOICES))
    if unknown:
        raise ValueError(f"CAPIBARA_GPU_KERNELS={value!r}: unknown choice {', '.join(unknown)}; use a preset "
                         f"({', '.join(GPU_KERNEL_PRESETS)}) or choices from {', '.join(GPU_KERNEL_CHOICES)} "
                         "joined by '+'")
    return chosen


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention over (batch, len, heads, head_dim) tensors; mask is boolean,
    broadcastable to (batch, heads, q_len, k_len), True where attending is allowed."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    fused = (mask is None and q.shape[1] == k.shape[1] and q.dtype in (jnp.bfloat16, jnp.float16)
             and "cudnn" in gpu_kernels())
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
    return jax.lax.scan(step, carry, (state, xs), unroll=True if "unroll-layers" in gpu_kernels() else 1)
