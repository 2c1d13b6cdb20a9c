"""Images are measured from their headers before anything decodes them, at the upload and
again in the worker."""
from __future__ import annotations

import io
import zipfile

import pytest
from PIL import Image

from optimization.base import InvalidInputError
from optimization.datasets import load_dataset
from optimization.safety.images import image_size
from tests.conftest import png_header_only


def png(width, height, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_size_comes_from_the_header_alone():
    assert image_size(io.BytesIO(png(7, 5)), "a.png") == (7, 5, 3)
    assert image_size(io.BytesIO(png_header_only(9_000, 5_000)), "big.png") == (9_000, 5_000, 1)


def test_an_image_over_the_pixel_cap_is_refused_by_name():
    with pytest.raises(InvalidInputError, match="'x.png' declares 8000x8000 pixels; at most 50 megapixels"):
        image_size(io.BytesIO(png_header_only(8_000, 8_000)), "'x.png'")


def test_the_worker_refuses_the_same_image_before_decoding_it(tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("cats/0.png", png(8, 8))
        out.writestr("dogs/0.png", png(8, 8))
        out.writestr("dogs/huge.png", png_header_only(20_000, 20_000))

    with pytest.raises(InvalidInputError, match="huge.png in class 'dogs' declares over 179 megapixels; at most 50"):
        load_dataset(archive, "custom", "NCHW")
