"""Provenance of a run (run.json): versions, git commit, machine settings, times and the command line."""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import atomic_write_text


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


def provenance(device: torch.device, precision: str, command: list[str] | None = None) -> dict[str, Any]:
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
