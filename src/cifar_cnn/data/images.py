"""Decoding one image file into the uint8 CHW array every other part of the package works on.

Used for data sets and for prediction alike, so that a user's picture goes through exactly the preprocessing that
the evaluation images went through: EXIF orientation applied, RGB, shorter side resized to the model's input size,
centre crop. Data sets store each image at its own aspect ratio with the shorter side at min(its own, the training
size) (`stored_shape`, `decode_stored`); the tensor pipeline crops and resizes from there.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import CifarCnnError

# Refuse images whose header claims more pixels than this before decoding them (decompression bombs). 40 MP is a
# large photograph; Pillow's own limit (89 MP warning, 179 MP error) is too generous for a 32x32 classifier.
MAX_PIXELS = 40_000_000
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode (grayscale, palette, alpha, 16-bit, CMYK) -> 8-bit RGB, dropping alpha like torchvision."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im if im.mode == "RGB" else im.convert("RGB")


EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@contextmanager
def opened(data: bytes | Path, name: str) -> Iterator[Image.Image]:
    """The image, opened lazily (only the header is read), checked against MAX_PIXELS; every decoding error inside
    the block becomes a one-line CifarCnnError naming `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise CifarCnnError(
                        f"{name}: image of {im.width}x{im.height} pixels is larger than the limit of "
                        f"{MAX_PIXELS:,} pixels (possible decompression bomb); shrink it first"
                    )
                yield im
    except CifarCnnError:
        raise
    except FileNotFoundError:
        raise CifarCnnError(f"{name}: no such file; restore it or remove it from the data set") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CifarCnnError(
            f"{name}: not a readable image ({type(exc).__name__}); remove or replace the file"
        ) from None
    # Any other exception: on a damaged file Pillow's plugins raise more than the OSError, SyntaxError and ValueError
    # one would expect (fuzzing found NotImplementedError from DDS, RuntimeError from AVIF, AttributeError from
    # SPIDER), and an upload to the server or one bad file in a data set must get a message, not a traceback.
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CifarCnnError(f"{name}: unreadable or truncated image ({reason}); remove or replace the file") from None


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block is ignored, as browsers do
        return 1


def _loaded_rgb(im: Image.Image, draft_to: tuple[int, int] | None = None) -> Image.Image:
    """First frame, decoded (JPEGs at a reduced scale when `draft_to` (w, h) allows), EXIF-oriented, 8-bit RGB."""
    im.seek(0)  # first frame of GIF / multi-page TIFF
    if draft_to is not None and im.format == "JPEG":
        w, h = draft_to
        if _orientation(im) in EXIF_TRANSPOSED:
            w, h = h, w
        im.draft("RGB", (w, h))  # DCT scaling: a large photo decodes 2-8x faster at no loss for the target size
    im.load()
    with contextlib.suppress(Exception):  # a damaged EXIF block is ignored, as browsers do
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def decode_image(data: bytes | Path, size: int, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (or a file) into a (3, size, size) uint8 array: exactly what evaluation sees of the
    same file in a data set (stored at `stored_shape`, then the centred square resized to size); CifarCnnError
    naming `name` if unreadable."""
    with opened(data, name) as im:
        h, w = _oriented_size(im)
        stored = _decoded(im, stored_shape(h, w, size))
    side = min(stored.shape[1:])
    top, left = (stored.shape[1] - side) // 2, (stored.shape[2] - side) // 2
    square = stored[:, top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    im = Image.fromarray(np.ascontiguousarray(square.transpose(1, 2, 0)))
    return np.ascontiguousarray(np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1))


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    return (w, h) if _orientation(im) in EXIF_TRANSPOSED else (h, w)


def _decoded(im: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    rgb = _loaded_rgb(im, (w, h))
    if rgb.size != (w, h):
        rgb = rgb.resize((w, h), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))


def probe_size(data: bytes | Path, name: str) -> tuple[int, int]:
    """(height, width) of an image as it will be decoded (EXIF orientation applied), reading only its header."""
    with opened(data, name) as im:
        return _oriented_size(im)


def stored_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) an image of height x width is stored at: aspect kept, shorter side min(its own, size)."""
    short = min(height, width)
    target = min(short, size)
    scale = target / short
    return max(target, round(height * scale)), max(target, round(width * scale))


def decode_stored(data: bytes | Path, shape: tuple[int, int], name: str) -> np.ndarray:
    """An image decoded to exactly (3, h, w) = `shape` (see `stored_shape`), uint8."""
    with opened(data, name) as im:
        return _decoded(im, shape)


def image_extensions() -> set[str]:
    """File name extensions that Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}
