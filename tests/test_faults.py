"""Faults never cost a user their work: Ctrl-C and SIGTERM, kill -9 at random moments, a full or read-only disk,
divergence. Every check runs the real command in a subprocess, as a user would."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifar_cnn.checkpoint import load_checkpoint

from .conftest import CLASSES, ROOT

TRAIN = [
    "--epochs",
    "4",
    "--batch-size",
    "16",
    "--precision",
    "fp32",
    "--threads",
    "1",
    "--momentum",
    "0.9",
    "--flip",
    "--translate",
    "2",
    "--eval-batch-size",
    "200",
]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifar_cnn", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, env=env(), timeout=600)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model_state"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def metrics_epochs(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def assert_run_files_whole(run_dir: Path) -> None:
    """Every file that exists loads, and metrics.csv has each epoch once, in order."""
    for name in ("best.pt", "last.pt"):
        if (run_dir / name).exists():
            load_checkpoint(run_dir / name)
    if (run_dir / "metrics.csv").exists():
        epochs = metrics_epochs(run_dir)
        assert epochs == list(range(1, len(epochs) + 1))


@pytest.fixture
def reference(tmp_path: Path, official_dir: Path) -> Path:
    out = tmp_path / "reference"
    proc = run("train", "--data", str(official_dir), "--out", str(out), *TRAIN)
    assert proc.returncode == 0, proc.stderr
    return out


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.parametrize(
    "sig", [signal.SIGINT]
)  # SIGTERM: test_the_printed_resume_command_works_from_another_directory
def test_signal_saves_resumable_checkpoint(tmp_path: Path, official_dir: Path, reference: Path, sig: int) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli("train", "--data", str(official_dir), "--out", str(out), *TRAIN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    wait_for(out / "last.pt", proc)  # epoch 1 done: now inside epoch 2
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "resume with: cifar-cnn train --resume" in stdout
    assert "Traceback" not in stderr
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] < 4
    assert not (out / "test_metrics.json").exists()
    assert_run_files_whole(out)
    proc = run("train", "--data", str(official_dir), "--resume", str(out / "last.pt"))
    assert proc.returncode == 0, proc.stderr
    assert_same_weights(out / "last.pt", reference / "last.pt")
    assert metrics_epochs(out) == [1, 2, 3, 4]


def test_second_ctrl_c_exits_at_once(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        cli("train", "--data", str(official_dir), "--out", str(out), *TRAIN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    wait_for(out / "config.yaml", proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert_run_files_whole(out)


def kill_and_resume(official_dir: Path, out: Path, kills: int, seed: int) -> int:
    """Start training, kill -9 it at a random moment, resume (or restart if no last.pt yet); repeat `kills` times,
    then let it finish. Returns the number of kills that landed while it was running."""
    rng = random.Random(seed)
    landed = 0
    for attempt in range(kills + 1):
        if (out / "last.pt").exists():
            args = ["train", "--data", str(official_dir), "--resume", str(out / "last.pt")]
        else:
            args = ["train", "--data", str(official_dir), "--out", str(out), "--overwrite", *TRAIN]
        proc = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
        if attempt < kills:
            # torch's import takes a few seconds; training the 4 epochs about as long again
            time.sleep(rng.uniform(1.0, 8.0))
            if proc.poll() is None:
                proc.kill()
                landed += 1
            proc.wait()
            assert_run_files_whole(out)
            continue
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    return landed


def test_kill_9_a_few_times(tmp_path: Path, official_dir: Path, reference: Path) -> None:
    out = tmp_path / "run"
    # the first kill always lands (at 1 s or later the process is still importing torch), so the resume path runs
    assert kill_and_resume(official_dir, out, kills=3, seed=0) >= 1
    assert_same_weights(out / "last.pt", reference / "last.pt")
    assert_same_weights(out / "best.pt", reference / "best.pt")
    assert metrics_epochs(out) == [1, 2, 3, 4]
    ours, theirs = (json.loads((d / "test_metrics.json").read_text()) for d in (out, reference))
    assert ours.pop("checkpoint") != theirs.pop("checkpoint") and ours == theirs


@pytest.mark.slow
def test_kill_9_twenty_times(tmp_path: Path, official_dir: Path, reference: Path) -> None:
    out = tmp_path / "run"
    landed = kill_and_resume(official_dir, out, kills=24, seed=1)
    assert landed >= 20
    assert_same_weights(out / "last.pt", reference / "last.pt")
    assert metrics_epochs(out) == [1, 2, 3, 4]


def test_full_disk_keeps_previous_checkpoint(tmp_path: Path, official_dir: Path, reference: Path, small_disk) -> None:
    size = (reference / "best.pt").stat().st_size
    disk = small_disk(int(size * 2.6))  # room for best.pt and last.pt of epoch 1, not for a third file
    out = disk / "run"
    proc = run("train", "--data", str(official_dir), "--out", str(out), *TRAIN)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()
    assert len(line) == 1 and "No space left on device" in line[0] and "Traceback" not in proc.stderr
    assert_run_files_whole(out)
    assert load_checkpoint(out / "last.pt")["epoch"] >= 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # no half-written temporary file left


def test_read_only_output(tmp_path: Path, official_dir: Path, small_disk) -> None:
    disk = small_disk(64 * 1024 * 1024)
    out = disk / "run"
    proc = run("train", "--data", str(official_dir), "--out", str(out), *TRAIN, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr

    def files() -> dict[str, bytes]:  # every file, report/ included
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = run("train", "--data", str(official_dir), "--resume", str(out / "last.pt"), "--epochs", "2")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Read-only file system" in proc.stderr
    assert files() == before


def test_divergence_stops_with_advice(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    # epoch 1 trains normally; the step schedule then multiplies the LR by a million
    proc = run(
        "train",
        "--data",
        str(official_dir),
        "--out",
        str(out),
        *TRAIN,
        "--schedule",
        "step",
        "--step-epochs",
        "1",
        "--step-gamma",
        "1e6",
    )
    assert proc.returncode == 2, proc.stderr
    assert "diverged" in proc.stderr and "lower the learning rate" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in best["model_state"].values())


def printed_resume_command(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if "resume with: " in line]
    assert len(lines) == 1, stdout
    return lines[0].split("resume with: ", 1)[1].strip()


def test_the_printed_resume_command_works_from_another_directory(tmp_path: Path, tiny_arrays: dict) -> None:
    """Training on an image-folder archive given by a relative path, stopped by SIGTERM, resumed by running the printed
    command verbatim from another working directory (no --data): the run's own data source is used, and the resumed
    last.pt equals an uninterrupted run's bit for bit. With --no-progress every epoch still prints `epoch N/M`."""
    from cifar_cnn.data.sources import Dataset

    from .conftest import make_zip
    from .data_writers import write_image_folder

    a = tiny_arrays
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    tree = write_image_folder(Dataset(a["train_x"], a["train_y"], a["test_x"], a["test_y"], CLASSES), tmp_path / "t")
    make_zip(tree, here / "pictures.zip")
    options = ["--data", "pictures.zip", "--no-progress", "--no-report", *TRAIN]
    reference = subprocess.run(cli("train", "--out", "reference", *options), cwd=here, env=env(), capture_output=True)
    assert reference.returncode == 0, reference.stderr

    proc = subprocess.Popen(
        cli("train", "--out", "run", *options),
        cwd=here,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    wait_for(here / "run" / "last.pt", proc)  # epoch 1 done: now inside epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and not (here / "run" / "test_metrics.json").exists()
    assert load_checkpoint(here / "run" / "last.pt")["epoch"] < 4
    assert_run_files_whole(here / "run")
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("epoch ")] == ["1/4"]
    command = printed_resume_command(stdout)
    assert command == f"cifar-cnn train --resume {here / 'run' / 'last.pt'}"

    shim = tmp_path / "bin" / "cifar-cnn"  # the command as a user's shell finds it
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cifar_cnn "$@"\n')
    shim.chmod(0o755)
    resumed = subprocess.run(
        command,
        shell=True,
        cwd=elsewhere,
        env={**env(), "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")] == [
        "2/4",
        "3/4",
        "4/4",
    ]
    assert_same_weights(here / "run" / "last.pt", here / "reference" / "last.pt")
    assert_same_weights(here / "run" / "best.pt", here / "reference" / "best.pt")
    assert metrics_epochs(here / "run") == [1, 2, 3, 4]
    run_json = json.loads((here / "run" / "run.json").read_text())
    assert run_json["data_source"]["path"] == str(here / "pictures.zip") and run_json["resumes"] == 1
    assert list(elsewhere.iterdir()) == []  # nothing was written where the command was run


# ---- issue 16: one writer per run, signals in every phase -----------------------------------------------------------


@pytest.fixture(scope="module")
def long_test_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 training images and 2,000 test images: with --eval-batch-size 1 the final test takes seconds, and the
    report's mistake browser draws 2,500 heat maps, so a signal can land inside either phase."""
    from .conftest import make_images, write_official_batches

    x, y = make_images(10, seed=2)
    xt, yt = make_images(200, seed=3)
    return write_official_batches(tmp_path_factory.mktemp("long_test") / "official", x, y, xt, yt)


def read_until(proc: subprocess.Popen, fragment: str, timeout: float = 300) -> list[str]:
    """Lines of the process's stdout up to the first that holds `fragment`."""
    lines: list[str] = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, ("".join(lines), proc.communicate())
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"no line with {fragment!r} in {timeout} s: {''.join(lines)}")


def run_as_printed(command: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A command the tool printed, run verbatim through a shell that finds `cifar-cnn` on its PATH."""
    shim = tmp_path / "bin" / "cifar-cnn"
    shim.parent.mkdir(exist_ok=True)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cifar_cnn "$@"\n')
    shim.chmod(0o755)
    path = f"{shim.parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        command, shell=True, cwd=tmp_path, env={**env(), "PATH": path}, capture_output=True, text=True, timeout=600
    )


def start_training(out: Path, data: Path, *extra: str) -> subprocess.Popen:
    args = ["train", "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "20", "--threads", "1"]
    return subprocess.Popen(
        cli(*args, "--no-progress", "--eval-batch-size", "1", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )


def test_sigterm_during_the_final_test_stops_at_once_and_the_printed_command_finishes(
    tmp_path: Path, long_test_set: Path
) -> None:
    out = tmp_path / "run"
    proc = start_training(out, long_test_set)
    read_until(proc, "epoch 1/1")
    time.sleep(1.0)  # past the last stop check after the epoch line: the test of best.pt has begun
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - t0 < 5, (time.monotonic() - t0, stderr)
    assert "Traceback" not in stderr and not (out / "test_metrics.json").exists()
    said = [line for line in stdout.splitlines() if "SIGTERM received during the final test" in line]
    assert len(said) == 1 and "training is complete but best.pt is not tested" in said[0], stdout
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert_run_files_whole(out)
    finished = run_as_printed(said[0].split("finish with: ", 1)[1].strip(), tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert [line for line in finished.stdout.splitlines() if line.startswith("epoch ")] == []  # nothing trained again
    assert json.loads((out / "test_metrics.json").read_text())["num_images"] == 2000
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert (out / "report" / "index.html").is_file()


def test_sigterm_during_the_report_stops_at_once_and_the_printed_command_writes_it(
    tmp_path: Path, long_test_set: Path
) -> None:
    out = tmp_path / "run"
    proc = start_training(out, long_test_set)
    read_until(proc, "test accuracy")  # test_metrics.json is written
    time.sleep(1.0)  # the report has begun
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143 and time.monotonic() - t0 < 5, (time.monotonic() - t0, stderr)
    assert "Traceback" not in stderr and (out / "test_metrics.json").is_file()
    said = [line for line in stdout.splitlines() if "SIGTERM received while writing the report" in line]
    assert len(said) == 1 and "the run is complete" in said[0], stdout
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert not (out / "report" / "index.html").exists()
    written = run_as_printed(said[0].split("write the report with: ", 1)[1].strip(), tmp_path)
    assert written.returncode == 0, written.stderr
    assert (out / "report" / "index.html").is_file()


def test_a_second_training_on_a_running_run_is_refused(tmp_path: Path, official_dir: Path) -> None:
    """Two `train` on one --out: the second (even with --overwrite) exits 2 naming the first's pid and changes
    nothing; the run is the first's alone, and its lock file goes when it stops."""
    out = tmp_path / "run"
    first = subprocess.Popen(
        cli("train", "--data", str(official_dir), "--out", str(out), "--no-report", *TRAIN, "--epochs", "500"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    wait_for(out / "last.pt", first)
    for extra in ([], ["--overwrite"]):
        second = run("train", "--data", str(official_dir), "--out", str(out), "--epochs", "1", *extra)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"pid {first.pid} on " in second.stderr, second.stderr
        assert "is writing this run" in second.stderr
    assert first.poll() is None, "the first training ended before the second was tried"
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 143, stderr
    assert yaml_epochs(out) == 500 and json.loads((out / "run.json").read_text())["command_line"][-1] == "500"
    assert not (out / ".lock").exists()


def yaml_epochs(out: Path) -> int:
    import yaml

    return int(yaml.safe_load((out / "config.yaml").read_text())["epochs"])


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
    tmp_path: Path, official_dir: Path
) -> None:
    """--overwrite moves the old run aside only after the first step, and puts it back when the new run fails before
    its first checkpoint (here a probe raises after the third step); a failure after it marks run.json failed."""
    from cifar_cnn import resolve_config, train

    from .helpers import quiet

    out = tmp_path / "run"
    config = resolve_config("seed", None, {"epochs": 2, "batch_size": 50, "device": "cpu", "precision": "fp32"})
    train(config, str(official_dir), out, log=quiet, threads=1)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fail_at(step: int, epochs: int = 0):
        def probe(model, steps_done: int, steps_per_epoch: int) -> None:
            if steps_done == epochs * steps_per_epoch + step:
                raise RuntimeError("the machine caught fire")

        return probe

    messages: list[str] = []
    with pytest.raises(RuntimeError, match="caught fire"):
        train(config, str(official_dir), out, overwrite=True, log=messages.append, threads=1, probe=fail_at(3))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert any("is back in place" in m for m in messages), messages
    with pytest.raises(RuntimeError, match="caught fire"):  # in the second epoch: after the first checkpoint
        train(config, str(official_dir), out, overwrite=True, log=quiet, threads=1, probe=fail_at(1, epochs=1))
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["status"] == "failed" and run_json["error"] == "the machine caught fire"
    assert metrics_epochs(out) == [1] and not (out / ".previous-run").exists()
