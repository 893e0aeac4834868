"""Decoding one image file into the uint8 CHW array every other part of the package works on.

Used for data sets and for prediction alike, so that a user's picture goes through exactly the preprocessing that
the evaluation images went through: RGB, shorter side resized to the model's input size, centre crop.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

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


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size` (bilinear, antialiased) and cut the centre square; no-op at size x size."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes into a (3, size, size) uint8 array; CifarCnnError naming `name` if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise CifarCnnError(
                        f"{name}: image of {im.width}x{im.height} pixels is larger than the limit of "
                        f"{MAX_PIXELS:,} pixels (possible decompression bomb); shrink it first"
                    )
                im.seek(0)  # first frame of GIF / multi-page TIFF
                im.load()
                rgb = resize_center_crop(_to_rgb(im), size)
                return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    except CifarCnnError:
        raise
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


def image_extensions() -> set[str]:
    """File name extensions that Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}
