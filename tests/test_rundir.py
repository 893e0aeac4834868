"""The run directory (cifar_cnn.rundir): file names, metrics.csv, run.json, which checkpoint, the recorded data source;
and the data-source record itself (cifar_cnn.data.load.DataSource, check_same_data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cifar_cnn.data import DataSource, check_same_data
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.rundir import (
    LOCK,
    METRICS_HEADER,
    PREVIOUS,
    RUN_FILES,
    RunLock,
    RunPaths,
    check_out_dir,
    drop_previous_run,
    move_previous_run_aside,
    pick_checkpoint,
    read_metrics,
    read_run_json,
    recorded_fingerprint,
    recorded_source,
    replaces_a_run,
    resolve_source,
    restore_previous_run,
    write_metrics_csv,
    write_run_json,
)


def test_paths_and_names(tmp_path: Path) -> None:
    p = RunPaths(tmp_path)
    assert [p.config, p.metrics, p.best, p.last, p.test_metrics, p.run_json] == [tmp_path / n for n in RUN_FILES]
    assert (p.report, p.tensorboard) == (tmp_path / "report", tmp_path / "tensorboard")


def test_metrics_csv_round_trip_with_empty_cells(tmp_path: Path) -> None:
    history = [
        {
            "epoch": 1,
            "train_loss": 2.0,
            "train_acc": 0.25,
            "val_loss": None,
            "val_acc": None,
            "lr": 0.1,
            "seconds": 1.5,
        },
        {"epoch": 2, "train_loss": 1.5, "train_acc": 0.5, "val_loss": 1.75, "val_acc": 0.4, "lr": 0.05, "seconds": 2},
    ]
    path = tmp_path / "metrics.csv"
    write_metrics_csv(path, history)
    assert path.read_text().splitlines()[0] == ",".join(METRICS_HEADER)
    assert path.read_text().splitlines()[1] == "1,2.0,0.25,,,0.1,1.5"
    assert read_metrics(path) == [{k: (None if v is None else float(v)) for k, v in row.items()} for row in history]
    assert read_metrics(tmp_path / "none.csv") == []


def test_out_dir_checks(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    check_out_dir(out, resume=None, overwrite=False)  # empty
    (out / LOCK).write_text("pid 1")  # a lock a killed start left is not a run
    check_out_dir(out, resume=None, overwrite=False)
    (out / "notes.txt").write_text("mine")
    (out / "best.pt").write_text("old")
    with pytest.raises(CifarCnnError, match=r"folder is not empty; pass --resume .*last\.pt"):
        check_out_dir(out, resume=None, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CifarCnnError, match="exists and is not a folder"):
        check_out_dir(tmp_path / "file", resume=None, overwrite=True)
    check_out_dir(out, resume=out / "last.pt", overwrite=False)  # its own run
    with pytest.raises(CifarCnnError, match=r"holds another run, not the one .*other.last\.pt belongs to"):
        check_out_dir(out, resume=tmp_path / "other" / "last.pt", overwrite=False)
    check_out_dir(out, resume=tmp_path / "other" / "last.pt", overwrite=True)
    assert replaces_a_run(out, resume=tmp_path / "other" / "last.pt", overwrite=True)
    assert not replaces_a_run(out, resume=out / "last.pt", overwrite=True)  # continuing it replaces nothing
    assert not replaces_a_run(out, resume=None, overwrite=False)


def test_previous_run_moved_aside_and_back(tmp_path: Path) -> None:
    paths = RunPaths(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "best.pt").write_text("old best")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("old page")
    assert move_previous_run_aside(paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PREVIOUS, "notes.txt"]  # only run files move
    (tmp_path / "best.pt").write_text("new best")
    (tmp_path / "config.yaml").write_text("new")
    restore_previous_run(paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "notes.txt", "report"]
    assert (tmp_path / "best.pt").read_text() == "old best"
    assert (tmp_path / "report" / "index.html").read_text() == "old page"
    assert move_previous_run_aside(paths)
    drop_previous_run(paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert not move_previous_run_aside(paths)  # nothing to move


def test_run_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    messages: list[str] = []
    with RunLock(out, messages.append):
        assert f"pid {os.getpid()}" in (out / LOCK).read_text()
        holder = subprocess.run(
            [sys.executable, "-c", LOCK_FROM_ANOTHER_PROCESS, str(out)], capture_output=True, text=True, timeout=60
        )
        assert holder.returncode == 2 and f"pid {os.getpid()} on " in holder.stdout, holder
        assert "is writing this run" in holder.stdout
    assert not out.exists()  # created for the run, nothing written: removed again
    out.mkdir(parents=True)
    (out / LOCK).write_text("pid 999999 on elsewhere since yesterday\n")  # left by a killed process
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    (out / PREVIOUS).mkdir()
    (out / PREVIOUS / "best.pt").write_text("the replaced run")
    (out / "best.pt").write_text("the killed new run")
    with RunLock(out, messages.append):
        pass
    assert any("taking over the lock of pid 999999" in m for m in messages), messages
    assert any("removed 1 temporary file" in m for m in messages), messages
    assert sorted(p.name for p in out.iterdir()) == ["best.pt"]
    assert (out / "best.pt").read_text() == "the replaced run"


LOCK_FROM_ANOTHER_PROCESS = """
import sys
from pathlib import Path
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.rundir import RunLock
try:
    RunLock(Path(sys.argv[1])).acquire()
except CifarCnnError as exc:
    print(exc)
    sys.exit(2)
"""


def test_pick_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CifarCnnError, match="no such run directory"):
        pick_checkpoint(tmp_path / "nope")
    with pytest.raises(CifarCnnError, match="holds neither best.pt nor last.pt"):
        pick_checkpoint(tmp_path)
    (tmp_path / "last.pt").write_text("x")
    assert pick_checkpoint(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "best.pt").write_text("x")
    assert pick_checkpoint(tmp_path) == tmp_path / "best.pt"


def test_recorded_source_prefers_the_checkpoint_then_run_json(tmp_path: Path) -> None:
    fingerprint = {"classes": ["a"], "counts": {"train": 1, "test": 1}, "sha256": "0" * 64}
    ckpt = {"data_source": {"path": "/data/a", "options": {"labels": "x.csv"}, "fingerprint": fingerprint}}
    assert recorded_source(ckpt, tmp_path) == DataSource("/data/a", {"labels": "x.csv"})
    assert recorded_fingerprint(ckpt) == fingerprint
    assert recorded_source({}, tmp_path) is None and recorded_fingerprint({}) is None
    write_run_json(tmp_path / "run.json", {"data": "/data/old"})  # an older run: only the string
    assert recorded_source({}, tmp_path) == DataSource("/data/old")
    write_run_json(tmp_path / "run.json", {"data": "x", "data_source": {"path": "/data/b", "options": {}}})
    assert recorded_source({"data_source": "garbage"}, tmp_path) == DataSource("/data/b")
    (tmp_path / "run.json").write_text("{not json")
    assert read_run_json(tmp_path) == {} and recorded_source(None, tmp_path) is None


def test_data_source_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert DataSource.of("cifar10") == DataSource("cifar10")
    rel = DataSource.of("pictures.zip")
    assert rel.path == str(tmp_path / "pictures.zip") and os.path.isabs(rel.path)
    assert DataSource.of(rel) is rel and str(rel) == rel.path
    assert DataSource.from_dict(json.loads(json.dumps(rel.to_dict()))) == rel
    assert DataSource.from_dict({"path": 3}) is None and DataSource.from_dict(None) is None


def test_check_same_data_names_both_and_what_differs() -> None:
    base = {"classes": ["a", "b"], "counts": {"train": 4, "test": 2}, "sha256": "1" * 64}
    check_same_data(base, dict(base), "run/last.pt", "/other")  # the same: nothing happens
    check_same_data(None, base, "run/last.pt", "/other")  # nothing recorded (an older run): nothing to compare
    cases = [
        ({**base, "classes": ["a", "c"]}, "classes ['a', 'b'] there, ['a', 'c'] here"),
        ({**base, "counts": {"train": 5, "test": 2}}, "image counts"),
        ({**base, "sha256": "2" * 64}, "content hash differs"),
    ]
    for found, what in cases:
        with pytest.raises(CifarCnnError) as exc:
            check_same_data(base, found, "run/last.pt (source /mine)", "/other")
        message = str(exc.value)
        assert message.startswith("--data /other: not the data run/last.pt (source /mine) was trained on")
        assert what in message and "\n" not in message


def test_check_same_data_without_data_blames_the_recorded_source() -> None:
    """Resuming with no --data on a recorded source whose files changed: the message says so, not 'drop --data'."""
    base = {"classes": ["a"], "counts": {"train": 4, "test": 2}, "sha256": "1" * 64}
    with pytest.raises(CifarCnnError) as exc:
        check_same_data(base, {**base, "sha256": "3" * 64}, "run/last.pt (source /mine)", None)
    message = str(exc.value)
    assert message.startswith("run/last.pt (source /mine): its recorded data source now decodes to other data")
    assert "content hash differs" in message and "drop --data" not in message


def test_resolve_source(tmp_path: Path) -> None:
    ckpt = {"data_source": {"path": "/data/a", "options": {}}}
    assert resolve_source("x.zip", ckpt, tmp_path) == DataSource(str(Path("x.zip").absolute()))
    assert resolve_source(None, ckpt, tmp_path) == DataSource("/data/a")
    assert resolve_source(None, {}, tmp_path) == DataSource("cifar10")
    assert resolve_source(None, {}, tmp_path, default=None) is None
