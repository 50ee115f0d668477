"""Reading images: paths, bytes or PIL images in; RGB PIL images and a content hash out.

A corrupt file or a non-image raises ImageError (the pipeline turns it into a per-image
error); grayscale, palette, RGBA and tiny images are converted by the BLIP image
processor. Very large images are decoded up to MAX_PIXELS (PIL's decompression-bomb
guard, raised from its 89 MP default so a 10000x10000 photograph is accepted).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 150_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

ImageInput = Union[str, Path, bytes, Image.Image, "LoadedImage"]


class ImageError(ValueError):
    """An input that is not a readable image."""


@dataclass
class LoadedImage:
    key: str            # sha256 of the content: the embedding cache's key
    image: Image.Image
    source: str


def load_image(item: ImageInput) -> LoadedImage:
    if isinstance(item, LoadedImage):
        return item
    if isinstance(item, Image.Image):
        digest = hashlib.sha256(f"{item.mode}{item.size}".encode() + item.tobytes()).hexdigest()
        return LoadedImage(digest, item, "<PIL image>")
    if isinstance(item, (bytes, bytearray)):
        data, source = bytes(item), "<bytes>"
    else:
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ImageError(f"{path}: cannot read ({err.strerror})") from None
        source = str(path)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageError(f"{source}: not an image PIL can read ({type(err).__name__})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise ImageError(f"{source}: corrupt image ({err})") from None
    return LoadedImage(hashlib.sha256(data).hexdigest(), image, source)
