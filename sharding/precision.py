"""Precision policies as data, and turning float parameters into a policy's storage form.

- fp32:         f32 parameters, f32 compute (TPU matmuls at DEFAULT precision: one bf16 pass).
- bf16-mixed:   f32 parameters cast to bf16 where each layer uses them (the seed's TPUConfig).
- bf16:         bf16 parameters and compute.
- int8-weights: matmul kernels and embedding tables stored int8 with one f32 scale per
                output channel, dequantised to bf16 inside the layer scan; other
                parameters (norms, biases) bf16; bf16 compute. Serving only.

Which axes a weight contracts over is read from its logical names, the one place that rule lives:
a kernel contracts over its first axis after `layers`, or over (heads, head_dim) for
attention output kernels; a (vocab, embed) table contracts over embed because the tied LM
head does.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from modelapi.axes import is_names
from modelapi.errors import UserError
from modelapi.quant import QArray, quantize


@dataclass(frozen=True)
class PrecisionPolicy:
    """A precision policy: the dtypes parameters are stored in, computed in and returned in,
    and whether weights are stored as int8 with per-channel scales."""
    name: str
    param_dtype: str
    compute_dtype: str
    output_dtype: str
    int8_weights: bool = False
    trainable: bool = True
    description: str = ""

    @property
    def compute(self):
        """The compute dtype."""
        return jnp.dtype(self.compute_dtype)

    @property
    def params(self):
        """The stored parameters' dtype (int8 weights: the dtype of the rest)."""
        return jnp.dtype(self.param_dtype)


POLICIES: dict[str, PrecisionPolicy] = {p.name: p for p in (
    PrecisionPolicy("fp32", "float32", "float32", "float32", description="f32 parameters and compute"),
    PrecisionPolicy("bf16-mixed", "float32", "bfloat16", "float32",
                    description="f32 parameters, bf16 compute (the seed's TPUConfig)"),
    PrecisionPolicy("bf16", "bfloat16", "bfloat16", "float32", description="bf16 parameters and compute"),
    PrecisionPolicy("int8-weights", "bfloat16", "bfloat16", "float32", int8_weights=True, trainable=False,
                    description="int8 weights with per-channel scales, dequantised in the matmul; bf16 compute"),
)}

DEFAULT_PRECISIONS = ("fp32", "bf16-mixed", "bf16")


class PrecisionError(UserError):
    pass


def get_policy(name: str) -> PrecisionPolicy:
    try:
        return POLICIES[name]
    except KeyError:
        raise PrecisionError(f"unknown precision {name!r}; choose from {', '.join(POLICIES)}") from None


def contracting_axes(names: tuple[str | None, ...]) -> tuple[int, ...] | None:
    """Axes a weight's int8 scale is reduced over, or None if the weight stays in float."""
    offset = 1 if names and names[0] == "layers" else 0
    body = names[offset:]
    if len(body) < 2:
        return None  # biases, norm scales, the class token
    if body[:2] == ("heads", "head_dim"):
        return (offset, offset + 1)
    if body[0] == "vocab":
        return (offset + 1,)
    return (offset,)


def _is_quantized(names) -> bool:
    return contracting_axes(names) is not None


def store(params: dict, names: dict, policy: PrecisionPolicy) -> dict:
    """Float parameters in the policy's storage form (QArrays for int8 weights)."""
    def convert(p, n):
        if policy.int8_weights and _is_quantized(n):
            return quantize(jnp.asarray(p), contracting_axes(n))
        return jnp.asarray(p, policy.params)
    return jax.tree.map(convert, params, names, is_leaf=is_names)


def abstract_store(abstract: dict, names: dict, policy: PrecisionPolicy) -> dict:
    """ShapeDtypeStructs of the policy's storage form, without touching any values."""
    def convert(s, n):
        if policy.int8_weights and _is_quantized(n):
            axes = contracting_axes(n)
            scale_shape = tuple(1 if i in axes else d for i, d in enumerate(s.shape))
            return QArray(jax.ShapeDtypeStruct(s.shape, jnp.int8), jax.ShapeDtypeStruct(scale_shape, jnp.float32))
        return jax.ShapeDtypeStruct(s.shape, policy.params)
    return jax.tree.map(convert, abstract, names, is_leaf=is_names)


def storage_specs(specs: dict, names: dict, policy: PrecisionPolicy) -> dict:
    """PartitionSpecs for the storage form: an int8 scale is sharded like its weight except
    on the contracted (size-1) axes."""
    def convert(spec, n):
        if policy.int8_weights and _is_quantized(n):
            axes = contracting_axes(n)
            full = tuple(spec) + (None,) * (len(n) - len(spec))
            return QArray(spec, PartitionSpec(*(None if i in axes else s for i, s in enumerate(full))))
        return spec
    return jax.tree.map(convert, specs, names, is_leaf=lambda x: isinstance(x, PartitionSpec))
