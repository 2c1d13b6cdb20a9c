"""Image sizes from their headers, before any image is decoded.

A few KB of PNG or JPEG can declare a gigapixel: decoding it takes gigabytes. Pillow's
`Image.open` reads only the header (size and mode), so every image of an ImageFolder upload is
measured that way against a per-image pixel cap and against the dataset limit for all of them
decoded together. Pillow only: the web process runs this at upload, the worker before decoding.
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from optimization.base import InvalidInputError

MAX_IMAGE_PIXELS = 50_000_000  # 50 MP: larger than any camera image a classifier is trained on


def image_size(stream, label: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int, int]:
    """(width, height, bands) of the image in `stream`, from its header alone; raises
    InvalidInputError naming `label` when it is not an image or has more than `max_pixels`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our cap is lower
            with Image.open(stream) as image:  # lazy: reads the header, decodes nothing
                width, height, bands = *image.size, len(image.getbands())
    except Image.DecompressionBombError:  # Pillow's own cap, far above ours, refuses even the header
        raise _too_large(label, f"over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels", max_pixels) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise InvalidInputError(f"{label} is not a readable image ({type(error).__name__}); "
                                "use PNG, JPEG, BMP, GIF or WebP files") from None
    if width * height > max_pixels:
        raise _too_large(label, f"{width}x{height} pixels", max_pixels)
    return width, height, bands


def _too_large(label: str, declared: str, max_pixels: int) -> InvalidInputError:
    return InvalidInputError(
        f"{label} declares {declared}; at most {max_pixels / 1e6:.0f} megapixels per image are accepted: "
        "resize the images (e.g. to the model's input size) before zipping them")


def check_zipped_images(zip_path: Path, names: list[str], label: str, max_decoded_bytes: int,
                        max_pixels: int = MAX_IMAGE_PIXELS) -> int:
    """Measure every image `names` lists inside `zip_path` from its header; return the bytes
    they take decoded (8 bits per band), refusing more than `max_decoded_bytes` in all."""
    total = 0
    with zipfile.ZipFile(zip_path) as archive:
        for name in names:
            with archive.open(name) as stream:
                width, height, bands = image_size(stream, f"{label}: {PurePosixPath(name).as_posix()!r}", max_pixels)
            total += width * height * bands
    if total > max_decoded_bytes:
        raise InvalidInputError(
            f"{label} decodes to {total / 2**20:.0f} MiB of pixels; at most {max_decoded_bytes / 2**20:.0f} MiB "
            "are accepted (EDGEOPT_MAX_DATASET_MB): use fewer or smaller images")
    return total
