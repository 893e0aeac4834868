"""Training from the on-disk decode cache under a memory limit, against the same model on an in-memory subset.

The issue's target: a data set whose decoded size is 3x the memory allowed to the process trains at >= 80% of the
img/s of the same model trained on an in-memory subset. This script

1. writes a synthetic image-folder data set (JPEG files; each class its own colour and stripe pattern, plus noise)
   whose decoded training images take `--data-factor` (3) times `--limit-mib`, into `--work` (reused when there);
2. decodes it once into the decode cache (`load_dataset(..., storage="disk")`; not timed);
3. limits memory, in this order of preference: a cgroup v2 `memory.max`, a cgroup v1 `memory.limit_in_bytes` (both
   charge the page cache to the cgroup, so the memory-mapped pixels count against the limit), else no limit and the
   cache file's pages dropped from the page cache (posix_fadvise DONTNEED) at every epoch start;
4. alternates, `--rounds` times, a child that trains from the memory-mapped store (StreamLoader, random order) under
   the limit and a child (no limit) that trains the same model on an in-memory subset (TensorLoader), with the same
   batch size and number of steps; both through the package's `build_loader`, `build_model` and `train_one_epoch`;
5. prints a summary and writes a JSON: both img/s (median over rounds), their ratio, peak anonymous RSS, the cgroup's
   peak, bytes read from disk, the method used and the machine.

Each on-disk child starts from a cold page cache (the store's pages dropped first), so every image it reads is read
from disk unless the kernel's read-around brought it in: the ratio is a lower bound for a long run.

    python benchmarks/memory_bench.py --limit-mib 1024 --image-size 64

The child processes are this same file run with `--child SPEC.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

N_CLASSES = 10
DATA_FORMAT = 1  # bump when the synthetic images change, so an old work folder is rewritten
METHODS = ("auto", "cgroup2", "cgroup1", "fadvise")


# --------------------------------------------------------------------------------------------------------------------
# the synthetic data set


def class_images(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, size, size, 3) images a model can tell apart: each class has its own base colour and its own stripe
    orientation and frequency; the phase, brightness and pixel noise are random per image."""
    n = len(labels)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = labels * (np.pi / N_CLASSES)
    freq = 2.0 + (labels % 4) * 1.5
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = np.sin(
        2 * np.pi * freq[:, None, None] * (np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy)
        + phase[:, None, None]
    )
    hue = labels / N_CLASSES * 2 * np.pi
    base = 0.5 + 0.35 * np.stack([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)], axis=1)  # (n, 3)
    bright = rng.uniform(0.7, 1.1, n)
    img = base[:, None, None, :] * bright[:, None, None, None] * (0.75 + 0.25 * wave[..., None])
    img = img * 255 + rng.normal(0, 18, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_chunk(root: str, split: str, lo: int, hi: int, size: int, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng([seed, lo, 0 if split == "train" else 1])
    labels = np.arange(lo, hi) % N_CLASSES
    for i, (label, img) in enumerate(zip(labels, class_images(labels, size, rng))):
        Image.fromarray(img).save(f"{root}/{split}/c{label}/{lo + i:07d}.jpg", quality=90)


def write_dataset(root: Path, n_train: int, n_test: int, size: int, workers: int, log: Callable[[str], None]) -> None:
    """The image-folder tree root/{train,test}/c<k>/NNNNNNN.jpg, unless root already holds this very one."""
    spec = {"format": DATA_FORMAT, "n_train": n_train, "n_test": n_test, "size": size, "classes": N_CLASSES}
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        log(f"reusing the synthetic data set in {root}")
        return
    shutil.rmtree(root, ignore_errors=True)
    for split in ("train", "test"):
        for k in range(N_CLASSES):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    chunk = 2048
    jobs = [("train", lo, min(lo + chunk, n_train)) for lo in range(0, n_train, chunk)]
    jobs += [("test", lo, min(lo + chunk, n_test)) for lo in range(0, n_test, chunk)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(_write_chunk, str(root), s, lo, hi, size, 0) for s, lo, hi in jobs]:
            future.result()
    marker.write_text(json.dumps(spec))
    log(f"wrote {n_train} + {n_test} JPEG files ({size} px) into {root} in {time.perf_counter() - t0:.0f}s")


# --------------------------------------------------------------------------------------------------------------------
# memory limits


def own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path: of the v1 hierarchy with `controller`, or of the v2 one (controller None)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, ctrls, path = line.split(":", 2)
        if controller is None and hid == "0" and ctrls == "":
            return path
        if controller is not None and controller in ctrls.split(","):
            return path
    return None


def cgroup_mounts() -> dict[str, list[tuple[Path, list[str]]]]:
    """{'cgroup2': [(mount point, [])], 'cgroup': [(mount point, [controllers])]} from /proc/self/mountinfo."""
    found: dict[str, list[tuple[Path, list[str]]]] = {"cgroup2": [], "cgroup": []}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _src, opts = right.split()[:3]
        if fstype in found:
            found[fstype].append((Path(left.split()[4]), opts.split(",")))
    return found


class Limit:
    """A memory limit for the on-disk child: a cgroup made for it (v2 or v1), or none (method 'fadvise')."""

    def __init__(self, method: str, folder: Path | None = None, why_not: list[str] | None = None) -> None:
        self.method, self.folder, self.why_not = method, folder, why_not or []

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroup from its first instruction: a shell joins it, then execs the command."""
        if self.folder is None:
            return argv
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.folder), *argv]

    def _read(self, name: str) -> str | None:
        try:
            return (self.folder / name).read_text().strip() if self.folder else None
        except OSError:
            return None

    def usage_file(self) -> str | None:
        if self.folder is None:
            return None
        return str(self.folder / ("memory.current" if self.method == "cgroup2" else "memory.usage_in_bytes"))

    def reset_peak(self) -> None:
        name = "memory.peak" if self.method == "cgroup2" else "memory.max_usage_in_bytes"
        try:
            if self.folder:
                (self.folder / name).write_text("0")
        except OSError:
            pass  # memory.peak is resettable only on recent kernels; then it is the peak since the cgroup was made

    def stats(self) -> dict[str, Any]:
        """What the cgroup says after a child: its peak usage, how often it hit the limit, its memory.stat."""
        if self.folder is None:
            return {}
        stat = {}
        for line in (self._read("memory.stat") or "").splitlines():
            key, _, value = line.partition(" ")
            if value.isdigit():
                stat[key] = int(value)
        if self.method == "cgroup2":
            events = dict(line.split() for line in (self._read("memory.events") or "").splitlines())
            peak = self._read("memory.peak")
            return {
                "peak_bytes": int(peak) if peak and peak.isdigit() else None,
                "limit_hits": int(events.get("max", 0)),
                "file_bytes": stat.get("file"),
                "anon_bytes": stat.get("anon"),
            }
        peak, fails = self._read("memory.max_usage_in_bytes"), self._read("memory.failcnt")
        return {
            "peak_bytes": int(peak) if peak else None,
            "limit_hits": int(fails) if fails else None,  # failcnt: charges that hit the limit (reclaim ran)
            "file_bytes": stat.get("cache"),
            "anon_bytes": stat.get("rss"),
        }

    def remove(self) -> None:
        if self.folder is None:
            return
        for _ in range(50):  # a child that just exited may take a moment to leave
            try:
                self.folder.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove cgroup {self.folder}; remove it with rmdir", file=sys.stderr)


def _try_cgroup2(limit: int, name: str) -> Limit | str:
    mounts = cgroup_mounts()["cgroup2"]
    path = own_cgroup(None)
    if not mounts or path is None:
        return "no cgroup v2 hierarchy"
    base = mounts[0][0] / path.lstrip("/")
    controllers = (base / "cgroup.controllers").read_text().split() if (base / "cgroup.controllers").exists() else []
    if "memory" not in controllers:
        have = " ".join(controllers) or "none"
        return f"cgroup v2 at {mounts[0][0]}: the memory controller is not available (controllers: {have})"
    folder = base / name
    try:
        folder.mkdir()
    except OSError as exc:
        return f"cgroup v2: cannot make {folder} ({exc.strerror})"
    if not (folder / "memory.max").exists():
        try:
            (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as exc:
            folder.rmdir()
            return f"cgroup v2: cannot enable the memory controller under {base} ({exc.strerror})"
    try:
        (folder / "memory.max").write_text(str(limit))
        if (folder / "memory.swap.max").exists():
            (folder / "memory.swap.max").write_text("0")
    except OSError as exc:
        folder.rmdir()
        return f"cgroup v2: cannot set memory.max ({exc.strerror})"
    return Limit("cgroup2", folder)


def _try_cgroup1(limit: int, name: str) -> Limit | str:
    mounts = [m for m, opts in cgroup_mounts()["cgroup"] if "memory" in opts]
    path = own_cgroup("memory")
    if not mounts or path is None:
        return "no cgroup v1 memory hierarchy"
    folder = mounts[0] / path.lstrip("/") / name  # below this process's own cgroup: its limits still apply
    try:
        folder.mkdir()
        (folder / "memory.limit_in_bytes").write_text(str(limit))
        if int((folder / "memory.limit_in_bytes").read_text()) > limit:
            raise OSError(0, "the limit did not hold")
    except OSError as exc:
        if folder.exists():
            folder.rmdir()
        return f"cgroup v1: cannot make {folder} with a limit ({exc.strerror})"
    return Limit("cgroup1", folder)


def make_limit(method: str, limit: int) -> Limit:
    """The first memory-limiting method that works here (or the one asked for); why the earlier ones did not."""
    name = f"cifar-cnn-memory-bench-{os.getpid()}"
    why_not: list[str] = []
    for candidate, attempt in (("cgroup2", _try_cgroup2), ("cgroup1", _try_cgroup1)):
        if method in ("auto", candidate):
            found = attempt(limit, name)
            if isinstance(found, Limit):
                found.why_not = why_not
                return found
            why_not.append(found)
    if method not in ("auto", "fadvise"):
        raise SystemExit(f"--method {method}: not usable here: {'; '.join(why_not)}")
    return Limit("fadvise", None, why_not)


def drop_from_page_cache(path: str) -> None:
    """Evict a file's clean pages from the page cache (pages mapped by a live process stay)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------------
# the machine


def machine() -> dict[str, Any]:
    names = [
        line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line
    ]
    cpu = names[0] if names else platform.processor()
    mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    import torch

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def read_ahead_kb(path: Path) -> int | None:
    """The block device's read-ahead, which is also how far a page fault on a memory map reads around."""
    dev = os.stat(path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (queue / "queue", queue.resolve().parent / "queue"):
        if (q / "read_ahead_kb").exists():
            return int((q / "read_ahead_kb").read_text())
    return None


# --------------------------------------------------------------------------------------------------------------------
# a child: one timed training (or loader-only) run


class MemorySampler(threading.Thread):
    """Samples this process's RssAnon / RssFile / VmHWM (and a cgroup's usage) every `every` seconds; keeps peaks."""

    FIELDS = ("RssAnon", "RssFile", "VmHWM")

    def __init__(self, usage_file: str | None, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.usage_file, self.every = usage_file, every
        self.peaks: dict[str, int] = {k: 0 for k in (*self.FIELDS, "cgroup_usage")}
        self.stop = threading.Event()

    def sample(self) -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in self.FIELDS:
                self.peaks[key] = max(self.peaks[key], int(value.split()[0]) * 1024)
        if self.usage_file:
            with contextlib.suppress(OSError, ValueError):
                self.peaks["cgroup_usage"] = max(self.peaks["cgroup_usage"], int(Path(self.usage_file).read_text()))

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()


def io_counters() -> dict[str, int]:
    """Disk bytes this process caused to be read (/proc/self/io) and its major page faults."""
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"read_bytes": int(io["read_bytes"]), "major_faults": ru.ru_majflt}


class TimedLoader:
    """A loader that counts the time the training loop waits for each batch (the part of a step that is data)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.wait = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Any, Any]]:
        it = iter(self.inner.batches(epoch, start))
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait.append(time.perf_counter() - t0)
            yield item


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Train (or only read batches) for spec['steps'] steps; the timings and memory figures."""
    sampler = MemorySampler(spec.get("usage_file"))
    sampler.start()
    import torch

    from cifar_cnn.config import TrainConfig
    from cifar_cnn.data import DataSource, Splits, load_dataset
    from cifar_cnn.data.split import stratified_subset
    from cifar_cnn.device import resolve_precision
    from cifar_cnn.distributed import DistContext
    from cifar_cnn.engine.loop import make_lr_fn, optimizer_for, train_one_epoch
    from cifar_cnn.engine.state import RunData, build_loader, build_model
    from cifar_cnn.models import model_info

    torch.set_num_threads(spec["threads"])
    mode, size, batch = spec["mode"], spec["image_size"], spec["batch_size"]
    quiet = lambda _m: None  # noqa: E731
    ds = load_dataset(spec["data"], size, storage="disk", home=Path(spec["home"]), log=quiet)
    pixels_file = ds.train_images.pixels.filename
    images, labels = ds.train_images, ds.train_labels
    if mode == "memory":  # a stratified subset, read into memory: a uint8 array, as storage="memory" gives
        idx = np.sort(stratified_subset(labels, spec["subset"], 0))
        images, labels = np.ascontiguousarray(images[idx]), labels[idx]
    elif spec.get("madvise") == "random":  # an experiment: no read-around on page faults of the memory map
        import mmap

        images.pixels._mmap.madvise(mmap.MADV_RANDOM)
    config = TrainConfig(
        model=spec["model"],
        model_args=spec["model_args"],
        batch_size=batch,
        flip=True,
        seed=0,
        val_split=0.0,
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        image_size=size,
        channels_last=True,
    )
    info = model_info(config.model)
    empty = np.zeros(0, dtype=np.int64)
    splits = Splits(
        images,
        labels,
        images[:0] if mode == "memory" else images.take(empty),
        labels[:0],
        ds.test_images,
        ds.test_labels,
        list(ds.classes),
    )
    data = RunData(DataSource(spec["data"]), {}, splits, size, info.mean, info.std, "model")
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    channels_last = precision != "fp32"
    loader = TimedLoader(build_loader(config, data, precision, device, DistContext()))
    loader_kind = type(loader.inner).__name__
    steps, warmup = spec["steps"], spec["warmup"]
    marks: list[float] = []
    epochs = 0
    if spec["fadvise_each_epoch"]:
        drop_from_page_cache(pixels_file)
    t_start = time.perf_counter()
    io_at: dict[str, dict[str, int]] = {}
    if spec["loader_only"]:
        while len(marks) < steps:
            for _ in loader.batches(epochs):
                marks.append(time.perf_counter())
                if len(marks) == warmup:
                    io_at["warm"] = io_counters()
                if len(marks) >= steps:
                    break
            epochs += 1
        correct_fraction = None
    else:
        first = lambda: loader.inner.sample(2000) if hasattr(loader.inner, "sample") else loader.inner.images[:2000]  # noqa: E731
        model, _ = build_model(config, data, first, None, None, quiet)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = optimizer_for(model, config, len(loader))
        peak_lrs = [g["lr"] for g in optimizer.param_groups]
        lr_fn = make_lr_fn(config, len(loader))
        totals_seen = [0, 0]

        def on_step(step: int, totals: Any) -> bool:
            marks.append(time.perf_counter())
            if len(marks) == warmup:
                io_at["warm"] = io_counters()
            if len(marks) > warmup:
                totals_seen[:] = [totals.correct, totals.seen]
            return len(marks) >= steps

        while len(marks) < steps:
            if spec["fadvise_each_epoch"] and epochs:
                drop_from_page_cache(pixels_file)
            train_one_epoch(
                model,
                loader,
                optimizer,
                epoch=epochs,
                lr_fn=lr_fn,
                peak_lrs=peak_lrs,
                device=device,
                precision=precision,
                channels_last=channels_last,
                on_step=on_step,
            )
            epochs += 1
        correct_fraction = totals_seen[0] / max(1, totals_seen[1])
    io_end = io_counters()
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    timed = marks[warmup - 1 :] if warmup else [t_start, *marks]
    seconds = timed[-1] - timed[0]
    n_images = (len(timed) - 1) * batch
    waits = loader.wait[warmup:]
    return {
        "mode": mode,
        "loader_only": spec["loader_only"],
        "loader": loader_kind,
        "precision": precision,
        "train_images": len(labels),
        "steps_timed": len(timed) - 1,
        "seconds": seconds,
        "img_per_s": n_images / seconds,
        "median_step_s": statistics.median(np.diff(timed).tolist()),
        "data_wait_fraction": sum(waits) / seconds,
        "epochs_started": epochs,
        "train_accuracy_timed_steps": correct_fraction,
        "rss_anon_peak_bytes": sampler.peaks["RssAnon"],
        "rss_file_peak_bytes": sampler.peaks["RssFile"],
        "vm_hwm_bytes": sampler.peaks["VmHWM"],
        "cgroup_usage_peak_sampled_bytes": sampler.peaks["cgroup_usage"] or None,
        "disk_read_bytes_timed": io_end["read_bytes"] - io_at.get("warm", io_end)["read_bytes"],
        "image_bytes_timed": n_images * 3 * size * size,
        "major_faults_timed": io_end["major_faults"] - io_at.get("warm", io_end)["major_faults"],
        "madvise": spec.get("madvise", "none") if mode == "disk" else None,
    }


# --------------------------------------------------------------------------------------------------------------------
# the parent


def start_child(spec: dict[str, Any], work: Path, limit: Limit | None) -> dict[str, Any]:
    name = f"{spec['mode']}{'-loader' if spec['loader_only'] else ''}-{time.monotonic_ns()}"
    spec_file, out_file = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_file), "--child-out", str(out_file)]
    if limit is not None:
        argv = limit.wrap(argv)
        limit.reset_peak()
    done = subprocess.run(argv, capture_output=True, text=True)
    spec_file.unlink(missing_ok=True)
    if done.returncode != 0:
        killed = " (killed: out of memory under the limit?)" if done.returncode in (-9, 137) else ""
        raise SystemExit(f"the {spec['mode']} child failed with exit code {done.returncode}{killed}:\n{done.stderr}")
    result = json.loads(out_file.read_text())
    out_file.unlink()
    if limit is not None:
        result["cgroup"] = limit.stats()
    return result


def summarize(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--limit-mib", type=float, default=1024, help="memory allowed to the on-disk child (MiB)")
    p.add_argument("--data-factor", type=float, default=3.0, help="decoded training images = this x the limit")
    p.add_argument("--image-size", type=int, default=64, help="side of the images (px)")
    p.add_argument("--test-images", type=int, default=1000, help="images in the test split (not trained on)")
    p.add_argument("--model", default="resnet18", help="registered model (one that takes any image size)")
    p.add_argument("--model-args", default='{"width": 4}', help="model keyword arguments, JSON")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="training steps per child, warm-up included")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--rounds", type=int, default=2, help="on-disk / in-memory pairs, alternated (medians reported)")
    p.add_argument("--subset-fraction", type=float, default=0.1, help="the in-memory subset, of the training images")
    p.add_argument("--loader-steps", type=int, default=100, help="steps of a loader-only on-disk child (0: none)")
    p.add_argument(
        "--madvise",
        choices=("none", "random"),
        default="none",
        help="experiment: madvise the memory map MADV_RANDOM in the on-disk children",
    )
    p.add_argument("--method", choices=METHODS, default="auto", help="how to limit memory (auto: the first that works)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads in each child")
    p.add_argument("--work", type=Path, default=Path("/tmp/work/memory-bench"), help="data set, data home, results")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: WORK/memory_bench.json)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = run_child(json.loads(args.child.read_text()))
        args.child_out.write_text(json.dumps(result))
        return 0

    def log(message: str) -> None:
        print(f"[memory-bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    t0 = time.perf_counter()
    limit_bytes = int(args.limit_mib * 2**20)
    per_image = 3 * args.image_size**2
    n_train = math.ceil(args.data_factor * limit_bytes / per_image / N_CLASSES) * N_CLASSES
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir, home = args.work / f"data-{args.image_size}px-{n_train}", args.work / "home"
    log(
        f"data set: {n_train} training images of {args.image_size} px = {n_train * per_image / 2**30:.2f} GiB decoded "
        f"({n_train * per_image / limit_bytes:.2f}x the {args.limit_mib:.0f} MiB limit)"
    )
    write_dataset(data_dir, n_train, args.test_images, args.image_size, len(os.sched_getaffinity(0)), log)

    from cifar_cnn.data import load_dataset

    t1 = time.perf_counter()
    quieter = lambda m: m.startswith("decoding:") or log(m)  # noqa: E731  (no line per 10% of the decode)
    ds = load_dataset(str(data_dir), args.image_size, storage="disk", home=home, log=quieter)
    pixels_file = ds.train_images.pixels.filename
    decode_s = time.perf_counter() - t1
    store_bytes = os.path.getsize(pixels_file)
    del ds
    log(f"decode cache ready in {decode_s:.0f}s: {pixels_file} ({store_bytes / 2**30:.2f} GiB)")

    limit = make_limit(args.method, limit_bytes)
    log(
        f"memory limit: {limit.method}"
        + (f" ({limit.folder})" if limit.folder else " (no limit; page cache dropped at every epoch start)")
        + (f"; not used: {'; '.join(limit.why_not)}" if limit.why_not else "")
    )
    base = {
        "data": str(data_dir),
        "home": str(home),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "model": args.model,
        "model_args": json.loads(args.model_args),
        "threads": args.threads,
        "warmup": args.warmup,
        "subset": max(args.batch_size, round(args.subset_fraction * n_train)),
    }
    disk_spec = {
        **base,
        "mode": "disk",
        "steps": args.steps,
        "loader_only": False,
        "madvise": args.madvise,
        "fadvise_each_epoch": limit.method == "fadvise",
        "usage_file": limit.usage_file(),
    }
    memory_spec = {**base, "mode": "memory", "steps": args.steps, "loader_only": False, "fadvise_each_epoch": False}
    disk_runs: list[dict[str, Any]] = []
    memory_runs: list[dict[str, Any]] = []
    loader_run = None
    try:
        if args.loader_steps:
            drop_from_page_cache(pixels_file)
            loader_run = start_child({**disk_spec, "steps": args.loader_steps, "loader_only": True}, args.work, limit)
            log(
                f"loader only, on disk: {loader_run['img_per_s']:.0f} img/s, "
                f"{loader_run['disk_read_bytes_timed'] / 2**20:.0f} MiB read from disk for "
                f"{loader_run['image_bytes_timed'] / 2**20:.0f} MiB of images"
            )
        for r in range(args.rounds):
            order = ("disk", "memory") if r % 2 == 0 else ("memory", "disk")
            for mode in order:
                if mode == "disk":
                    drop_from_page_cache(pixels_file)  # every on-disk child starts cold
                    run = start_child(disk_spec, args.work, limit)
                    disk_runs.append(run)
                else:
                    run = start_child(memory_spec, args.work, None)
                    memory_runs.append(run)
                log(
                    f"round {r + 1} {mode}: {run['img_per_s']:.1f} img/s ({run['loader']}, data wait "
                    f"{100 * run['data_wait_fraction']:.1f}% of the time, RssAnon peak "
                    f"{run['rss_anon_peak_bytes'] / 2**20:.0f} MiB"
                    + (
                        f", cgroup peak {run['cgroup']['peak_bytes'] / 2**20:.0f} MiB, limit hits "
                        f"{run['cgroup']['limit_hits']}"
                        if run.get("cgroup", {}).get("peak_bytes")
                        else ""
                    )
                    + ")"
                )
    finally:
        limit.remove()

    disk_ips = summarize(disk_runs, "img_per_s") if disk_runs else None
    memory_ips = summarize(memory_runs, "img_per_s") if memory_runs else None
    ratio = disk_ips / memory_ips if disk_ips and memory_ips else None
    result = {
        "benchmark": "memory_bench",
        "method": limit.method,
        "method_note": {
            "cgroup2": "cgroup v2 memory.max; the page cache is charged to the cgroup",
            "cgroup1": "cgroup v1 memory.limit_in_bytes; the page cache is charged to the cgroup too",
            "fadvise": "no memory limit could be set; the store's pages are dropped from the page cache "
            "(posix_fadvise DONTNEED) at every epoch start; see the anonymous RSS",
        }[limit.method],
        "methods_not_usable": limit.why_not,
        "cgroup_folder": str(limit.folder) if limit.folder else None,  # removed at the end
        "limit_bytes": limit_bytes,
        "data": {
            "train_images": n_train,
            "image_size": args.image_size,
            "decoded_train_bytes": n_train * per_image,
            "store_bytes": store_bytes,
            "factor_of_limit": n_train * per_image / limit_bytes,
            "decode_seconds": decode_s,
            "read_ahead_kb": read_ahead_kb(Path(pixels_file)),
        },
        "model": args.model,
        "model_args": json.loads(args.model_args),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "memory_subset_images": base["subset"],
        "disk_img_per_s": disk_ips,
        "memory_img_per_s": memory_ips,
        "ratio": ratio,
        "target_ratio": 0.8,
        "meets_target": ratio >= 0.8 if ratio is not None else None,
        "disk_rss_anon_peak_bytes": max((r["rss_anon_peak_bytes"] for r in disk_runs), default=None),
        "memory_rss_anon_peak_bytes": max((r["rss_anon_peak_bytes"] for r in memory_runs), default=None),
        "disk_cgroup_peak_bytes": max((r.get("cgroup", {}).get("peak_bytes") or 0 for r in disk_runs), default=0)
        or None,
        "loader_only": loader_run,
        "disk_runs": disk_runs,
        "memory_runs": memory_runs,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "total_seconds": time.perf_counter() - t0,
    }
    out = args.out or args.work / "memory_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if ratio is not None:
        log(
            f"on disk {disk_ips:.1f} img/s vs in memory {memory_ips:.1f} img/s: ratio {ratio:.2f} "
            f"({'meets' if result['meets_target'] else 'misses'} the 0.80 target); method {limit.method}; "
            f"peak RssAnon on disk {result['disk_rss_anon_peak_bytes'] / 2**20:.0f} MiB"
            + (
                f", cgroup peak {result['disk_cgroup_peak_bytes'] / 2**20:.0f} MiB of {args.limit_mib:.0f}"
                if result["disk_cgroup_peak_bytes"]
                else ""
            )
        )
    log(f"wrote {out} ({result['total_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
