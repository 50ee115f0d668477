"""`caption_text`: encoded images (JPEG, PNG, any format PIL reads) and an optional text prompt
per row in, the caption's text and token ids out; on process 0, with the bundle's own processor.

It is a front for the `caption` model, not a program of its own: each request is decoded and
preprocessed exactly as `analyze` does it (the same image limits, semiotic/images.py; the same
BLIP image processor and tokenizer, from the bundle's processor/), its prompt LEFT-padded to
the compiled prompt length with a prompt mask, and queued as `caption` rows, so it shares
caption's batches with tensor requests. Left, because padding before the prompt leaves every
real token's position (the mask's cumulative sum) and the column the first new token is read
from (the last) as they are for the prompt alone: the text equals `analyze`'s for the same
image and prompt (tested). Right padding is transformers' `generate` convention for a padded
batch, and there a shorter row's first new token is read from a padding column, so it decodes
differently from the same prompt unpadded (in transformers too). Why a model of its own rather than a second input set
of `caption`: KServe v2 metadata describes one signature per model, and a client that checks
metadata (tritonclient, KServe's transformers) would never see the other; Triton serves the
same thing as an ensemble of a preprocessing model and the main one.

    inputs   image   BYTES [-1]          one encoded image per row
             prompt  BYTES [-1]          optional: UTF-8 text each caption starts with ("" = none)
    outputs  text    BYTES [-1]          UTF-8, special tokens dropped (as `analyze` prints it)
             token_ids INT32 [-1, P+N]   the prompt (padded) and the new tokens
"""

from __future__ import annotations

import numpy as np

from ..export.loading import OpenedBundle
from .batcher import BadRequest
from .models import ModelSpec, TensorSpec

NAME = "caption_text"


class CaptionText:
    def __init__(self, caption: ModelSpec, preprocessor, pad_token_id: int):
        self.caption, self.preprocessor, self.pad = caption, preprocessor, pad_token_id
        shapes = {t.name: t.row_shape for t in caption.inputs}
        self.prompt_len = shapes["prompt_ids"][0]
        self.image_size = shapes["pixel_values"]
        out = {t.name: t for t in caption.outputs}["token_ids"]
        self.spec = ModelSpec(NAME, caption.entry, caption.precision,
                              (TensorSpec("image", "bytes", ()), TensorSpec("prompt", "bytes", ())),
                              (TensorSpec("text", "bytes", ()), out), caption.batch_sizes, (),
                              optional_inputs=("prompt",), view_of=caption.name)

    def prepare(self, inputs: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """The caption model's rows for these images and prompts; one line naming the first
        row that cannot be read."""
        from ..semiotic.images import ImageError, load_image

        images = []
        for i, data in enumerate(inputs["image"]):
            try:
                images.append(load_image(bytes(data)).image)
            except ImageError as err:
                raise BadRequest(f"image of row {i}: {' '.join(str(err).split())}") from None
        pixels = self.preprocessor.images(images)
        if pixels.shape[1:] != self.image_size:
            raise BadRequest(f"the processor gives images of {list(pixels.shape[1:])}; caption takes "
                             f"{list(self.image_size)}: the bundle's processor does not match its programs")
        prompts = inputs.get("prompt")
        ids = np.full((rows, self.prompt_len), self.pad, np.int32)
        mask = np.zeros((rows, self.prompt_len), np.int32)
        for i in range(rows):
            text = None
            if prompts is not None:
                try:
                    text = bytes(prompts[i]).decode("utf-8") or None
                except UnicodeDecodeError:
                    raise BadRequest(f"prompt of row {i} is not UTF-8 text") from None
            row = np.asarray(self.preprocessor.prompt(text), np.int32)
            if len(row) > self.prompt_len:
                raise BadRequest(f"prompt of row {i} is {len(row)} tokens with [BOS]; this bundle's caption takes at "
                                 f"most {self.prompt_len} (build --prompt-len)")
            ids[i, self.prompt_len - len(row):], mask[i, self.prompt_len - len(row):] = row, 1   # left-padded
        return {"pixel_values": pixels, "prompt_ids": ids, "prompt_mask": mask}

    def finish(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = outputs["token_ids"]
        text = np.array([self.preprocessor.decode(row).encode("utf-8") for row in ids], dtype=object)
        return {"text": text, "token_ids": ids}


def open_view(opened: OpenedBundle, models: list[ModelSpec]) -> tuple[CaptionText | None, str | None]:
    """The caption_text front where the bundle has a caption model with a prompt mask and a
    processor; otherwise None and why not."""
    caption = next((m for m in models if m.entry == "caption"), None)
    if caption is None:
        return None, None
    if {t.name for t in caption.inputs} != {"pixel_values", "prompt_ids", "prompt_mask"}:
        return None, f"{NAME}: not served: this bundle's caption program has no prompt mask (re-export it)"
    processor = next((a for a in opened.manifest["artifacts"] if a["kind"] == "processor"), None)
    if processor is None:
        return None, f"{NAME}: not served: the bundle has no processor/"
    from .. import families

    family = families.for_record(opened.manifest["model"])
    if family.open_processor is None:
        return None, f"{NAME}: not served: model {family.name} has no processor"
    config = family.config_from_dict(opened.manifest["model"]["config"])
    preprocessor = family.open_processor(opened.path(processor), config)
    return CaptionText(caption, preprocessor, config.text.pad_token_id), None
