"""Image and text preprocessing through transformers' own BLIP processor pieces.

Images go through `BlipImageProcessorPil` (bicubic resize, /255, CLIP mean/std, NCHW) and
text through the checkpoint's tokenizer; nothing here re-implements either. The one thing
written by hand is a synthetic WordPiece vocabulary for random-weight models and tests,
because no real BERT vocabulary can be downloaded on the build machines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, BertTokenizer
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from .config import BlipConfig, TextConfig
from .errors import UserError
from .generate import caption_prompt

# A few hundred everyday words so synthetic captions read as words, not [unusedN].
_WORDS = """a an the of on in with and at by picture image photo painting scene view near under over
two three man woman child dog cat bird
horse car bus train boat plane bicycle street road city building house room table chair bed window
door tree grass field beach sea water sky mountain snow sun cloud light red blue green yellow white
black brown orange pink grey portrait landscape sculpture photograph drawing icon symbol
mask crown cross flower fruit bread wine book letter sword shield angel saint king queen god
goddess ruin temple church market crowd festival dance music night day morning evening shadow
sitting standing walking running holding looking wearing riding playing eating reading smiling
old young small large dark bright empty full broken golden ancient modern abstract classical
baroque gothic impressionist cubist surrealist religious mythological allegory still life
close up group pair top front back left right""".split()


def synthetic_vocab(text: TextConfig) -> list[str]:
    """A BERT-style vocabulary of exactly text.vocab_size entries with [PAD], [SEP] and the
    BOS token [DEC] at the config's ids; [CLS], [UNK], [MASK] and [ENC] take the next free ids."""
    vocab: list[str | None] = [None] * text.vocab_size
    vocab[text.pad_token_id], vocab[text.sep_token_id], vocab[text.bos_token_id] = "[PAD]", "[SEP]", "[DEC]"
    for special in ("[UNK]", "[CLS]", "[MASK]", "[ENC]"):
        preferred = {"[UNK]": 100, "[CLS]": 101, "[MASK]": 103, "[ENC]": text.bos_token_id + 1}.get(special)
        if preferred is not None and preferred < text.vocab_size and vocab[preferred] is None:
            vocab[preferred] = special
        else:
            vocab[next(i for i, v in enumerate(vocab) if v is None)] = special
    words = iter(dict.fromkeys(_WORDS))
    for i, v in enumerate(vocab):
        if v is None:
            vocab[i] = next(words, f"[unused{i}]")
    return vocab  # type: ignore[return-value]


def write_synthetic_processor(folder: str | Path, config: BlipConfig) -> None:
    """Save a tokenizer and image processor matching `config` into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = synthetic_vocab(config.text)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]",
                              additional_special_tokens=["[ENC]"], model_max_length=config.text.max_positions)
    tokenizer.save_pretrained(folder)
    size = config.vision.image_size
    BlipImageProcessorPil(size={"height": size, "width": size}).save_pretrained(folder)


class ProcessorError(UserError):
    pass


class Preprocessor:
    """Images → pixel_values, texts → (input_ids, attention_mask), ids → text."""

    def __init__(self, image_processor: BlipImageProcessorPil, tokenizer, config: BlipConfig):
        size = image_processor.size
        expected = config.vision.image_size
        if (size.get("height"), size.get("width")) != (expected, expected):
            raise ProcessorError(f"image processor resizes to {size}, but the model expects {expected}x{expected}")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_folder(cls, folder: str | Path, config: BlipConfig) -> Preprocessor:
        folder = Path(folder)
        if not (folder / "tokenizer_config.json").is_file():
            raise ProcessorError(f"{folder}: no tokenizer_config.json; the checkpoint folder must include "
                                 "its tokenizer (save the HF processor with it)")
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if (folder / "preprocessor_config.json").is_file() or (folder / "processor_config.json").is_file():
            image_processor = BlipImageProcessorPil.from_pretrained(str(folder))
        else:
            size = config.vision.image_size
            image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
        return cls(image_processor, tokenizer, config)

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 3, H, W) float32; grayscale, RGBA and palette images are converted to RGB."""
        out = self.image_processor(images=list(images), return_tensors="np")["pixel_values"]
        return np.asarray(out, np.float32)

    def texts(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="np", return_token_type_ids=False)
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

    def prompt(self, text: str | None) -> np.ndarray:
        """Decoder prompt ids as BlipForConditionalGeneration.generate builds them."""
        ids = self.tokenizer(text)["input_ids"] if text else None
        return caption_prompt(self.config.text, ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()
