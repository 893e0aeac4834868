"""Property tests (hypothesis) for the data readers, image preprocessing, augmentation and splits: for any input
they either give a well-formed result or a CifarCnnError, never another exception."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_cnn.data.images import MAX_ASPECT, decode_image, decode_stored, probe_size, stored_shape
from cifar_cnn.data.pipeline import derived_generator, random_cutout, random_flip, random_translate
from cifar_cnn.data.sources import read_official_batch
from cifar_cnn.data.split import stratified_split
from cifar_cnn.errors import CifarCnnError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.binary(max_size=400))
def test_batch_reader_any_bytes(blob: bytes) -> None:
    try:
        images, labels = read_official_batch(blob, "x")
    except CifarCnnError:
        return
    assert images.dtype == np.uint8 and images.shape[1:] == (3, 32, 32) and len(labels) == len(images)


arrays = st.sampled_from([np.uint8, np.int16, np.float32]).flatmap(
    lambda dt: st.tuples(st.just(dt), st.integers(0, 4), st.sampled_from([3072, 1024, 3071]))
)


@FAST
@given(arrays, st.lists(st.integers(-3, 12), max_size=5), st.booleans(), st.sampled_from([2, 4]))
def test_batch_reader_structured(spec, labels, bytes_keys: bool, protocol: int) -> None:
    dtype, n, width = spec
    data = np.arange(n * width, dtype=np.int64).astype(dtype).reshape(n, width)
    d = {"data": data, "labels": labels}
    if bytes_keys:
        d = {k.encode(): v for k, v in d.items()}
    blob = pickle.dumps(d, protocol=protocol)
    valid = dtype == np.uint8 and width == 3072 and len(labels) == n
    if not valid:
        with pytest.raises(CifarCnnError):
            read_official_batch(blob, "x")
        return
    images, out_labels = read_official_batch(blob, "x")
    assert np.array_equal(images.reshape(n, 3072), data) and out_labels.tolist() == labels


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {
    "PNG": {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"},
    "JPEG": {"L", "RGB", "CMYK"},
    "BMP": {"1", "L", "P", "RGB"},
    "GIF": {"L", "P"},
    "TIFF": set(MODES),
    "WEBP": {"RGB", "RGBA"},
}


@st.composite
def encoded_images(draw):
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(sorted(FORMATS[fmt])))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    im = (
        rgb.convert(mode)
        if mode not in ("I;16", "I", "F")
        else Image.fromarray(
            rng.integers(0, 65535, (h, w)).astype(
                np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32
            )
        )
    )
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue(), (w, h), mode, fmt, rgb


@FAST
@given(encoded_images(), st.sampled_from([16, 32, 40]))
def test_decode_any_mode_format_size(sample, size: int) -> None:
    blob, (w, h), mode, fmt, rgb = sample
    if max(w, h) > MAX_ASPECT * min(w, h):  # a strip: refused on its header, before any pixel is decoded
        with pytest.raises(CifarCnnError, match=f"img: image of {w}x{h} pixels has an extreme aspect ratio"):
            decode_image(blob, size, "img")
        return
    out = decode_image(blob, size, "img")
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    if mode == "RGB" and fmt in ("PNG", "BMP", "TIFF") and (w, h) == (size, size):
        assert np.array_equal(out, np.asarray(rgb).transpose(2, 0, 1))  # lossless and same size: exact


@FAST
@given(st.binary(max_size=300))
def test_decode_any_bytes(blob: bytes) -> None:
    try:
        out = decode_image(blob, 32, "img")
    except CifarCnnError as exc:
        assert "img" in str(exc)
        return
    assert out.shape == (3, 32, 32)


def translate_offsets(shifted: torch.Tensor, x: torch.Tensor, pad: int) -> list[list[tuple[int, int]]]:
    """For each image, the offsets (dy, dx) in [-pad, pad] at which the reflect-padded original, cropped back to the
    image's size, equals the shifted image (computed with numpy, independently of the package)."""
    h, w = x.shape[2:]
    found = []
    for s, a in zip(shifted.numpy(), x.numpy()):
        padded = np.pad(a, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
        found.append(
            [
                (dy, dx)
                for dy in range(-pad, pad + 1)
                for dx in range(-pad, pad + 1)
                if np.array_equal(s, padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w])
            ]
        )
    return found


def clipped_spans(side: int, length: int) -> set[tuple[int, int]]:
    """The [start, stop) spans a segment of `side` pixels covers on an axis of `length` pixels, over every position
    at which it overlaps the axis (clipped at both ends)."""
    return {(max(t, 0), min(t + side, length)) for t in range(-(side - 1), length)}


@FAST
@given(st.integers(1, 6), st.integers(0, 4), st.integers(0, 12), st.integers(0, 10**6))
def test_augmentations(n: int, pad: int, cut: int, seed: int) -> None:
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    # flip: every image is itself or its horizontal mirror
    flipped = random_flip(x, derived_generator(seed))
    assert flipped.shape == x.shape
    for f, a in zip(flipped.numpy(), x.numpy()):
        assert np.array_equal(f, a) or np.array_equal(f, a[:, :, ::-1])
    # over a batch of 64 with this fixed generator, some images are flipped and some are not (2^-63 to miss)
    batch = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(seed + 1))
    out = random_flip(batch, derived_generator(seed)).numpy()
    mirrored = [np.array_equal(o, b[:, :, ::-1]) for o, b in zip(out, batch.numpy())]
    plain = [np.array_equal(o, b) for o, b in zip(out, batch.numpy())]
    assert all(m != p for m, p in zip(mirrored, plain)) and any(mirrored) and any(plain)
    again = random_flip(x, derived_generator(seed))
    assert torch.equal(again, random_flip(x, derived_generator(seed)))  # reproducible from the seed
    # translate: every image is the reflect-padded original cropped at one offset in [-pad, pad]
    shifted = random_translate(x, pad, derived_generator(seed))
    assert shifted.shape == x.shape
    assert all(len(offsets) == 1 for offsets in translate_offsets(shifted, x, pad))
    if pad:  # over a batch of 64, more than one offset occurs (a no-op would give only (0, 0))
        moved = translate_offsets(random_translate(batch, pad, derived_generator(seed)), batch, pad)
        assert all(len(offsets) == 1 for offsets in moved) and len({o[0] for o in moved}) > 1
    # cutout: exactly one square of side `cut`, clipped at the borders, is zeroed in all channels; the rest is kept
    base = x + 10  # no pixel is 0 before the cut
    out = random_cutout(base, cut, derived_generator(seed)).numpy()
    if cut == 0:
        assert np.array_equal(out, base.numpy())  # side 0: nothing cut
        return
    rows, cols = clipped_spans(cut, 12), clipped_spans(cut, 12)
    for o, b in zip(out, base.numpy()):
        zero = (o == 0).all(0)
        assert ((o == 0) == zero).all()  # the same pixels in every channel
        ys, xs = np.nonzero(zero)
        assert len(ys) > 0
        (r0, r1), (c0, c1) = (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1)
        assert (r0, r1) in rows and (c0, c1) in cols
        square = np.zeros_like(zero)
        square[r0:r1, c0:c1] = True
        assert np.array_equal(zero, square) and np.array_equal(o[:, ~square], b[:, ~square])


@FAST
@given(st.lists(st.integers(0, 4), min_size=1, max_size=200), st.floats(0, 0.9), st.integers(0, 100))
def test_split_properties(labels: list[int], fraction: float, seed: int) -> None:
    y = np.array(labels)
    train, val = stratified_split(y, fraction, seed)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(y)
    for c in np.unique(y):
        n = (y == c).sum()
        expected = int(round(fraction * n)) or (1 if fraction > 0 and n > 1 else 0)
        assert (y[val] == c).sum() == expected


def _writable_samples() -> list[tuple[str, bytes]]:
    """A small image in every format Pillow can write here (the seeds of the mutation test below)."""
    Image.init()
    samples = []
    for fmt in sorted(set(Image.SAVE)):
        for mode in ("RGB", "RGBA", "L", "1"):
            buf = io.BytesIO()
            try:
                Image.new(mode, (16, 12), 200 if mode in ("L", "1") else (200, 30, 90, 255)[: len(mode)]).save(
                    buf, format=fmt
                )
            except Exception:  # not writable in this mode (or needs a codec this Pillow lacks): try the next one
                continue
            samples.append((fmt, buf.getvalue()))
            break
    return samples


@pytest.mark.filterwarnings("ignore")  # Pillow warns about the damage (corrupt EXIF, short tags) it gets past
def test_decode_mutated_files_of_every_format() -> None:
    """Seeded mutation fuzzing of real files of every writable format (headers included, where Pillow's plugins
    are most fragile): each either decodes or raises CifarCnnError, never another exception. Deterministic, so a
    failure reproduces. It found NotImplementedError (DDS), RuntimeError (AVIF) and AttributeError (SPIDER)."""
    samples = _writable_samples()
    assert {"PNG", "JPEG", "GIF", "TIFF", "BMP", "DDS", "ICO", "WEBP"} <= {fmt for fmt, _ in samples}
    rng = np.random.default_rng(20240607)
    failures: dict[str, str] = {}
    for i in range(3000):
        fmt, blob = samples[i % len(samples)]
        data = bytearray(blob)
        for _ in range(int(rng.integers(1, 6))):
            if not data:
                break
            pos = int(rng.integers(0, len(data)))
            kind = rng.random()
            if kind < 0.7:
                data[pos] = int(rng.integers(0, 256))
            elif kind < 0.85:
                del data[pos : pos + int(rng.integers(1, 16))]
            else:
                data[pos : pos + 4] = bytes(rng.choice([0, 0x7F, 0x80, 0xFF], 4).tolist())
        try:
            decode_image(bytes(data), 32, "img")
        except CifarCnnError:
            pass
        except Exception as exc:
            failures.setdefault(f"{fmt} {type(exc).__name__}", f"{exc} (input {i})")
        try:  # what a data set's decode does: the header first, then the image at its stored shape
            h, w = probe_size(bytes(data), "img")
            decode_stored(bytes(data), stored_shape(h, w, 32), "img")
        except CifarCnnError:
            pass
        except Exception as exc:
            failures.setdefault(f"{fmt} stored {type(exc).__name__}", f"{exc} (input {i})")
    assert not failures, failures
