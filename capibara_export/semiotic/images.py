"""Reading images: paths, bytes or PIL images in; RGB PIL images and a content hash out.

A corrupt file or a non-image raises ImageError (the pipeline turns it into a per-image
error); grayscale, palette, RGBA and tiny images are converted by the BLIP image
processor.

Bounded resources (docs/reliability.md): the model sees 384x384 pixels, so an image is
refused before decoding when its header says more than `limits.max_pixels` (100 MP by
default: every common camera and a 10,000 x 10,000 scan fit; a 17,000 x 17,000 PNG, 4.6 GB
decoded, does not), when its file is over `limits.max_file_bytes` (256 MiB), or when the path is not a
regular file (a device or FIFO would be read forever). `analyze --max-pixels` raises it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError


@dataclass
class Limits:
    max_pixels: int = 100_000_000
    max_file_bytes: int = 256 * 2 ** 20


limits = Limits()
Image.MAX_IMAGE_PIXELS = None  # our own check below runs before decoding, with a clearer message

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
            if not path.is_file():
                raise ImageError(f"{path}: not a regular file" if path.exists() else f"{path}: no such file")
            size = path.stat().st_size
            if size > limits.max_file_bytes:
                raise ImageError(f"{path}: {size / 2 ** 20:.0f} MiB; images are read up to "
                                 f"{limits.max_file_bytes / 2 ** 20:.0f} MiB")
            data = path.read_bytes()
        except OSError as err:
            raise ImageError(f"{path}: cannot read ({err.strerror})") from None
        source = str(path)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # from the header: nothing decoded yet
        if width * height > limits.max_pixels:
            raise ImageError(f"{source}: {width}x{height} = {width * height / 1e6:.0f} MP is over the "
                             f"{limits.max_pixels / 1e6:.0f} MP pixel budget (the model sees "
                             "384x384); pass --max-pixels to raise it")
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ImageError(f"{source}: not an image PIL can read ({type(err).__name__})") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt image data
        raise ImageError(f"{source}: corrupt image ({err})") from None
    return LoadedImage(hashlib.sha256(data).hexdigest(), image, source)
