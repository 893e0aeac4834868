"""Prediction: every image format and mode, the evaluation preprocessing, top-k against an independent softmax,
per-file errors with exit code 1, --json and --csv."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn import load_checkpoint, model_from_checkpoint
from cifar_cnn.cli import main
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.predict import Predictor
from cifar_cnn.predict_core import NON_FINITE, BasePredictor, NonFiniteOutput, softmax

from .conftest import CLASSES, run_cli
from .model_fixtures import tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint)


def reference_probs(checkpoint: Path, rgb: np.ndarray, tta: str = "none") -> np.ndarray:
    """Softmax of the model's logits for HWC uint8 RGB images at the input size, computed here with plain torch:
    x / 255, then (x - mean) / std, then the network."""
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).double() / 255.0
    x = ((x - torch.tensor(ckpt["mean"]).view(1, 3, 1, 1)) / torch.tensor(ckpt["std"]).view(1, 3, 1, 1)).float()
    with torch.no_grad():
        logits = model(x) if tta == "none" else 0.5 * (model(x) + model(x.flip(3)))
    return torch.softmax(logits.double(), dim=1).numpy()


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful HWC uint8 picture (smooth, so that resizing is well defined and JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [
        np.sin(6 * xx * rng.uniform(0.5, 2) + rng.uniform(0, 6)) + np.cos(5 * yy * rng.uniform(0.5, 2)) for _ in "rgb"
    ]
    return np.clip(np.stack(planes, -1) * 60 + 128, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the 32x32 RGB picture the file should become), the expectation computed with Pillow
    directly, not with the package's decoder."""
    rgb = scene(32, 32)
    im = Image.fromarray(rgb)
    gray = np.asarray(im.convert("L"))
    gray3 = np.repeat(gray[..., None], 3, axis=2)
    pal = im.quantize(64)
    rgba = np.dstack([rgb, np.full((32, 32), 90, np.uint8)])
    g16 = (gray.astype(np.uint16) * 257 + 100).astype(np.uint16)  # 16-bit values whose 8-bit rounding is `gray`
    big = scene(96, 64, seed=3)  # portrait 64 wide x 96 high: resize to 32x48, then the centre 32 rows
    resized = np.asarray(Image.fromarray(big).resize((32, 48), Image.BILINEAR))[8:40]
    frame2 = Image.fromarray(255 - rgb).quantize(64)
    gif = io.BytesIO()
    pal.save(gif, "GIF", save_all=True, append_images=[frame2], duration=100)
    tiff = io.BytesIO()
    im.save(tiff, "TIFF", save_all=True, append_images=[Image.fromarray(255 - rgb)])
    return {
        "rgb.png": (encode(im, "PNG"), rgb),
        "gray.png": (encode(Image.fromarray(gray), "PNG"), gray3),
        "palette.png": (encode(pal, "PNG"), np.asarray(pal.convert("RGB"))),
        "rgba.png": (encode(Image.fromarray(rgba), "PNG"), rgb),
        "gray16.png": (encode(Image.fromarray(g16), "PNG"), gray3),
        "rgb.bmp": (encode(im, "BMP"), rgb),
        "rgb.webp": (encode(im, "WEBP", lossless=True), rgb),
        "anim.gif": (gif.getvalue(), np.asarray(pal.convert("RGB"))),  # first frame only
        "pages.tiff": (tiff.getvalue(), rgb),  # first page only
        "portrait.png": (encode(Image.fromarray(big), "PNG"), resized),
        "photo.jpg": (
            encode(im, "JPEG", quality=95),
            np.asarray(Image.open(io.BytesIO(encode(im, "JPEG", quality=95)))),
        ),
        "gray.jpg": (encode(Image.fromarray(gray), "JPEG", quality=95), None),
    }


def test_every_format_and_mode_is_predicted_like_its_pixels(checkpoint: Path, predictor: Predictor, tmp_path: Path):
    cases = _cases()
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    report = predictor.predict_files([tmp_path], top_k=10)
    assert report.errors == []
    got = {Path(p["path"]).name: p for p in report.predictions}
    assert set(got) == set(cases)
    names = [n for n, (_, want) in cases.items() if want is not None]
    expected = reference_probs(checkpoint, np.stack([cases[n][1] for n in names]))
    for name, want in zip(names, expected):
        probs = {t["label"]: t["probability"] for t in got[name]["top_k"]}
        assert np.allclose([probs[c] for c in CLASSES], want, atol=1e-5), name
    assert got["gray.jpg"]["label"] in CLASSES  # lossy grayscale JPEG: decoded and predicted


def test_top_k_matches_an_independent_softmax(checkpoint: Path, predictor: Predictor):
    rgb = np.stack([scene(32, 32, seed=s) for s in range(6)])
    expected = reference_probs(checkpoint, rgb)
    rows = predictor.predict(rgb.transpose(0, 3, 1, 2), top_k=3)
    for row, want in zip(rows, expected):
        order = np.argsort(-want)[:3]
        assert [t["label"] for t in row["top_k"]] == [CLASSES[i] for i in order]
        assert np.allclose([t["probability"] for t in row["top_k"]], want[order], atol=1e-6)
        assert row["label"] == row["top_k"][0]["label"] and row["probability"] == row["top_k"][0]["probability"]
        assert 0 < sum(t["probability"] for t in row["top_k"]) <= 1 + 1e-9
    full = predictor.predict(rgb.transpose(0, 3, 1, 2), top_k=99)  # more than the classes: all of them
    assert all(len(r["top_k"]) == 10 and abs(sum(t["probability"] for t in r["top_k"]) - 1) < 1e-9 for r in full)
    assert np.allclose(softmax(np.array([[1000.0, 0.0]])), [[1.0, 0.0]])  # stable for large logits


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(checkpoint: Path):
    rgb = np.stack([scene(32, 32, seed=s) for s in range(4)])
    flip = Predictor.from_checkpoint(checkpoint, tta="flip")
    rows = flip.predict(rgb.transpose(0, 3, 1, 2), top_k=10)
    want = reference_probs(checkpoint, rgb, tta="flip")
    for row, w in zip(rows, want):
        probs = {t["label"]: t["probability"] for t in row["top_k"]}
        assert np.allclose([probs[c] for c in CLASSES], w, atol=1e-5)


def test_predict_rejects_arrays_of_the_wrong_shape(predictor: Predictor):
    with pytest.raises(CifarCnnError, match=r"shape \(N, 3, 32, 32\)"):
        predictor.predict(np.zeros((2, 3, 64, 64), np.uint8))
    assert len(predictor.predict(np.zeros((3, 32, 32), np.uint8))) == 1  # one image without the batch axis


def test_cli_folder_with_a_corrupt_file_predicts_the_rest_and_exits_1(checkpoint: Path, tmp_path: Path):
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    cases = _cases()
    for name in ("rgb.png", "photo.jpg"):
        (folder / name).write_bytes(cases[name][0])
    (folder / "nested" / "gray.png").write_bytes(cases["gray.png"][0])
    (folder / "broken.jpg").write_bytes(cases["photo.jpg"][0][:300])  # truncated
    (folder / "notes.txt").write_text("not an image, and not an image extension: skipped")
    out_csv = tmp_path / "predictions.csv"
    r = run_cli(
        "predict",
        str(checkpoint),
        str(folder),
        str(tmp_path / "missing.png"),
        "--top-k",
        "3",
        "--json",
        "--csv",
        str(out_csv),
    )
    assert r.returncode == 1, r.stderr
    result = json.loads(r.stdout)
    assert set(result) == {"predictions", "errors"}
    assert sorted(Path(p["path"]).name for p in result["predictions"]) == ["gray.png", "photo.jpg", "rgb.png"]
    for p in result["predictions"]:
        assert set(p) == {"path", "label", "probability", "top_k"} and len(p["top_k"]) == 3
    errors = {Path(e["path"]).name: e["error"] for e in result["errors"]}
    assert set(errors) == {"broken.jpg", "missing.png"}
    assert "truncated" in errors["broken.jpg"] and "no such file" in errors["missing.png"]
    assert "2 of 5 inputs could not be predicted" in r.stderr and "Traceback" not in r.stderr

    rows = list(csv.DictReader(out_csv.open()))
    assert [Path(row["path"]).name for row in rows][:3] == [Path(p["path"]).name for p in result["predictions"]]
    by_name = {Path(row["path"]).name: row for row in rows}
    for p in result["predictions"]:
        row = by_name[Path(p["path"]).name]
        assert row["label"] == p["label"] and row["top3_label"] == p["top_k"][2]["label"]
        assert abs(float(row["probability"]) - p["probability"]) < 1e-6 and row["error"] == ""
    assert "truncated" in by_name["broken.jpg"]["error"] and by_name["broken.jpg"]["label"] == ""


def test_cli_human_output_and_usage_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    (tmp_path / "a.png").write_bytes(_cases()["rgb.png"][0])
    assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--top-k", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(str(tmp_path / "a.png")) and out[0].count("%") == 2
    assert main(["predict", str(checkpoint), str(tmp_path / "a.png"), "--top-k", "0"]) == 2
    assert main(["predict", str(checkpoint)]) == 2
    assert main(["predict", str(tmp_path / "nope.pt"), str(tmp_path / "a.png")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# ---- names of any bytes, and outputs that are not finite (issue 16) --------------------------------------------------

ODD = b"caf\xe9 \x1b[31m.png"  # a byte that is not UTF-8 and an escape code: '\udce9' and '\x1b' in Python's str


def odd_names_folder(tmp_path: Path) -> Path:
    """A folder with three images: one named with non-UTF-8 bytes and an escape code, one 'café.png', one plain."""
    folder = tmp_path / "names"
    folder.mkdir()
    data = _cases()["rgb.png"][0]
    with open(os.fsencode(folder) + b"/" + ODD, "wb") as f:
        f.write(data)
    (folder / "café.png").write_bytes(data)
    (folder / "plain.png").write_bytes(data)
    return folder


def test_file_names_of_any_bytes_in_plain_json_and_csv_output(checkpoint: Path, tmp_path: Path):
    folder = odd_names_folder(tmp_path)
    odd = f"{folder}/caf\\xe9 \\x1b[31m.png"  # as every output shows it: \xNN for the byte and the control character
    missing = os.fsdecode(os.fsencode(tmp_path) + b"/gone\xff.png")
    strict = {"PYTHONIOENCODING": "utf-8:strict"}  # a stream that refuses surrogates, as under a UTF-8 locale
    plain = run_cli("predict", str(checkpoint), str(folder), "--top-k", "1", env=strict)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{folder}/caf") and odd in plain.stdout
    assert f"{folder}/café.png\t" in plain.stdout and "\x1b" not in plain.stdout

    out_csv = tmp_path / "p.csv"
    both = run_cli("predict", str(checkpoint), str(folder), missing, "--json", "--csv", str(out_csv), env=strict)
    assert both.returncode == 1 and "Traceback" not in both.stderr, both.stderr
    assert f"{tmp_path}/gone\\xff.png: no such file or folder" in both.stderr
    assert "\\ud" not in both.stdout  # no lone surrogate escapes: strict JSON parsers (RFC 7493) refuse them
    result = json.loads(both.stdout)
    assert {p["path"] for p in result["predictions"]} == {odd, f"{folder}/café.png", f"{folder}/plain.png"}
    assert [e["path"] for e in result["errors"]] == [f"{tmp_path}/gone\\xff.png"]
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8", errors="strict", newline="")))
    assert [r["path"] for r in rows] == [p["path"] for p in result["predictions"]] + [result["errors"][0]["path"]]


@pytest.mark.parametrize("env", [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "LANG": "C"}], ids=["ascii", "C"])
def test_a_non_ascii_name_prints_on_a_narrow_terminal(checkpoint: Path, tmp_path: Path, env: dict):
    folder = odd_names_folder(tmp_path)
    r = run_cli("predict", str(checkpoint), str(folder), str(tmp_path / "nè.png"), "--top-k", "1", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stdout.splitlines()) == 3 and "caf\\xe9 \\x1b[31m.png" in r.stdout
    assert "caf\\xe9.png" in r.stdout or "café.png" in r.stdout  # é escaped where the encoding cannot hold it
    assert len(r.stderr.splitlines()) == 2 and ".png: no such file or folder" in r.stderr


def overflowing_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint with its fully connected weights multiplied by 1e38: finite weights (loading accepts
    them) whose activations overflow to infinity, so the logits come out NaN."""
    ckpt = torch.load(checkpoint, weights_only=True)
    for key, value in ckpt["model_state"].items():
        if key.endswith("weight") and value.ndim == 2:
            ckpt["model_state"][key] = value * 1e38
    path = tmp_path / "overflow.pt"
    torch.save(ckpt, path)
    return path


def strict_json_refuses(name: str) -> None:
    raise AssertionError(f"{name} in JSON output")


def test_non_finite_outputs_are_an_error_of_each_file_not_nan(checkpoint: Path, tmp_path: Path):
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(_cases()["rgb.png"][0])
    bad = overflowing_checkpoint(checkpoint, tmp_path)
    out_csv = tmp_path / "p.csv"
    r = run_cli("predict", str(bad), str(tmp_path / "in"), "--json", "--csv", str(out_csv))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    result = json.loads(r.stdout, parse_constant=strict_json_refuses)  # NaN, Infinity: not JSON
    assert ": null" not in r.stdout
    assert result["predictions"] == [] and [Path(e["path"]).name for e in result["errors"]] == ["a.png", "b.png"]
    assert all(e["error"] == f"{e['path']}: {NON_FINITE}" for e in result["errors"])
    assert "2 of 2 inputs could not be predicted" in r.stderr.splitlines()[-1]
    assert all("non-finite outputs" in row["error"] and row["label"] == "" for row in csv.DictReader(out_csv.open()))
    plain = run_cli("predict", str(bad), str(tmp_path / "in" / "a.png"))
    assert plain.returncode == 1 and plain.stdout == "" and "a.png: the model produced non-finite" in plain.stderr


class HalfBroken(BasePredictor):
    """A fake model: NaN logits for images whose first pixel is 0, +inf for 1, finite logits otherwise."""

    classes, mean, std, input_size, batch_size = ["x", "y", "z"], (0.5,) * 3, (0.25,) * 3, 8, 4

    def logits(self, images: np.ndarray) -> np.ndarray:
        out = np.tile(np.array([[1.0, 3.0, 2.0]], np.float32), (len(images), 1))
        first = images[:, 0, 0, 0]
        out[first == 0, 1] = np.nan
        out[first == 1, 2] = np.inf
        return out


def test_non_finite_rows_fail_alone_and_the_rest_are_predicted(tmp_path: Path):
    model = HalfBroken()
    files = []
    for i, first in enumerate([5, 0, 9, 1, 7, 0]):  # two batches of 4 and 2
        pixels = np.full((8, 8, 3), 200, np.uint8)
        pixels[0, 0, 0] = first
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(pixels).save(files[-1])
    report = model.predict_files(files, top_k=2)
    assert [Path(p["path"]).name for p in report.predictions] == ["0.png", "2.png", "4.png"]
    assert all(p["label"] == "y" and np.isfinite(p["probability"]) for p in report.predictions)
    assert [Path(e["path"]).name for e in report.errors] == ["1.png", "3.png", "5.png"]
    assert all(e["error"] == f"{e['path']}: {NON_FINITE}" for e in report.errors)
    with pytest.raises(NonFiniteOutput, match=r"^bad\.png: the model produced non-finite outputs"):
        model.predict_bytes(files[1].read_bytes(), "bad.png")
    with pytest.raises(NonFiniteOutput, match=r"^image 2 of 3: "):
        model.predict(np.stack([np.full((3, 8, 8), v, np.uint8) for v in (4, 1, 0)]))
