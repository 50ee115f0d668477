"""The reference side of parity: random Hugging Face BLIP models on PyTorch (CPU, fp32).

Used live by the parity tests when torch is installed, and by `python -m tests.make_fixtures`
to write tests/fixtures/parity_tiny.npz so parity also runs where torch is absent.
Every weight is randomised, layer-norm scales and biases and the LM-head bias included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import BlipConfig as HFBlipConfig
from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

from model import BlipConfig

SEED = 1234
NEW_TOKENS = 12
# Raising the [SEP] logit bias makes some rows finish early, so the done-mask path is
# exercised; the fixture maker checks that at least one row stops and one does not.
SEP_BIAS = 0.4


def hf_config(cfg: BlipConfig, tower: str) -> HFBlipConfig:
    d = cfg.with_towers(tower).to_hf_dict()
    return HFBlipConfig(text_config=d["text_config"], vision_config=d["vision_config"],
                        image_text_hidden_size=d["image_text_hidden_size"])


def random_hf_model(cfg: BlipConfig, tower: str, seed: int = SEED):
    torch.manual_seed(seed)
    cls = BlipForConditionalGeneration if tower == "caption" else BlipForImageTextRetrieval
    model = cls(hf_config(cfg, tower)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = name.endswith("weight") and ("LayerNorm" in name or "layer_norm" in name
                                                         or "post_layernorm" in name)
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if is_norm_scale else 0.05 * torch.randn_like(p))
        if tower == "caption":
            model.text_decoder.cls.predictions.bias[cfg.text.sep_token_id] += SEP_BIAS
    return model


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The state dict as a safetensors file would hold it (tied copies included)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def save_checkpoint(model, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def inputs(cfg: BlipConfig, batch: int = 3, seq: int = 7, seed: int = SEED) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v, t = cfg.vision, cfg.text
    pixels = rng.normal(size=(batch, v.channels, v.image_size, v.image_size)).astype(np.float32)
    special = {t.pad_token_id, t.sep_token_id, t.bos_token_id}
    words = np.array([i for i in range(t.vocab_size) if i not in special])
    ids = rng.choice(words, size=(batch, seq)).astype(np.int32)
    lengths = np.array([seq, seq - 2, seq - 4])[:batch]
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids[:, 0] = t.bos_token_id
    ids = np.where(mask == 1, ids, t.pad_token_id).astype(np.int32)
    # A tokenizer-style prompt "[CLS] w w w [SEP]"; generate() swaps [CLS] for BOS and drops [SEP].
    prompt = np.concatenate([[t.bos_token_id], ids[0, 1:4], [t.sep_token_id]]).astype(np.int32)
    return {"pixels": pixels, "ids": ids, "mask": mask, "prompt": prompt}


@torch.no_grad()
def caption_outputs(model, x: dict[str, np.ndarray], new_tokens: int = NEW_TOKENS) -> dict[str, np.ndarray]:
    px = torch.from_numpy(x["pixels"])
    ids, mask = torch.from_numpy(x["ids"]).long(), torch.from_numpy(x["mask"]).long()
    batch = px.shape[0]
    gen = dict(max_new_tokens=new_tokens, do_sample=False, num_beams=1)
    plain = model.generate(pixel_values=px, **gen)
    prompt = torch.from_numpy(x["prompt"]).long()[None].repeat(batch, 1)
    prompted = model.generate(pixel_values=px, input_ids=prompt, **gen)
    # Right-padded decoder prompts of lengths 6, 5, 3 (BOS first): generate() drops its inputs'
    # last column (meant for [SEP]), so one extra column is appended for it to drop.
    padded_ids, padded_mask = padded_prompts(x)
    extra = torch.zeros((batch, 1), dtype=torch.long)
    padded = model.generate(pixel_values=px, input_ids=torch.cat([torch.from_numpy(padded_ids).long(), extra], 1),
                            attention_mask=torch.cat([torch.from_numpy(padded_mask).long(), extra + 1], 1), **gen)
    return {
        "vision": model.vision_model(pixel_values=px).last_hidden_state.numpy(),
        "logits": model(pixel_values=px, input_ids=ids, attention_mask=mask).logits.numpy(),
        "generate": plain.numpy().astype(np.int32),
        "generate_prompt": prompted.numpy().astype(np.int32),
        "generate_padded": padded.numpy().astype(np.int32),
    }


def padded_prompts(x: dict[str, np.ndarray], length: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Decoder prompts of different lengths in one batch: BOS-first, right-padded, with mask."""
    return x["ids"][:, :length].copy(), x["mask"][:, :length].copy()


@torch.no_grad()
def retrieval_outputs(model, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    px = torch.from_numpy(x["pixels"])
    ids, mask = torch.from_numpy(x["ids"]).long(), torch.from_numpy(x["mask"]).long()
    itm = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True).itm_score
    itc = model(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
    return {"itm": itm.numpy(), "itc": itc.numpy()}
