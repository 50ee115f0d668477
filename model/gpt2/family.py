"""GPT-2 as a model family (modelapi.family): a decoder-only language model with a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from modelapi.family import Entry, ModelFamily

from ..tie_checks import judge_divergences
from .config import PRESETS, Gpt2Config
from .hf import checkpoint_config, load_checkpoint
from .model import SCOPE
from .programs import BATCH_AXES, ENTRIES, INPUTS, OUTPUTS, build_program, example_inputs
from .state import abstract_params, bind, init_params, logical_names


def tie_check(cfg: Gpt2Config, options, entry: str, params: dict, inputs: tuple, tolerance: float):
    """generate: rows whose first differing token was a near tie of the reference's f32 logits
    (within `tolerance`, scaled by their magnitude); None for the other entries (exact)."""
    if entry != "generate":
        return None
    prompt, mask = (np.asarray(x) for x in inputs)
    p = prompt.shape[1]

    def check(got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
        rows = np.nonzero((got != want).any(axis=1))[0]
        firsts = [int(np.argmax(got[r] != want[r])) for r in rows]
        if any(k < p for k in firsts):
            return False, "a row differs in its prompt"
        full_mask = np.concatenate([mask[rows], np.ones((len(rows), want.shape[1] - p), mask.dtype)], axis=1)
        logits = np.asarray(jax.jit(lambda q, ids, m: bind(cfg, q, jnp.float32).logits(ids, m))(
            params, want[rows], full_mask))
        return judge_divergences(rows, firsts, logits, got, want, tolerance)
    return check


FAMILY = ModelFamily(
    name="gpt2",
    description="serving teams running a GPT-2 language model (decoder-only: prefill, decode steps, greedy "
                "generation)",
    config_type=Gpt2Config,
    presets=PRESETS,
    entries=tuple(Entry(e, INPUTS[e], OUTPUTS[e], BATCH_AXES.get(e, ()), tf_signature=e == "generate")
                  for e in ENTRIES),
    config_from_dict=Gpt2Config.from_dict,
    abstract_params=abstract_params,
    logical_names=logical_names,
    build=build_program,
    axis_sizes=lambda cfg: cfg.axis_sizes(),
    example_inputs=example_inputs,
    scopes=(SCOPE,),
    init_params=init_params,
    checkpoint_config=checkpoint_config,
    load_checkpoint=load_checkpoint,
    default_signature="generate",
    tie_check=tie_check,
)
