"""Loading Hugging Face GPT-2 checkpoints (GPT2LMHeadModel, safetensors) from a local folder.

transformers' Conv1D stores every dense weight inputs-first, (in, out), which is this
model's in-out layout: the fused attention projection (d, 3d) is read as (d, 3, heads,
head_dim), the output projection (d, d) as (heads, head_dim, d). Checkpoints saved by
GPT2LMHeadModel name tensors `transformer.h.0...`; the original OpenAI uploads drop the
`transformer.` prefix; both are read. The LM head is tied to the token embeddings.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from ..hf import CheckpointError, check_shapes, read_checkpoint_config, read_safetensors
from .config import Gpt2Config
from .model import SCOPE
from .state import abstract_params


def checkpoint_config(folder: str | Path) -> Gpt2Config:
    """The config of a checkpoint folder, after checking the folder and its weights file exist."""
    return read_checkpoint_config(folder, Gpt2Config.from_hf)


def params_from_hf_tensors(cfg: Gpt2Config, tensors: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    used = set()

    def take(key: str) -> np.ndarray:
        name = prefix + key
        if name not in tensors:
            raise CheckpointError(f"{source}: missing tensor {name}")
        used.add(name)
        return np.asarray(tensors[name], np.float32)

    d, n, h, L = cfg.width, cfg.heads, cfg.head_dim, cfg.depth

    def stacked(key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        layers = [take(f"h.{i}.{key}") for i in range(L)]
        return np.stack([w.reshape(shape) if shape else w for w in layers])

    layers = {
        "ln_1": {"scale": stacked("ln_1.weight"), "bias": stacked("ln_1.bias")},
        "qkv": {"kernel": stacked("attn.c_attn.weight", (d, 3, n, h)), "bias": stacked("attn.c_attn.bias", (3, n, h))},
        "out": {"kernel": stacked("attn.c_proj.weight", (n, h, d)), "bias": stacked("attn.c_proj.bias")},
        "ln_2": {"scale": stacked("ln_2.weight"), "bias": stacked("ln_2.bias")},
        "fc": {"kernel": stacked("mlp.c_fc.weight"), "bias": stacked("mlp.c_fc.bias")},
        "proj": {"kernel": stacked("mlp.c_proj.weight"), "bias": stacked("mlp.c_proj.bias")},
    }
    params = {SCOPE: {"wte": take("wte.weight"), "wpe": take("wpe.weight"), "layers": layers,
                      "ln_f": {"scale": take("ln_f.weight"), "bias": take("ln_f.bias")}}}
    if "lm_head.weight" in tensors:
        used.add("lm_head.weight")
        if not np.array_equal(np.asarray(tensors["lm_head.weight"], np.float32), params[SCOPE]["wte"]):
            raise CheckpointError(f"{source}: lm_head.weight differs from the token embeddings; only a tied LM "
                                  "head (every GPT-2) is implemented")
    # buffers some versions save (the causal mask, masked_bias): not weights
    unused = sorted(k for k in tensors if k not in used and not k.endswith((".attn.bias", ".attn.masked_bias")))
    if unused:
        raise CheckpointError(f"{source}: tensors this GPT-2 layout does not have: {', '.join(unused[:6])}"
                              + (f" and {len(unused) - 6} more" if len(unused) > 6 else ""))
    return params


def load_checkpoint(folder: str | Path) -> tuple[Gpt2Config, dict]:
    """(config, float32 params) from a Hugging Face GPT-2 folder."""
    folder = Path(folder)
    cfg = checkpoint_config(folder)
    try:
        params = params_from_hf_tensors(cfg, read_safetensors(folder), source=str(folder))
    except ValueError as err:   # a reshape that does not fit: the config and the tensors disagree
        raise CheckpointError(f"{folder}: tensors disagree with config.json ({err})") from None
    check_shapes(params, abstract_params(cfg), str(folder))
    return cfg, jax.tree.map(np.asarray, params)
