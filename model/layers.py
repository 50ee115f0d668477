"""Building blocks shared by the vision and text towers.

Small NNX modules written here rather than taken from `flax.nnx` because every weight
must (a) carry logical axis names without eager sharding (the model never sees a mesh),
(b) accept int8 `QArray` values, and (c) be cast to the compute dtype at the point of use
so f32 parameters feed bf16 matmuls one scanned layer at a time. Layer norms keep their
statistics in f32 whatever the compute dtype.

On a local GPU (and only there) some kernel choices change, see `gpu_kernels`: unmasked
bf16 self-attention goes to cuDNN's fused flash attention, the layer loops are unrolled,
dots contract one flattened axis, layer norms take E[x^2] - E[x]^2 (one reduction
instead of two), and each decode step's attention is one Pallas kernel (model/decode_attention.py).
Each was measured on a lent H100 or H200 (docs/performance.md). TPU programs are traced on a
CPU host (the build pins JAX_PLATFORMS=cpu) and keep none of these.
"""

from __future__ import annotations

import contextlib
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
    """A parameter with logical axis names; normal(0, std) when std is set, else constant `fill`.
    The rule is kept as metadata (init_std, init_fill) for random_params.init_params, which draws
    random parameters on the host instead of tracing these jax.random draws."""
    assert len(shape) == len(names), (shape, names)
    if std is None:
        value = jnp.full(tuple(shape), fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, init_std=std, init_fill=fill)


def weight(p: nnx.Param, dtype) -> jax.Array:
    return materialize(p.get_value(), dtype)


class Dense(nnx.Module):
    """y = x·W + b contracting x's trailing axes with W's input axes.

    `layout` says how W is stored: "in-out" (in_shape + out_shape, the checkpoint, TPU and
    CPU layout) or "out-in" (out_shape + in_shape: each output's weights contiguous, so
    XLA:GPU lowers a batch-1 dot as a row-wise reduction; model/layout.py converts between
    the two). Out-in kernels always contract as one flattened 2-D dot."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_names: Names, out_names: Names,
                 *, dtype, param_dtype, rngs: nnx.Rngs, use_bias: bool = True, layout: str = "in-out"):
        self.n_in, self.n_out = len(in_shape), len(out_shape)
        self.dtype = dtype
        self.layout = layout
        if layout == "out-in":
            self.kernel = param(rngs, (*out_shape, *in_shape), (*out_names, *in_names), param_dtype)
        else:
            self.kernel = param(rngs, (*in_shape, *out_shape), (*in_names, *out_names), param_dtype)
        self.bias = param(None, out_shape, out_names, param_dtype, std=None) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        w = weight(self.kernel, self.dtype)
        x = x.astype(self.dtype)
        lead = x.shape[:x.ndim - self.n_in]
        out_first = self.layout == "out-in"
        w_in = w.shape[w.ndim - self.n_in:] if out_first else w.shape[:self.n_in]
        w_out = w.shape[:w.ndim - self.n_in] if out_first else w.shape[self.n_in:]
        if out_first or ("flat-dots" in gpu_kernels() and w.ndim > 2):
            # one contracting and one output dim: XLA:GPU lowers a batch-1 dot over (heads,
            # head_dim) as a reduction with a handful of blocks, and an out-in kernel with
            # several output dims is transposed back to in-out before its dot (docs/performance.md)
            k, n = math.prod(w_in), math.prod(w_out)
            flat = x.reshape(*lead, k)
            w2 = w.reshape((n, k) if out_first else (k, n))
            y = jax.lax.dot_general(flat, w2, (((flat.ndim - 1,), (1 if out_first else 0,)), ((), ())))
            y = y.reshape(*lead, *w_out)
        else:
            y = jnp.tensordot(x, w, axes=self.n_in)
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


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x) = x/2·(1 + erf(x/√2)): the formulation torch's (and so the Hugging
    Face BLIP reference's) `gelu` computes. `jax.nn.gelu(approximate=False)` writes it with
    erfc(−x/√2), which XLA expands into two rational approximations, an exp and a select:
    on XLA:CPU that kernel took 0.435 ms for a (197, 1536) f32 block against 0.219 ms for this
    one, and both are within 1.1e-6 of a float64 reference (torch: 1.2e-6).

    Under `portable_kernels()` (artifacts another runtime deserializes) it stays the erfc form:
    JAX 0.10.2 serializes `erf` as a `chlo.erf` composite (vhlo.composite_v2) that
    TensorFlow 2.21's StableHLO 1.13.7 cannot read, so a SavedModel holding it fails to load."""
    if _PORTABLE[0]:
        return jax.nn.gelu(x, approximate=False)
    half, root_half = (jnp.asarray(v, x.dtype) for v in (0.5, math.sqrt(0.5)))
    return half * x * (1 + jax.lax.erf(x * root_half))


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs: nnx.Rngs, layout: str = "in-out"):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, layout=layout)
        self.fc1 = Dense((width,), (hidden,), ("embed",), ("mlp",), **kw)
        self.fc2 = Dense((hidden,), (width,), ("mlp",), ("embed",), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("mlp"):
            return self.fc2(gelu(self.fc1(x)))


GPU_KERNEL_CHOICES = ("cudnn", "cudnn-cross", "unroll-layers", "unroll-decode", "flat-dots",
                      "fast-ln", "hoist-layers", "pallas-decode", "pallas-cache")
# `unroll-decode` (the whole greedy loop straight-line) is measured but not in the default:
# no faster on the H100 and a 3x longer compile (docs/performance.md). `pallas-decode` (each
# decode-step attention as one Pallas kernel, model/decode_attention.py): H200 caption bf16
# batch 1 11.34 -> 10.59 ms, batch 32 34.37 -> 30.29 ms, the same ids. `pallas-cache` (with it:
# the self-attention kernel reads the stacked cache in place plus the token's own key and value,
# and the cache is written once per step, model.text.TextTower.decode) removes the two copy
# kernels per layer and step its profile showed; written without a GPU to measure it on, so
# not in the default until tools/studies/gpu_decode.py's `pallas` study has timed it.
GPU_KERNEL_PRESETS = {"fused": ("cudnn", "unroll-layers", "flat-dots", "fast-ln", "hoist-layers", "pallas-decode"),
                      "xla": ()}


_PORTABLE = [0]   # open portable_kernels() contexts


def _tracing_for_local_gpu() -> bool:
    return jax.default_backend() == "gpu" and not _PORTABLE[0]


@contextlib.contextmanager
def portable_kernels():
    """Trace without any GPU-only kernel choice, even on a GPU host, and with only ops every
    consumer of a serialized program reads (the GELU's erfc form, see `gelu`): what jax.export
    and SavedModel artifacts need (cuDNN and Triton custom calls carry no compatibility
    guarantee, and a Triton grid cannot take a symbolic batch)."""
    _PORTABLE[0] += 1
    try:
        yield
    finally:
        _PORTABLE[0] -= 1


def pallas_interpret() -> bool:
    """Whether a Pallas kernel must run in interpret mode: traced for anything but a real GPU
    (the tests trace GPU choices on the CPU, see tests/test_parity.py)."""
    return jax.default_backend() != "gpu"


def gpu_kernels() -> frozenset[str]:
    """The GPU kernel choices in force: empty unless tracing for a local GPU. Read from
    CAPIBARA_GPU_KERNELS at trace time: a preset (`fused`, the default; `xla`, none) or
    choices joined by `+` (`cudnn+unroll-layers+unroll-decode`), so tools/studies/gpu_decode.py can
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


FUSED_ATTENTION = "cudnn"   # the fused implementation; tests trace the same calls with "xla" on a CPU


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax attention over (batch, len, heads, head_dim) tensors; mask is boolean,
    broadcastable to (batch, heads, q_len, k_len), True where attending is allowed. GPU
    choices (gpu_kernels): `cudnn` runs unmasked attention of equal lengths (the encoders) as
    one cuDNN kernel, `cudnn-cross` unmasked attention of unequal lengths too (the decoder's
    cross-attention; measured slower on an H200, so not in the default: docs/performance.md)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    same = q.shape[1] == k.shape[1]
    fused = mask is None and q.dtype in (jnp.bfloat16, jnp.float16) and ("cudnn" if same else "cudnn-cross") \
        in gpu_kernels()
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation=FUSED_ATTENTION if fused else None)


def stack_layers(create: Callable[[nnx.Rngs], nnx.Module], depth: int, rngs: nnx.Rngs,
                 storage: str = "stacked") -> nnx.Module:
    """`depth` copies of a layer: with their parameters stacked on a leading `layers` axis, or
    with `storage="per-layer"` as a list of modules (a tower config's `layer_storage`). Either way
    the random draws are the same, so both hold the same values for one seed."""
    if storage == "per-layer":
        stacked = nnx.to_pure_dict(nnx.state(stack_layers(create, depth, rngs)))
        graphdef = nnx.split(nnx.eval_shape(lambda: create(nnx.Rngs(0))))[0]   # the names without `layers`
        return nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)) for i in range(depth)])

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(layer_rngs: nnx.Rngs) -> nnx.Module:
        return create(layer_rngs)

    return build(rngs)


_HOISTED: dict[int, list] = {}   # id(stack) -> per-layer parameter states (hoisted_layers)
HOIST_MIN_ROWS = 2               # hoisted_layers: batch-1 GPU dots read slices in place


@contextlib.contextmanager
def hoisted_layers(stack: nnx.Module, rows: int):
    """GPU `hoist-layers` (with `unroll-layers`): slice every layer's parameters out of the
    stacked arrays once, where this context opens, so a loop that runs the stack many times
    (the decode loop) reads them in place. Without it XLA:GPU copies each stacked weight's
    layer slice before every GEMM that cannot read a slice (batch 32: 6 copies per layer per
    step, 1,440 per caption; H200: 36.4 -> 33.8 ms). With one row per step the dots are
    reductions that read the slice in place, and hoisting only adds the copy (11.28 -> 11.51
    ms), so it applies from 2 rows (2 to 31 not measured), and only to a concrete batch.
    Does nothing unless both choices are in force."""
    chosen = gpu_kernels()
    # a symbolic batch (jax.export's `b`) cannot be compared: such programs keep the slices in the loop
    if stack is None or isinstance(stack, nnx.List) or "hoist-layers" not in chosen or "unroll-layers" not in chosen \
            or not (isinstance(rows, int) and rows >= HOIST_MIN_ROWS):
        yield
        return
    _, state = nnx.split(stack)
    depth = jax.tree.leaves(state)[0].shape[0]
    _HOISTED[id(stack)] = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(depth)]
    try:
        yield
    finally:
        _HOISTED.pop(id(stack), None)


def scan_layers(stack: nnx.Module, body: Callable, carry, xs=None, remat: str = "none"):
    """Run `body(layer, carry, x) -> (carry, y)` over a stacked layer module with
    `jax.lax.scan`, so compile time does not grow with depth, or over a per-layer list
    (`stack_layers(storage="per-layer")`) written out layer by layer. `remat` names a
    rematerialisation policy from REMAT_POLICIES (used by training)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if isinstance(stack, nnx.List):   # per-layer storage: straight-line, each layer's own arrays
        if remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        return _layer_by_layer(list(stack), body, carry, xs)
    graphdef, state = nnx.split(stack)
    per_layer = _HOISTED.get(id(stack))
    if per_layer is not None and remat == "none":   # hoisted_layers: straight-line over the slices
        return _layer_by_layer([nnx.merge(graphdef, layer_state) for layer_state in per_layer], body, carry, xs)

    def step(c, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return jax.lax.scan(step, carry, (state, xs), unroll=True if "unroll-layers" in gpu_kernels() else 1)


def _layer_by_layer(layers: list, body: Callable, carry, xs):
    """scan_layers' result with the loop written out: `xs` sliced per layer, `ys` stacked."""
    ys = []
    for i, layer in enumerate(layers):
        x = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)
        carry, y = body(layer, carry, x)
        ys.append(y)
    return carry, None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
