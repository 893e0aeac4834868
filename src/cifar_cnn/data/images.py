"""Decoding one image file into the uint8 CHW array every other part of the package works on.

Used for data sets and for prediction alike, so that a user's picture goes through exactly the preprocessing that
the evaluation images went through: EXIF orientation applied, RGB, shorter side resized to the model's input size,
centre crop. Data sets store each image at its own aspect ratio with the shorter side at min(its own, the training
size) (`stored_shape`, `decode_stored`); the tensor pipeline crops and resizes from there.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import CifarCnnError

# Refuse images whose header claims more pixels than this before decoding them (decompression bombs). 40 MP is a
# large photograph; Pillow's own limit (89 MP warning, 179 MP error) is too generous for a 32x32 classifier.
MAX_PIXELS = 40_000_000
# Budgets checked before anything is allocated (issue 16: a 3,955-byte 1 x 1,000,000 PNG, or six 16-bit 6000x6000
# PNGs at once, took gigabytes). MAX_DECODE_BYTES bounds the decoded first frame plus one full-size working copy
# (RGB conversion or EXIF rotation; see `decode_cost`): a 40 MP RGB photo (4 bytes a pixel in Pillow) fits, a 16-bit
# one of 36 MP too. MAX_STORED_PIXELS bounds an image after resizing (the stored shape: kept aspect ratio, shorter
# side at most the model's size). MAX_ASPECT refuses strips (1 x 1,000,000) whose shorter side, resized to the
# model's, would make the longer side enormous: a panorama is at most about 10:1.
MAX_DECODE_BYTES = 320 * 2**20
MAX_STORED_PIXELS = 16_000_000
MAX_ASPECT = 50
# An image file (or archive member) larger than this is refused before it is read: a 40 MP photo is ~20 MB as JPEG,
# under 200 MB as an uncompressed 8-bit TIFF.
MAX_FILE_BYTES = 256 * 2**20
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey image


WIDE_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # one channel of more than 8 bits, scaled to L
STRIP_ROWS = 256  # rows of a wide grey image converted at a time: the float copies stay a few MB


def bytes_per_pixel(mode: str) -> int:
    """Bytes Pillow holds a decoded pixel of `mode` in: 1 for 1/L/P, 2 for 16-bit grey, 4 for everything else
    (RGB is stored as 4 bytes, as are I, F, RGBA, CMYK, LA)."""
    return 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4


def decode_cost(width: int, height: int, mode: str, rotated: bool = False) -> int:
    """Bytes that decoding a width x height frame of `mode` needs at its peak: the frame, plus a full-size 8-bit copy
    (none for RGB and L, which is resized before it becomes RGB; 1 byte a pixel for wide grey, scaled to L in strips;
    8 for a palette, through RGBA; 4 for other modes), plus 4 bytes a pixel when EXIF rotation copies it."""
    extra = 1 if mode in WIDE_GREY else 0 if mode in ("RGB", "L", "1") else 8 if mode == "P" else 4
    return width * height * (bytes_per_pixel(mode) + extra + 4 * rotated)


def _wide_grey_to_l(im: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float grey image scaled to 8-bit L (16-bit: 0..65535; 32-bit: 0..its peak; float:
    0..1), a strip of rows at a time so that no full-size float copy is made."""
    h = im.height
    peak = 65535.0 if im.mode.startswith("I;16") else 1.0
    if im.mode == "I":  # 32-bit integers: scaled to the image's own peak
        peak = max(float(im.getextrema()[1]), 1.0)
    out = np.empty((h, im.width), dtype=np.uint8)
    for top in range(0, h, STRIP_ROWS):
        strip = np.asarray(im.crop((0, top, im.width, min(h, top + STRIP_ROWS))), dtype=np.float64)
        np.clip(strip / peak * 255.0 + 0.5, 0, 255, out=strip)
        out[top : top + len(strip)] = strip.astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _to_rgb(im: Image.Image, shrink_to: tuple[int, int] | None = None) -> Image.Image:
    """Any Pillow mode (grayscale, palette, alpha, 16-bit, CMYK) -> 8-bit RGB, dropping alpha like torchvision.

    Grey images are resized to `shrink_to` (w, h) before they become RGB (the same pixels as after, at a quarter of
    the memory); other modes are converted first (alpha and palettes must be resolved before resampling)."""
    if im.mode in WIDE_GREY:
        im = _wide_grey_to_l(im)
    elif im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("L", "1") and shrink_to is not None and im.size != shrink_to:
        im = (im if im.mode == "L" else im.convert("L")).resize(shrink_to, Image.BILINEAR)
    return im if im.mode == "RGB" else im.convert("RGB")


EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def printable(name: str) -> str:
    """`name` with the bytes of a non-UTF-8 file name (surrogate escapes) shown as \\xNN, so that messages, class
    names and keys can always be printed and encoded."""
    return (
        name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _has_surrogates(name) else name
    )


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def open_regular(path: Path, name: str, max_bytes: int = MAX_FILE_BYTES) -> BinaryIO:
    """`path` opened for reading, refused (one-line CifarCnnError) unless it is a regular file (links followed) of at
    most `max_bytes`: a FIFO would block forever and a link to /dev/zero never ends. Opened without blocking and
    checked on the open descriptor, so the file cannot be swapped between the check and the read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CifarCnnError(f"{name}: no such file; restore it or remove it from the data set") from None
    except OSError as exc:
        raise CifarCnnError(f"{name}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CifarCnnError(f"{name}: not a regular file ({_file_kind(st.st_mode)}); replace it with an image file")
        if st.st_size > max_bytes:
            raise CifarCnnError(
                f"{name}: file of {st.st_size:,} bytes is larger than the limit of {max_bytes:,} bytes; shrink it first"
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device")):
        if test(mode):
            return kind
    return "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a plain file"


def read_capped(path: Path, name: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `open_regular`); a file that grows while it is read
    is cut off at the limit and refused."""
    with open_regular(path, name, max_bytes) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as exc:
            raise CifarCnnError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise CifarCnnError(f"{name}: file is larger than the limit of {max_bytes:,} bytes; shrink it first")
    return data


def check_shape(width: int, height: int, name: str) -> None:
    """Refuse (one line naming `name` and the size) images whose header claims more than MAX_PIXELS pixels or an
    aspect ratio beyond MAX_ASPECT: checked on the header, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise CifarCnnError(
            f"{name}: image of {width}x{height} pixels is larger than the limit of "
            f"{MAX_PIXELS:,} pixels (possible decompression bomb); shrink it first"
        )
    if width < 1 or height < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise CifarCnnError(
            f"{name}: image of {width}x{height} pixels has an extreme aspect ratio (more than {MAX_ASPECT}:1); "
            "crop it first"
        )


@contextmanager
def _source(data: bytes | Path, name: str) -> Iterator[BinaryIO]:
    if isinstance(data, bytes):
        yield io.BytesIO(data)
        return
    with open_regular(Path(data), name) as f:
        yield f


@contextmanager
def opened(data: bytes | Path, name: str) -> Iterator[Image.Image]:
    """The image, opened lazily (only the header is read; a path must be a regular file of at most MAX_FILE_BYTES),
    checked against MAX_PIXELS and MAX_ASPECT; every decoding error inside the block becomes a one-line
    CifarCnnError naming `name`."""
    name = printable(name)
    try:
        with warnings.catch_warnings(), _source(data, name) as f:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                check_shape(im.width, im.height, name)
                yield im
    except CifarCnnError:
        raise
    except FileNotFoundError:
        raise CifarCnnError(f"{name}: no such file; restore it or remove it from the data set") from None
    except MemoryError:
        raise CifarCnnError(f"{name}: not enough memory to decode this image; shrink it first") from None
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
    """The EXIF orientation (1: as stored), read from the header only: for a PNG whose eXIf chunk is not before its
    pixels, Pillow's getexif() would decode the whole image to look after them, before any budget is checked."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a damaged EXIF block is ignored, as browsers do
        return 1


def check_decode_budget(im: Image.Image, name: str) -> None:
    """Refuse, before its pixels are decoded, a frame whose decoding would need more than MAX_DECODE_BYTES (see
    `decode_cost`; a JPEG is measured after `draft` has chosen its reduced scale)."""
    rotated = _orientation(im) != 1
    cost = decode_cost(im.width, im.height, im.mode, rotated)
    if cost > MAX_DECODE_BYTES:
        raise CifarCnnError(
            f"{name}: image of {im.width}x{im.height} pixels in mode {im.mode} needs {cost / 2**20:.0f} MiB to decode, "
            f"more than the limit of {MAX_DECODE_BYTES / 2**20:.0f} MiB; shrink it first"
        )


def _loaded_rgb(im: Image.Image, draft_to: tuple[int, int] | None = None, name: str = "image") -> Image.Image:
    """First frame, decoded (JPEGs at a reduced scale when `draft_to` (w, h) allows) within the budget,
    EXIF-oriented, 8-bit RGB (grey images already resized to `draft_to`)."""
    im.seek(0)  # first frame of GIF / multi-page TIFF / APNG: later frames are never decoded
    orientation = _orientation(im)
    if draft_to is not None and im.format == "JPEG":
        w, h = draft_to
        if orientation in EXIF_TRANSPOSED:
            w, h = h, w
        im.draft("RGB", (w, h))  # DCT scaling: a large photo decodes 2-8x faster at no loss for the target size
    check_decode_budget(im, name)
    im.load()
    if orientation != 1:
        with contextlib.suppress(Exception):  # a damaged EXIF block is ignored, as browsers do
            im = ImageOps.exif_transpose(im)
    return _to_rgb(im, draft_to)


def decode_image(data: bytes | Path, size: int, name: str = "image") -> np.ndarray:
    """Decode encoded image bytes (or a file) into a (3, size, size) uint8 array: exactly what evaluation sees of the
    same file in a data set (stored at `stored_shape`, then the centred square resized to size); CifarCnnError
    naming `name` if unreadable."""
    if size < 1 or size * size > MAX_STORED_PIXELS:
        raise CifarCnnError(f"input size {size}: images cannot be decoded to {size}x{size} pixels; use a smaller size")
    with opened(data, name) as im:
        h, w = _oriented_size(im)
        stored = _decoded(im, stored_shape(h, w, size), printable(name))
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


def _decoded(im: Image.Image, shape: tuple[int, int], name: str) -> np.ndarray:
    h, w = shape
    if h * w > MAX_STORED_PIXELS:
        raise CifarCnnError(
            f"{name}: image of {im.width}x{im.height} pixels would be {w}x{h} pixels after resizing, more than the "
            f"limit of {MAX_STORED_PIXELS:,}; crop or shrink it first"
        )
    rgb = _loaded_rgb(im, (w, h), name)
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
        return _decoded(im, shape, printable(name))


def image_extensions() -> set[str]:
    """File name extensions that Pillow can open (lower case, with the dot)."""
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}
