"""The decode cache (cifar_cnn.data.store): decoded once, memory-mapped, rebuilt when damaged or of another format,
an interrupted decode continued, one decode shared by processes that start together, a read-only data home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn.data import load_dataset
from cifar_cnn.data.dataset import ImageSet, center_box
from cifar_cnn.data.store import STORE_FORMAT
from cifar_cnn.data.stream import random_resized_boxes
from tests.conftest import ROOT, run_cli
from tests.helpers import quiet, small_config


def write_tree(root: Path, per_class: int, size: tuple[int, int] = (40, 30), fmt: str = "png", seed: int = 0) -> Path:
    """ROOT/{train,test}/{a,b}/NNNN.<fmt>: random images of `size` (w, h); class b is brighter."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", max(2, per_class // 4))):
        for c, cls in enumerate(("a", "b")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 156, (size[1], size[0], 3), dtype=np.uint8) + 100 * c
                Image.fromarray(pixels).save(folder / f"{i:04d}.{fmt}")
    return root


def store_dirs(home: Path) -> list[Path]:
    return sorted(p for p in (home / "cache").glob("store-*") if p.is_dir())


def lines(log: list[str], text: str) -> list[str]:
    return [m for m in log if text in m]


def test_second_load_reads_the_store_and_a_changed_source_is_decoded_again(tmp_path: Path, data_home: Path) -> None:
    tree = write_tree(tmp_path / "tree", 6)
    log: list[str] = []
    first = load_dataset(str(tree), 32, log=log.append)
    assert len(lines(log, f"decoded {tree}")) == 1 and len(store_dirs(data_home)) == 1
    log.clear()
    again = load_dataset(str(tree), 32, log=log.append)
    assert not lines(log, f"decoded {tree}")  # read from the store
    assert first.fingerprint() == again.fingerprint()
    assert np.array_equal(first.train_images[:], again.train_images[:])
    # a changed image file: decoded again, into a store of its own
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tree / "train" / "a" / "0000.png")
    os.utime(tree / "train" / "a" / "0000.png", ns=(1, 1))
    changed = load_dataset(str(tree), 32, log=log.append)
    assert len(lines(log, f"decoded {tree}")) == 1 and changed.fingerprint() != first.fingerprint()


def test_images_are_stored_at_their_aspect_and_cropped_to_the_training_size(tmp_path: Path) -> None:
    tree = write_tree(tmp_path / "tree", 3, size=(80, 40))  # w=80, h=40
    ds = load_dataset(str(tree), 32, storage="disk", log=quiet)
    assert isinstance(ds.train_images, ImageSet) and ds.train_images.on_disk
    assert ds.train_images.stored_shapes().tolist() == [[32, 64]] * 6  # shorter side 32, aspect kept
    stored = ds.train_images.image(0)
    top, left, h, w = center_box(32, 64)
    assert np.array_equal(ds.train_images[0], stored[:, top : top + h, left : left + w])  # evaluation: centre square
    small = load_dataset(str(write_tree(tmp_path / "small", 3, size=(20, 12))), 32, log=(log := []).append)
    assert small.train_images.stored_shapes().tolist() == [[12, 20]] * 6  # never stored larger than it is
    assert small.train_images[:].shape == (6, 3, 32, 32)
    assert lines(log, "10 images are smaller than 32 px on their shorter side and are upscaled")


def test_truncated_pixel_file_is_rebuilt_with_a_message(tmp_path: Path, data_home: Path) -> None:
    tree = write_tree(tmp_path / "tree", 5)
    good = load_dataset(str(tree), 32, log=quiet).fingerprint()
    (pixels := store_dirs(data_home)[0] / "pixels.u8").write_bytes(pixels.read_bytes()[:1000])
    log: list[str] = []
    again = load_dataset(str(tree), 32, log=log.append)
    assert lines(log, "its pixel file is truncated (1000 of") and lines(log, "decoding the source again")
    assert again.fingerprint() == good


def test_store_written_by_another_format_is_rebuilt_with_a_message(tmp_path: Path, data_home: Path) -> None:
    tree = write_tree(tmp_path / "tree", 5)
    good = load_dataset(str(tree), 32, log=quiet).fingerprint()
    index = store_dirs(data_home)[0] / "index.npz"
    with np.load(index) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    np.savez(index, meta=np.array(json.dumps({**meta, "format": STORE_FORMAT - 1})), **arrays)
    log: list[str] = []
    assert load_dataset(str(tree), 32, log=log.append).fingerprint() == good
    assert lines(log, f"written by another version of cifar-cnn (cache format {STORE_FORMAT - 1}")
    with np.load(store_dirs(data_home)[0] / "index.npz") as z:
        assert json.loads(str(z["meta"]))["format"] == STORE_FORMAT  # rewritten in this version's format


def test_on_disk_and_in_memory_training_are_identical(tmp_path: Path) -> None:
    """The streaming loader over the memory map gives the very batches the in-memory loader gives: same weights."""
    from cifar_cnn import train

    tree = write_tree(tmp_path / "tree", 20, size=(32, 32))
    states = {}
    for storage in ("memory", "disk"):
        cfg = small_config(epochs=1, image_storage=storage, flip=True, translate=2, precision="fp32")
        result = train(cfg, str(tree), out=str(tmp_path / storage), log=quiet)
        states[storage] = torch.load(Path(result.run_dir) / "last.pt", weights_only=True)["model_state"]
    assert states["memory"].keys() == states["disk"].keys()
    assert all(torch.equal(states["memory"][k], states["disk"][k]) for k in states["memory"])


def test_random_resized_boxes_respect_scale_ratio_and_bounds() -> None:
    rng = np.random.default_rng(0)
    shapes = np.array([[40, 60]] * 500 + [[32, 32]] * 500)
    boxes = random_resized_boxes(shapes, (0.25, 0.5), (0.75, 4 / 3), rng)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= shapes[:, 0]).all() and (left + w <= shapes[:, 1]).all()
    area = h * w / (shapes[:, 0] * shapes[:, 1])
    assert area.min() > 0.2 and area.max() < 0.56  # within the scale range, give or take rounding
    assert (w / h).min() > 0.7 and (w / h).max() < 1.4
    assert len({tuple(b) for b in boxes[:500]}) > 400  # random placement, not one box
    again = random_resized_boxes(shapes, (0.25, 0.5), (0.75, 4 / 3), np.random.default_rng(0))
    assert np.array_equal(boxes, again)
    # a ratio range the image cannot hold: the fallback, the centred crop at the nearest allowed ratio
    wide = random_resized_boxes(np.array([[10, 100]]), (0.99, 1.0), (1.0, 1.0), rng)
    assert wide.tolist() == [[0, 45, 10, 10]]


def test_random_resized_crop_trains_from_the_stream(tmp_path: Path) -> None:
    from cifar_cnn import train

    tree = write_tree(tmp_path / "tree", 8, size=(48, 36))
    cfg = small_config(epochs=1, crop_scale=(0.35, 1.0), image_size=32)
    result = train(cfg, str(tree), out=str(tmp_path / "run"), log=quiet)
    assert result.history and np.isfinite(result.history[0]["train_loss"])


def _spawn_data(tree: Path, home: Path) -> subprocess.Popen:
    env = {**os.environ, "CIFAR_CNN_HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_cnn", "data", "--data", str(tree), "--threads", "1", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_interrupted_decode_continues_where_it_stopped(tmp_path: Path, data_home: Path) -> None:
    tree = write_tree(tmp_path / "tree", 1000, size=(128, 128), fmt="png")  # ~10 chunks: seconds of decoding
    proc = _spawn_data(tree, data_home)
    deadline = time.time() + 120
    status = None
    while time.time() < deadline and proc.poll() is None:  # kill -9 once a first chunk is marked done
        found = list((data_home / "cache").glob("store-*/status.u8"))
        if found and (status := np.fromfile(found[0], dtype=np.uint8)).any() and not status.all():
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert status is not None and 0 < int(status.sum()) < len(status), "the decode finished before it was killed"
    again = run_cli("data", "--data", str(tree), "--json")
    assert again.returncode == 0, again.stderr
    assert "continuing the interrupted decode" in again.stderr
    resumed = load_dataset(str(tree), 32, log=quiet)
    fresh = load_dataset(str(tree), 32, home=tmp_path / "fresh", log=quiet)
    assert resumed.fingerprint() == fresh.fingerprint()


def test_processes_starting_together_share_one_decode(tmp_path: Path, data_home: Path) -> None:
    tree = write_tree(tmp_path / "tree", 400, size=(96, 96), fmt="jpg")
    procs = [_spawn_data(tree, data_home) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    decoded = [err for _, err in outs if f"decoded {tree}" in err]
    assert len(decoded) == 1, outs  # one process decoded; the other waited for it or read its store
    assert json.loads(outs[0][0]) == json.loads(outs[1][0])
    assert len(store_dirs(data_home)) == 1


def test_read_only_data_home(tmp_path: Path, small_disk) -> None:
    tree = write_tree(tmp_path / "tree", 5)
    home = small_disk(16 * 1024 * 1024)
    env = {"CIFAR_CNN_HOME": str(home)}
    subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    # nothing cached yet: decoded into memory, with a warning
    proc = run_cli("data", "--data", str(tree), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "cannot write the decode cache" in proc.stderr and json.loads(proc.stdout)["train_images"] == 10
    # --on-disk needs the cache: one line naming the data home and what to do
    proc = run_cli("data", "--data", str(tree), "--on-disk", env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"data home {home}" in proc.stderr and "CIFAR_CNN_HOME" in proc.stderr
    # a store written before the home became read-only is used as it is
    subprocess.run(["mount", "-o", "remount,rw", str(home)], check=True)
    assert run_cli("data", "--data", str(tree), env=env).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(home)], check=True)
    proc = run_cli("data", "--data", str(tree), "--on-disk", "--json", env=env)
    assert proc.returncode == 0 and f"decoded {tree}" not in proc.stderr and "warning" not in proc.stderr, proc.stderr


def test_where_the_pixels_are_held_does_not_change_the_fingerprint(tmp_path: Path) -> None:
    from cifar_cnn.data import DataSource

    root = tmp_path / "photos"
    (root / "p").mkdir(parents=True)
    rows = []
    for i in range(12):
        Image.fromarray(np.full((32, 32, 3), 20 * i, np.uint8)).save(root / "p" / f"{i}.png")
        rows.append(f"p/{i}.png,{'ab'[i % 2]}\n")
    (root / "labels.csv").write_text("path,label\n" + "".join(rows))
    source = DataSource.of(str(root), labels=str(root / "labels.csv"))
    in_memory = load_dataset(source, 32, storage="memory", log=quiet)
    on_disk = load_dataset(source, 32, storage="disk", log=quiet)
    assert isinstance(in_memory.train_images, np.ndarray) and isinstance(on_disk.train_images, ImageSet)
    assert in_memory.fingerprint() == on_disk.fingerprint()


def test_skip_reasons_survive_an_interrupted_decode(tmp_path: Path) -> None:
    """With --skip-bad, an image found unreadable before an interruption is still reported after the resume."""
    import io

    from cifar_cnn.data.store import CHUNK, Entry, build_store, read_store

    def good() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    blob = good()
    broken = blob[:40]  # a PNG header with its data cut off: readable header, unreadable image
    stop = {"now": True, "calls": 0}

    def interrupting() -> bytes:
        stop["calls"] += 1
        if stop["now"] and stop["calls"] > 1:  # the header scan reads it once; then Ctrl-C in the second chunk
            raise KeyboardInterrupt
        return blob

    entries = [Entry(f"img{i}", (lambda: blob), i % 2, 0, True) for i in range(CHUNK + 20)]
    entries[3] = Entry("img3", (lambda: broken), 1, 0, True)
    entries[CHUNK + 5] = Entry("img-late", interrupting, 1, 0, True)
    folder = tmp_path / "store"
    kw = dict(stamp="s1", threads=1, what="test", log=quiet, skipped=["labels.csv:9: gone.png: no such file"])
    with pytest.raises(KeyboardInterrupt):
        build_store(folder, entries, ["a", "b"], 8, **kw)
    assert not (folder / "index.npz").exists() and (folder / "status.u8").exists()
    stop["now"] = False
    log: list[str] = []
    build_store(folder, entries, ["a", "b"], 8, **{**kw, "log": log.append})
    assert lines(log, f"{CHUNK} of {CHUNK + 20} images done")
    store = read_store(folder, "s1")
    skipped = store.meta["skipped"]
    assert len(skipped) == 2 and any(m.startswith("img3: ") for m in skipped), skipped
    assert len(store.labels) == CHUNK + 19  # img3 left out
