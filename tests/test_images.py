"""lmms_prune.images.load_image: truncated files refused whatever PIL's global flag says, 16-bit and float
modes scaled (not clipped) to 8 bit, every failure an ImageLoadError naming the sample id."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from lmms_prune.images import ImageLoadError, load_image, to_rgb


def _jpeg(seed: int = 0, size: tuple[int, int] = (48, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def lmms_eval_truncation_flag():
    """PIL's flag as lmms-eval leaves it (``ImageFile.LOAD_TRUNCATED_IMAGES = True``), restored afterwards."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def test_truncated_jpeg_is_refused_under_lmms_eval_flag_and_the_flag_is_restored(lmms_eval_truncation_flag, tmp_path):
    data = _jpeg()
    half = data[: len(data) // 2]
    with Image.open(io.BytesIO(half)) as im:  # what lmms-eval's setting does: a padded picture, no error
        im.load()
    with pytest.raises(ImageLoadError, match="sample 'val_1/0'.*truncated"):
        load_image({"bytes": half, "path": "cut.jpg"}, "val_1/0")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    (tmp_path / "cut.jpg").write_bytes(half)
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_image(str(tmp_path / "cut.jpg"), 7)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    whole = load_image({"bytes": data, "path": "whole.jpg"}, "ok")
    assert whole.mode == "RGB" and whole.size == (64, 48)


@pytest.mark.parametrize("source", [{"bytes": b"", "path": "zero.jpg"}, b""])
def test_zero_byte_image_names_the_sample(source):
    with pytest.raises(ImageLoadError, match=r"sample 'z/0'.*empty \(0 bytes\)"):
        load_image(source, "z/0")


def test_zero_byte_and_missing_files(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(tmp_path / "zero.jpg", "a")
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(str(tmp_path / "absent.jpg"), "b")
    with pytest.raises(ImageLoadError, match="sample 'c'"):
        load_image(b"certainly not an image", "c")
    assert issubclass(ImageLoadError, ValueError)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=12, max_size=12))
def test_16_bit_png_is_scaled_to_8_bit(values):
    pixels = np.array(values, dtype=np.uint16).reshape(3, 4)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    loaded = np.asarray(load_image(_png(image), "s"))
    expected = np.rint(pixels / 257.0).astype(np.uint8)
    assert loaded.shape == (3, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(loaded[..., channel], expected)


def test_16_bit_photograph_is_not_white():
    """A mid-grey 16-bit image: PIL's own convert("RGB") clips it to white; the loader keeps it mid-grey."""
    pixels = np.full((8, 8), 32768, dtype=np.uint16)
    image = Image.open(io.BytesIO(_png(Image.fromarray(pixels))))
    assert int(np.asarray(image.convert("RGB")).min()) == 255
    assert np.asarray(load_image(_png(Image.fromarray(pixels)), "s")).max() == 128


def test_32_bit_and_float_modes_are_scaled_by_their_range():
    as_int = Image.fromarray(np.array([[0, 65535]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(as_int))[..., 0], [[0, 255]])
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(wide))[..., 0], [[0, 128, 255]])
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(unit))[..., 0], [[0, 128, 255]])
    other = Image.fromarray(np.array([[10.0, 20.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(other))[..., 0], [[0, 255]])


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1"])
def test_8_bit_modes_convert_as_pil_does(mode):
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    image = base.convert(mode)
    loaded = load_image(image, "s")
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image.convert("RGB")))
