"""The model's exact GELU: torch's erf form where XLA compiles it here, the erfc form in
artifacts another runtime deserializes (TensorFlow 2.21 cannot read the `chlo.erf`
composite JAX 0.10.2 serializes)."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import erf

from model import portable_kernels
from model.layers import gelu


def _reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def test_gelu_is_exact_in_both_forms():
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 96), jnp.float32) * 3
    fast = np.asarray(jax.jit(gelu)(x))
    with portable_kernels():   # a new function object: jax.jit would reuse gelu's trace from above
        portable = np.asarray(jax.jit(lambda v: gelu(v))(x))
    np.testing.assert_allclose(fast, _reference(np.asarray(x)), atol=2e-6, rtol=0)
    np.testing.assert_allclose(portable, _reference(np.asarray(x)), atol=2e-6, rtol=0)
    np.testing.assert_array_equal(portable, np.asarray(jax.nn.gelu(x, approximate=False)))
    assert jax.jit(gelu)(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16   # no promotion to f32


def test_compiled_programs_take_the_erf_form_and_portable_ones_serialize_without_composites():
    """Compiled here: torch's erf form (the faster kernel on XLA:CPU). Serialized for another
    runtime (a SavedModel's XlaCallModule): plain StableHLO, no composite op."""
    x = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    compiled_here = jax.jit(gelu).lower(x).as_text()
    assert "chlo.erf" in compiled_here and "erfc" not in compiled_here
    with portable_kernels():
        text = jax.export.export(jax.jit(lambda v: gelu(v)))(x).mlir_module()
    ops = [line for line in text.splitlines() if not line.startswith("#loc")]
    assert not [line for line in ops if "composite" in line]
    assert "chlo.erf" not in text
