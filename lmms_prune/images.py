"""Decode one sample's image to 8-bit RGB, refusing files that are not whole images (harness-neutral).

Used by the tasks (RefCOCO's ``doc_to_visual``) and by the model wrappers for the images other tasks send
(POPE, MME). Three rules:

- **Truncated files are refused** whatever ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` says. lmms-eval sets it to
  True for the whole process when ``lmms_eval.api.task`` is imported, and PIL then pads a truncated JPEG with
  grey and returns it as if it were fine. :func:`load_image` decodes with the flag set to False and puts the
  previous value back afterwards (the flag is process-wide state, so the switch is guarded by a lock).
- **Modes are converted by their value range, not clipped.** ``I;16*`` (16-bit) pixels are divided by 257,
  mapping 0..65535 onto 0..255. ``I`` (32-bit integers; how PIL opens many 16-bit PNGs) is read the same way
  when all values lie in 0..65535, and is scaled min-to-max onto 0..255 otherwise. ``F`` (float) values in
  [0, 1] are multiplied by 255, other ranges scaled min-to-max. Every other mode (``1``, ``L``, ``P``, ``LA``,
  ``RGBA``, ``CMYK``, ``YCbCr``, ...) goes through PIL's own ``convert("RGB")``. PIL's ``convert("RGB")`` on
  a 16-bit image clips every value above 255 to 255, which turns a typical 16-bit photograph pure white.
- **Every failure is one** :class:`ImageLoadError` naming the sample id and the file, so a harness can count
  the sample as an error (``on_error=skip``) instead of failing the run or scoring a broken picture.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from PIL import Image, ImageFile

_TRUNCATED_FLAG_LOCK = threading.Lock()


class ImageLoadError(ValueError):
    """A sample's image cannot be used (missing, empty, truncated, not an image, unsupported mode)."""

    def __init__(self, sample_id: Any, where: str, reason: str) -> None:
        self.sample_id = sample_id
        self.where = where
        self.reason = reason
        super().__init__(f"sample {sample_id!r}: image {where} cannot be used: {reason}")


@contextmanager
def refuse_truncated() -> Iterator[None]:
    """Run the block with ``ImageFile.LOAD_TRUNCATED_IMAGES = False``; the previous value is restored after."""
    with _TRUNCATED_FLAG_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` mapped linearly from ``[low, high]`` onto ``[0, 255]`` (rounded; a flat image maps to 0)."""
    span = high - low
    if span <= 0:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (values.astype(np.float64) - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, scaling 16-bit, 32-bit integer and float modes by value (module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image)
        if values.size == 0:
            return image.convert("RGB")
        low, high = float(values.min()), float(values.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"mode {mode} image holds non-finite values")
        if mode.startswith("I;16") or (mode == "I" and low >= 0 and high <= 65535):
            gray = _scale_to_uint8(values, 0.0, 65535.0)
        elif mode == "F" and low >= 0 and high <= 1:
            gray = _scale_to_uint8(values, 0.0, 1.0)
        else:
            gray = _scale_to_uint8(values, low, high)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def _describe(source: Any) -> tuple[Any, str]:
    """``(what PIL opens, how the error message names it)`` for a path, bytes or ``{"bytes", "path"}`` record."""
    if isinstance(source, dict):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            return bytes(data), f"{path!r} (embedded bytes)" if path else "(embedded bytes)"
        if path:
            return os.fspath(path), repr(os.fspath(path))
        raise ValueError("neither bytes nor a path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "(bytes)"
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source), repr(os.fspath(source))
    raise ValueError(f"unsupported image source of type {type(source).__name__}")


# PIL's own decompression-bomb limit (2 x its default ``Image.MAX_IMAGE_PIXELS``), held here rather than read from
# PIL's global: other packages raise that global at import time (lmms-eval's task utilities set it to 1e9, VLMEvalKit
# too), which would let a 16000 x 12000 image be decoded whole (576 MB) in one run and refused in another.
MAX_PIXELS = 2 * 89_478_485


def refuse_bomb(image: Image.Image) -> None:
    """Raise PIL's ``DecompressionBombError`` when the header says ``image`` has more than :data:`MAX_PIXELS`
    pixels (before any pixel is decoded), whatever PIL's global limit is at the time."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise Image.DecompressionBombError(f"Image size ({width * height} pixels, {width} x {height}) exceeds the "
                                           f"limit of {MAX_PIXELS} pixels, could be a decompression bomb DOS attack.")


def load_image(source: Any, sample_id: Any) -> Image.Image:
    """Decode one sample's image completely and return it as 8-bit RGB.

    ``source``: a file path, encoded bytes, a ``datasets`` undecoded image record ``{"bytes", "path"}`` (the
    bytes win when present, as in ``datasets.Image``) or an already decoded ``PIL.Image``. ``sample_id``
    names the sample in the error. Raises :class:`ImageLoadError` for a missing, empty, truncated or
    undecodable file and for a mode that cannot be converted.
    """
    if isinstance(source, Image.Image):
        try:
            return to_rgb(source)
        except (OSError, ValueError) as err:
            raise ImageLoadError(sample_id, "(decoded image)", str(err)) from err
    try:
        opened, where = _describe(source)
    except ValueError as err:
        raise ImageLoadError(sample_id, repr(source)[:80], str(err)) from err
    if isinstance(opened, bytes):
        if not opened:
            raise ImageLoadError(sample_id, where, "the file is empty (0 bytes)")
        opened = io.BytesIO(opened)
    elif not os.path.isfile(opened):
        raise ImageLoadError(sample_id, where, "no such file")
    elif os.path.getsize(opened) == 0:
        raise ImageLoadError(sample_id, where, "the file is empty (0 bytes)")
    try:
        with refuse_truncated(), Image.open(opened) as image:
            refuse_bomb(image)
            image.load()
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's decode failures
        raise ImageLoadError(sample_id, where, f"{type(err).__name__}: {err}") from err
