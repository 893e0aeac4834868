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
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text
from .data.load import DEFAULT_SOURCE, DataSource
from .errors import CifarCnnError
from .version import __version__

CONFIG, METRICS, BEST, LAST = "config.yaml", "metrics.csv", "best.pt", "last.pt"
TEST_METRICS, RUN_JSON, REPORT_DIR, TENSORBOARD_DIR = "test_metrics.json", "run.json", "report", "tensorboard"
RUN_FILES = (CONFIG, METRICS, BEST, LAST, TEST_METRICS, RUN_JSON)  # what --overwrite removes before a new run
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


def check_out_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless resuming or told to overwrite. Changes nothing."""
    if out.exists() and not out.is_dir():
        raise CifarCnnError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise CifarCnnError(
            f"--out {out}: folder is not empty; pass --resume {out / LAST} to continue that run, "
            "--overwrite to replace it, or choose another --out"
        )


def prepare_out_dir(out: Path, *, resume: bool, overwrite: bool) -> RunPaths:
    """Create the run directory (after everything else was checked, so bad input never touches an old run)."""
    check_out_dir(out, resume=resume, overwrite=overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarCnnError(f"--out {out}: cannot create the folder ({exc.strerror or exc})") from None
    if overwrite and not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return RunPaths(out)


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
    try:
        loaded = yaml.safe_load((Path(run_dir) / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
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
