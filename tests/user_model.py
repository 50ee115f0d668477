"""A model from outside the project, as a user writes one: a two-layer MLP classifier.

Nothing here is capibara-export's code beyond the interface (modelapi): the test builds,
exports and verifies it with `--model-module tests.user_model:FAMILY` (docs/models.md walks
through it). Its parameters carry logical names the shipped plans map (embed, mlp) and one of
its own (`classes`), which plans may name because the family declares it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from modelapi.axes import BATCH, EMBED, MLP, constrain, tower
from modelapi.family import Entry, ModelFamily, Program, ProgramOptions
from modelapi.quant import materialize

CLASSES = "classes"


@dataclass(frozen=True)
class MlpConfig:
    features: int = 64
    hidden: int = 128
    classes: int = 16
    name: str = "mlp-tiny"

    def to_dict(self) -> dict:
        return asdict(self)


def abstract_params(cfg: MlpConfig) -> dict:
    f32 = jnp.float32
    return {"mlp": {"w1": jax.ShapeDtypeStruct((cfg.features, cfg.hidden), f32),
                    "b1": jax.ShapeDtypeStruct((cfg.hidden,), f32),
                    "w2": jax.ShapeDtypeStruct((cfg.hidden, cfg.classes), f32),
                    "b2": jax.ShapeDtypeStruct((cfg.classes,), f32)}}


def logical_names(cfg: MlpConfig) -> dict:
    return {"mlp": {"w1": (EMBED, MLP), "b1": (MLP,), "w2": (MLP, CLASSES), "b2": (CLASSES,)}}


def init_params(cfg: MlpConfig, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(cfg))


def classify(params: dict, x: jax.Array, dtype) -> jax.Array:
    p = params["mlp"]
    with tower("mlp"):
        h = jax.nn.relu(x.astype(dtype) @ materialize(p["w1"], dtype) + materialize(p["b1"], dtype))
        h = constrain(h, (BATCH, MLP))
        logits = h @ materialize(p["w2"], dtype) + materialize(p["b2"], dtype)
        return constrain(logits.astype(jnp.float32), (BATCH, CLASSES))


def build(cfg: MlpConfig, entry: str, policy, batch: int, options: ProgramOptions, params) -> Program:
    x = jax.ShapeDtypeStruct((batch, cfg.features), jnp.float32)
    flops = 2 * batch * (cfg.features * cfg.hidden + cfg.hidden * cfg.classes)
    return Program(entry, lambda p, x: classify(p, x, policy.compute), (params, x), ("params", (BATCH, None)),
                   (BATCH, CLASSES), axis_sizes={"embed": {cfg.features}, "mlp": {cfg.hidden},
                                                 "classes": {cfg.classes}, "batch": {batch}},
                   analytic_flops=flops)


FAMILY = ModelFamily(
    name="mlp",
    description="a test's two-layer MLP classifier",
    config_type=MlpConfig,
    presets={"mlp-tiny": MlpConfig()},
    entries=(Entry("classify", ("features",), "logits"),),
    config_from_dict=lambda d: MlpConfig(**d),
    abstract_params=abstract_params,
    logical_names=logical_names,
    build=build,
    axis_sizes=lambda cfg: {"embed": {cfg.features}, "mlp": {cfg.hidden}, "classes": {cfg.classes}},
    example_inputs=lambda cfg, entry, inputs, rng: (rng.normal(size=inputs[0].shape).astype(np.float32),),
    scopes=("mlp",),
    logical_axes=(CLASSES,),
    precisions=("fp32", "bf16"),
    init_params=init_params,
)
