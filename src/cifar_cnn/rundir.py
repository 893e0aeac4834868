"""The run directory, owned here: file names, metrics.csv, run.json (provenance), which checkpoint to read, and the
run's data source. The engine writes through it; report, export, bench, tune and the command line read through it.

    config.yaml        the resolved config
    metrics.csv        one row per epoch (METRICS_HEADER)
    best.pt            lowest validation loss so far (the final weights without a validation split; with EMA the
                       averaged weights)
    last.pt            every epoch, for --resume
    test_metrics.json  best.pt on the test split, as `evaluate --json` prints it
    run.json           provenance: versions, git commit, device, precision, threads, times, command line, data source
    report/            plots and index.html (cifar_cnn.report)
    tensorboard/       event files (--tensorboard)
    .lock              held by the one process writing the run (RunLock); left behind only by a killed one
    .previous-run/     with --overwrite, the replaced run until the new one's first checkpoint (then deleted; put
                       back if the new run fails or was killed before it)
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import fcntl
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text, fsync_dir
from .config import MAX_CONFIG_BYTES, check_size, load_yaml
from .data.load import DEFAULT_SOURCE, DataSource
from .errors import CifarCnnError
from .version import __version__

CONFIG, METRICS, BEST, LAST = "config.yaml", "metrics.csv", "best.pt", "last.pt"
TEST_METRICS, RUN_JSON, REPORT_DIR, TENSORBOARD_DIR = "test_metrics.json", "run.json", "report", "tensorboard"
RUN_FILES = (CONFIG, METRICS, BEST, LAST, TEST_METRICS, RUN_JSON)  # what --overwrite moves aside for a new run
RUN_ENTRIES = (*RUN_FILES, REPORT_DIR, TENSORBOARD_DIR)
LOCK, PREVIOUS = ".lock", ".previous-run"
METRICS_HEADER = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


@dataclass(frozen=True)
class RunPaths:
    """The files of a run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def test_metrics(self) -> Path:
        return self.root / TEST_METRICS

    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def report(self) -> Path:
        return self.root / REPORT_DIR

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR


# ---- creating it ----------------------------------------------------------------------------------------------------


def holds_a_run(out: Path) -> bool:
    """Whether the folder holds anything besides the lock file (a lock alone is what a killed start left)."""
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def check_out_dir(out: Path, *, resume: str | Path | None, overwrite: bool) -> None:
    """Refuse a file; a non-empty folder unless told to overwrite, or resuming the checkpoint `resume` of that very
    folder (resuming into another run's folder would mix two runs). Changes nothing."""
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder")
    if not holds_a_run(out) or overwrite:
        return
    if resume is None:
        raise CifarCnnError(
            f"--out {out}: folder is not empty; pass --resume {out / LAST} to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )
    if out.resolve() != Path(resume).resolve().parent:
        raise CifarCnnError(
            f"--out {out}: holds another run, not the one {resume} belongs to; choose an empty --out, leave --out "
            f"out to continue in {Path(resume).parent}, or pass --overwrite to replace {out}"
        )


class RunLock:
    """One writer per run directory: an exclusive flock on RUN_DIR/.lock, held for the life of the run.

    The kernel drops the lock when its process dies, however it dies, so a lock file left by a killed run is taken
    over (with a message) and one held by a live process refuses the second writer with its pid. Holding the lock,
    the owner cleans what a killed writer left: temporary files of interrupted atomic writes, and a replaced run
    (.previous-run) that a killed --overwrite had not yet let go of. The folder is created here when missing, and
    removed again on release when nothing was written into it.
    """

    def __init__(self, root: Path, log: Callable[[str], None] = print) -> None:
        self.root, self.log = Path(root), log
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> RunLock:
        if self.root.exists() and not self.root.is_dir():
            raise CifarCnnError(f"--out {self.root}: exists and is not a folder")
        self.created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CifarCnnError(f"--out {self.root}: cannot create the folder ({exc.strerror or exc})") from None
        while self.fd is None:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                self.release()
                raise CifarCnnError(
                    f"--out {self.root}: {holder} is writing this run; wait for it to finish, stop it, or choose "
                    "another --out"
                ) from None
            if self._same_file(fd):  # not unlinked by a releasing owner between our open and our flock
                self.fd = fd
            else:
                os.close(fd)
        stale = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip()
        if stale:
            self.log(f"{self.root}: taking over the lock of {stale}, which is no longer running")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode(), 0)
        self._clean_after_a_kill()
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.root / LOCK).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _clean_after_a_kill(self) -> None:
        leftovers = [p for p in self.root.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        for p in leftovers:
            p.unlink(missing_ok=True)
        if leftovers:
            self.log(f"{self.root}: removed {len(leftovers)} temporary file(s) of writes a killed run left unfinished")
        if (self.root / PREVIOUS).is_dir():
            restore_previous_run(RunPaths(self.root))
            self.log(
                f"{self.root}: a run started with --overwrite was killed before its first checkpoint; the run it "
                "was replacing is back in place"
            )

    def release(self) -> None:
        if self.fd is not None:
            (self.root / LOCK).unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
            self.fd = None
        if self.created and self.root.is_dir() and not any(self.root.iterdir()):
            with contextlib.suppress(OSError):
                self.root.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def move_previous_run_aside(paths: RunPaths) -> bool:
    """--overwrite: move the run files (and report/, tensorboard/) into .previous-run/; other files stay. Returns
    whether there was anything to move. Renames within the folder: instant, and undone by restore_previous_run."""
    entries = [name for name in RUN_ENTRIES if (paths.root / name).exists()]
    if not entries:
        return False
    aside = paths.root / PREVIOUS
    aside.mkdir()
    for name in entries:
        os.replace(paths.root / name, aside / name)
    fsync_dir(paths.root)
    return True


def restore_previous_run(paths: RunPaths) -> None:
    """Put back the run moved aside, removing what the new run had written in its place."""
    aside = paths.root / PREVIOUS
    for name in RUN_ENTRIES:
        target = paths.root / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        if (aside / name).exists():
            os.replace(aside / name, target)
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(paths.root)


def drop_previous_run(paths: RunPaths) -> None:
    """The new run has its first checkpoint: the replaced one goes for good."""
    shutil.rmtree(paths.root / PREVIOUS, ignore_errors=True)


def replaces_a_run(out: Path, *, resume: str | Path | None, overwrite: bool) -> bool:
    """Whether starting in `out` replaces another run there (--overwrite, and not resuming that very run)."""
    own = resume is not None and out.resolve() == Path(resume).resolve().parent
    return overwrite and not own and holds_a_run(out)


def pick_checkpoint(run_dir: str | Path) -> Path:
    """best.pt, or last.pt when the run has no best.pt yet (interrupted in its first epoch)."""
    root = Path(run_dir)
    if not root.is_dir():
        raise CifarCnnError(f"{root}: no such run directory")
    for name in (BEST, LAST):
        if (root / name).is_file():
            return root / name
    raise CifarCnnError(f"{root}: holds neither {BEST} nor {LAST}; is it a run directory written by `train`?")


# ---- metrics.csv ----------------------------------------------------------------------------------------------------


def write_metrics_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.csv atomically from the history (so a kill never leaves a torn or duplicated row)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRICS_HEADER)
    for row in history:
        writer.writerow(["" if row.get(k) is None else row[k] for k in METRICS_HEADER])
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """metrics.csv as rows of floats (None for empty cells, e.g. val_loss without a validation split)."""
    p = Path(path)
    if not p.is_file():
        return []
    with p.open(newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


# ---- run.json and config.yaml ---------------------------------------------------------------------------------------


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding this package (None when installed from a wheel)."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(device: Any, precision: str, command: list[str] | None = None) -> dict[str, Any]:
    """The start of run.json: versions, machine, settings, command line; `status` running until the end."""
    import torch  # the versions and the device name of the torch that trains

    return {
        "package_version": __version__,
        "git_commit": git_commit(),
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": precision,
        "command_line": command if command is not None else list(sys.argv),
        "start_time": now(),
        "end_time": None,
        "status": "running",
    }


def write_run_json(path: Path, info: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def read_run_json(run_dir: str | Path) -> dict[str, Any]:
    """run.json of a run directory ({} when missing or unreadable)."""
    try:
        loaded = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def read_config_yaml(run_dir: str | Path) -> dict[str, Any]:
    """config.yaml of a run directory as a plain dict ({} when missing or unreadable)."""
    path = Path(run_dir) / CONFIG
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            return {}
        loaded = load_yaml(path.read_text())
        check_size(loaded, str(path))  # aliases that expand beyond a config's size
    except (OSError, ValueError, yaml.YAMLError, CifarCnnError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


# ---- the run's data source ------------------------------------------------------------------------------------------


def recorded_source(ckpt: dict[str, Any] | None = None, run_dir: str | Path | None = None) -> DataSource | None:
    """The data a run trained on: the checkpoint's record, else run.json's (older runs: its `data` string)."""
    if ckpt is not None and (found := DataSource.from_dict(ckpt.get("data_source"))) is not None:
        return found
    if run_dir is None:
        return None
    run = read_run_json(run_dir)
    found = DataSource.from_dict(run.get("data_source"))
    if found is None and isinstance(run.get("data"), str):
        found = DataSource(run["data"])
    return found


def resolve_source(
    data: str | Path | DataSource | None,
    ckpt: dict[str, Any] | None = None,
    run_dir: str | Path | None = None,
    *,
    default: str | None = DEFAULT_SOURCE,
) -> DataSource | None:
    """The data a command works on: `data` when given, else what the run recorded (checkpoint, then run.json), else
    `default` ('cifar10' for train and evaluate; None where the caller asks the user for --data instead)."""
    recorded = recorded_source(ckpt, run_dir)
    if data and (not isinstance(data, DataSource) or data.path):
        given = DataSource.of(data)
        same_labels = recorded is not None and given.options.get("labels") == recorded.options.get("labels")
        if same_labels and "test_split" in recorded.options and "test_split" not in given.options:
            given = dataclasses.replace(given, options={**given.options, "test_split": recorded.options["test_split"]})
        return given  # the run's labels file again: with the run's test split, not the default one
    found = recorded or (DataSource.of(default) if default else None)
    if found is not None and isinstance(data, DataSource):  # no path: the recorded source, as `data` holds it
        options = {**found.options, **({"skip_bad": True} if data.options.get("skip_bad") else {})}
        found = dataclasses.replace(found, options=options, storage=data.storage)
    return found


def recorded_fingerprint(ckpt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fingerprint of the data (`Dataset.fingerprint`) a checkpoint was trained on, if it recorded one."""
    record = (ckpt or {}).get("data_source")
    fingerprint = record.get("fingerprint") if isinstance(record, dict) else None
    return fingerprint if isinstance(fingerprint, dict) else None
