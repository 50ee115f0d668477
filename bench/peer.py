"""The peer: Hugging Face transformers BLIP on PyTorch, eager, on the same config, inputs and device.

The peer's random weights are converted into ours (model.hf), so both sides compute the
same function and the fp32 captions can be compared token for token.
"""

from __future__ import annotations

import functools

import numpy as np

from model import get_preset
from model.hf import params_from_hf_tensors


def available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=4)
def hf_model(model: str):
    import torch
    from transformers import BlipConfig as HFBlipConfig
    from transformers import BlipForConditionalGeneration

    cfg = get_preset(model).with_towers("caption")
    d = cfg.to_hf_dict()
    torch.manual_seed(0)
    hf = BlipForConditionalGeneration(HFBlipConfig(text_config=d["text_config"], vision_config=d["vision_config"]))
    hf.eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device)
    our_params_from(model, hf)
    return hf, device


_FLOAT_WEIGHTS: dict[str, dict] = {}


def our_params_from(model: str, hf) -> None:
    _FLOAT_WEIGHTS[model] = {k: v.detach().float().cpu().numpy() for k, v in hf.state_dict().items()}


@functools.lru_cache(maxsize=4)
def our_params(model: str) -> dict:
    """The peer's weights in our layout (caption tower), read once while they are still f32
    (the peer's bf16 runs convert its modules in place)."""
    hf_model(model)
    return params_from_hf_tensors(get_preset(model).with_towers("caption"), _FLOAT_WEIGHTS[model])


def _timed_call(model: str, pixels: np.ndarray, precision: str, forward):
    """A callable running `forward(net, pixels)` without gradients, synchronised on GPU."""
    import torch

    hf, device = hf_model(model)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    net = hf.to(dtype)
    px = torch.from_numpy(np.array(pixels)).to(device=device, dtype=dtype)

    def run():
        with torch.no_grad():
            out = forward(net, px)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run


def caption_fn(model: str, pixels: np.ndarray, precision: str, new_tokens: int):
    """Greedy generate with exactly `new_tokens` new tokens."""
    return _timed_call(model, pixels, precision, lambda net, px: net.generate(
        pixel_values=px, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1))


def vision_fn(model: str, pixels: np.ndarray, precision: str):
    return _timed_call(model, pixels, precision, lambda net, px: net.vision_model(pixel_values=px).last_hidden_state)
