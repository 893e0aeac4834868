"""The README's quick start works as written on a fresh machine: its first command, run from a fresh clone in a fresh
virtual environment under umask 022, writes the run with test_metrics.json, best.pt (mode 644) and the report.
Slow (it installs torch and the package into a new environment and trains the seed recipe on the whole archive):
run by hand with --runslow before changing the quick start or the packaging."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, SHARED_ARCHIVE


def quick_start_commands() -> list[str]:
    """The lines of the first code block under `## Quick start`."""
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_first_command_is_one_line_that_trains_and_the_second_runs_ci() -> None:
    first, second = quick_start_commands()[:2]
    assert first.startswith("pip install torch==2.13.0 && pip install -e . && cifar-cnn train ")
    assert "--out runs/seed" in first and "../shared/data/cifar10-jpg.tar.gz" in first
    assert second == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m pytest -q\n" in ci  # the README's test command


@pytest.mark.slow
def test_the_first_command_on_a_fresh_clone(tmp_path: Path) -> None:
    assert SHARED_ARCHIVE.is_file()
    clone = tmp_path / "work" / "cifar-cnn"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (tmp_path / "work" / "shared").symlink_to(SHARED_ARCHIVE.parents[1])  # ../shared beside the clone, as in CI
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "CIFAR_CNN_HOME": str(tmp_path / "cifar-home"),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    first = quick_start_commands()[0]
    proc = subprocess.run(
        ["bash", "-c", f"umask 022 && {first}"], cwd=clone, env=env, capture_output=True, text=True, timeout=3000
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = clone / "runs" / "seed"
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["num_images"] == 10000 and test["accuracy"] > 0.55
    assert stat.S_IMODE((run / "best.pt").stat().st_mode) == 0o644
    assert (run / "report" / "index.html").is_file() and (run / "report" / "curves.png").is_file()
    assert proc.stdout.strip().splitlines()[-1].startswith(f"report: {Path('runs/seed/report/index.html')}")
    torch_line = subprocess.run([venv / "bin" / "pip", "list"], capture_output=True, text=True, env=env).stdout
    # nothing replaced the local CPU build (pip lists it as 2.13.0 or 2.13.0+cpu)
    assert any(line.split()[0] == "torch" and line.split()[1].startswith("2.13.0") for line in torch_line.splitlines())
