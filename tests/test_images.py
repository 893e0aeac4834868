"""Decoding one image (cifar_cnn.data.images): EXIF orientation, every colour mode to RGB, the stored shape, and
JPEG decoding at a reduced scale matching a full decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cifar_cnn.data.images import decode_image, decode_stored, probe_size, stored_shape
from cifar_cnn.errors import CifarCnnError


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def marked(w: int = 40, h: int = 20) -> np.ndarray:
    """An RGB image, black but a white top-left 10x5 block, so its orientation shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:5, :10] = 255
    return a


@pytest.mark.parametrize(
    ("orientation", "white_at"),
    [(1, "top-left"), (3, "bottom-right"), (6, "top-right"), (8, "bottom-left")],
)
def test_exif_orientation_is_applied(orientation: int, white_at: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    blob = encoded(Image.fromarray(marked()), "PNG", exif=exif)
    h, w = probe_size(blob, "x")
    assert (h, w) == ((20, 40) if orientation in (1, 3) else (40, 20))  # 6 and 8 turn it a quarter
    out = decode_stored(blob, (h, w), "x")[0]  # red channel (3, h, w) -> (h, w)
    corners = {
        "top-left": out[0, 0],
        "top-right": out[0, -1],
        "bottom-left": out[-1, 0],
        "bottom-right": out[-1, -1],
    }
    assert corners[white_at] == 255 and sum(v == 255 for v in corners.values()) == 1


@pytest.mark.parametrize(
    ("mode", "expect"),
    [
        ("L", (77, 77, 77)),
        ("LA", (77, 77, 77)),
        ("RGBA", (10, 200, 30)),
        ("CMYK", None),
        ("P", (10, 200, 30)),
        ("I;16", (77, 77, 77)),
        ("1", (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb(mode: str, expect: tuple[int, int, int] | None) -> None:
    if mode in ("L", "LA"):
        im = Image.new(mode, (8, 6), 77 if mode == "L" else (77, 255))
    elif mode == "I;16":
        im = Image.new("I;16", (8, 6), 77 * 257)
    elif mode == "1":
        im = Image.new("1", (8, 6), 1)
    elif mode == "CMYK":
        im = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    else:
        im = Image.new("RGBA", (8, 6), (10, 200, 30, 255))
        if mode == "P":
            im = im.convert("RGB").quantize(colors=4)  # an exact palette entry for the one colour
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = decode_stored(encoded(im, fmt), (6, 8), f"{mode} image")
    assert out.shape == (3, 6, 8) and out.dtype == np.uint8
    pixel = tuple(int(v) for v in out[:, 3, 4])
    assert pixel == ((255, 0, 0) if mode == "CMYK" else expect)


def test_stored_shape_keeps_the_aspect_and_never_enlarges() -> None:
    assert stored_shape(375, 500, 224) == (224, 299)
    assert stored_shape(500, 375, 224) == (299, 224)
    assert stored_shape(20, 30, 224) == (20, 30)  # smaller than the training size: kept as it is
    assert stored_shape(32, 32, 32) == (32, 32)
    assert stored_shape(1, 4000, 32) == (1, 4000)


def test_reduced_scale_jpeg_decoding_matches_a_full_decode() -> None:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((16, 16, 1))).astype(np.uint8)  # 480x640
    blob = encoded(Image.fromarray(smooth), "JPEG", quality=95)
    fast = decode_stored(blob, stored_shape(480, 640, 48), "x").astype(int)
    full = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB").resize((64, 48), Image.BILINEAR)).astype(int)
    assert fast.shape == (3, 48, 64)
    assert np.abs(fast - full.transpose(2, 0, 1)).mean() < 4  # DCT scaling differs from a resize only by rounding


def test_unreadable_bytes_name_the_file() -> None:
    with pytest.raises(CifarCnnError, match=r"^photos/x.jpg: not a readable image"):
        probe_size(b"not an image", "photos/x.jpg")
    with pytest.raises(CifarCnnError, match="no such file"):
        decode_image(__import__("pathlib").Path("/nonexistent/x.png"), 32, "/nonexistent/x.png")


@pytest.mark.parametrize("size_wh", [(640, 480), (20, 30), (32, 32)])
def test_predict_sees_what_evaluation_sees(size_wh: tuple[int, int], tmp_path) -> None:
    """decode_image (predict, serve) gives the very pixels the evaluation view of the same file in a data set has."""
    from cifar_cnn.data import load_dataset

    rng = np.random.default_rng(0)
    w, h = size_wh
    blob = encoded(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)), "JPEG", quality=90)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "x.jpg").write_bytes(blob)
    ds = load_dataset(str(tmp_path), 32, log=lambda m: None)
    assert np.array_equal(decode_image(blob, 32), ds.test_images[0])


def test_exif_rotated_jpeg_is_upright_in_predict_and_in_a_data_set(tmp_path) -> None:
    """A real camera-style JPEG: stored 400 x 200 with a white top-left block and EXIF orientation 6 (turn a quarter
    clockwise to display): decoded 200 wide and 400 tall with the block at the top right, by the reduced-scale JPEG
    path (predict, size 32) and by the data-set path."""
    exif = Image.Exif()
    exif[0x0112] = 6
    a = np.zeros((200, 400, 3), np.uint8)
    a[:50, :100] = 255
    blob = encoded(Image.fromarray(a), "JPEG", quality=95, exif=exif)
    assert probe_size(blob, "cam.jpg") == (400, 200)
    stored = decode_stored(blob, stored_shape(400, 200, 32), "cam.jpg")[0]  # (64, 32)
    assert stored.shape == (64, 32) and stored[2, -3] > 200 and stored[2, 2] < 50 and stored[-3, -3] < 50
    path = tmp_path / "cam.jpg"
    path.write_bytes(blob)
    square = decode_image(path, 32, "cam.jpg")[0]  # the centred square: rows 16..48 of the stored image
    assert np.array_equal(square, stored[16:48])
