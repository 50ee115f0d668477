"""TF SavedModel through jax2tf with native serialization (the StableHLO runs inside
tf.XlaCallModule): a signature per entry its family marks `tf_signature` (BLIP: caption,
encode_image and score), polymorphic batch, the
parameters as tf.Variables (so the file holds each weight once, not as graph constants),
and TF Serving warmup requests under assets.extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modelapi.family import ModelFamily

from ..matrix.serving import ServingFunction, example_inputs
from .stablehlo import PLATFORMS
from .warmup import write_warmup

DEFAULT = "serving_default"      # TF Serving's default signature key: the family's default signature, or the first
WARMUP = "assets.extra/tf_serving_warmup_requests"
VERSION = "1"   # saved_model/<precision>/1/: the <base path>/<version>/ TF Serving loads
_TF_DTYPES = {"float32": "float32", "int32": "int32", "bfloat16": "bfloat16", "int8": "int8"}


def _variable_name(key: str) -> str:
    return key.replace("/", "__").replace(".", "_")


def signature_entries(family: ModelFamily, entries) -> list[str]:
    """Which of `entries` become SavedModel signatures, the default signature's first."""
    chosen = [e for e in entries if family.entry(e).tf_signature]
    return sorted(chosen, key=lambda e: e != family.default_signature)


def _signature(module, keys: list[str], converted, serving: ServingFunction):
    """The function behind one signature: the variables as the flat params dict, then the inputs."""
    output_name = serving.signature.outputs if isinstance(serving.signature.outputs, str) else None

    def call(*args):
        out = converted({k: module.params[_variable_name(k)] for k in keys}, *args)
        return out if isinstance(out, dict) else {output_name: out}
    return call


def save(folder: Path, servings: dict[str, ServingFunction], flat_params: dict, model_name: str,
         batch_sizes=(1,)) -> list[dict]:
    """Write a SavedModel with one signature per entry in `servings` plus `serving_default`
    (caption, else the first), and TF Serving warmup requests for every signature at every
    batch size; returns the signatures as the manifest describes them. Traced with portable
    kernels: TensorFlow deserializes the StableHLO with its own, older StableHLO."""
    from ..families import for_config

    with for_config(next(iter(servings.values())).program.config).portable():
        return _save(folder, servings, flat_params, model_name, batch_sizes)


def _save(folder: Path, servings: dict[str, ServingFunction], flat_params: dict, model_name: str,
          batch_sizes) -> list[dict]:
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    keys = sorted(flat_params)
    module.params = {_variable_name(k): tf.Variable(np.asarray(flat_params[k]), trainable=False,
                                                    name=_variable_name(k)) for k in keys}
    signatures, warmup = {}, []
    for entry, serving in servings.items():
        _, *inputs = serving.abstract(1)
        names = serving.input_names
        converted = jax2tf.convert(serving.fn, native_serialization_platforms=PLATFORMS, with_gradient=False,
                                   polymorphic_shapes=[None] + ["(b, ...)"] * len(inputs))
        spec = [tf.TensorSpec([None, *s.shape[1:]], _TF_DTYPES[str(s.dtype)], name=n) for n, s in zip(names, inputs)]

        fn = tf.function(_signature(module, keys, converted, serving), input_signature=spec, autograph=False)
        setattr(module, entry, fn)
        signatures[entry] = fn.get_concrete_function()
    default = next(iter(signatures))       # signature_entries puts the family's default first
    signatures[DEFAULT] = signatures[default]
    for name in signatures:
        entry = default if name == DEFAULT else name
        # serving_default is the same function as its entry, already warmed at every batch
        # size: one batch-1 record checks the key without another copy of batch-32 pixels
        for batch in (1,) if name == DEFAULT else batch_sizes:
            warmup.append((name, dict(zip(servings[entry].input_names, example_inputs(servings[entry], batch)))))
    tf.saved_model.save(module, str(folder), signatures=signatures)
    write_warmup(folder, model_name, warmup)
    return [_describe_signature(name, fn, default if name == DEFAULT else name) for name, fn in signatures.items()]


def _describe_signature(name: str, concrete, entry: str) -> dict:
    def spec(key, t):
        return {"name": key, "shape": ["b" if d is None else int(d) for d in t.shape], "dtype": t.dtype.name}
    inputs = [spec(t.name, t) for t in concrete.structured_input_signature[1].values()] or \
        [spec(t.name, t) for t in concrete.structured_input_signature[0]]
    outputs = [spec(k, t) for k, t in sorted(concrete.structured_outputs.items())]
    return {"name": name, "entry": entry, "inputs": inputs, "outputs": outputs}


def load(folder: Path):
    """The SavedModel, loaded once for all its signatures (each load re-reads every variable
    and each first call compiles its XLA cluster again: verify ran three loads per bundle)."""
    import tensorflow as tf

    return tf.saved_model.load(str(folder))


def run(loaded, signature: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    outputs = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}
