"""A shared search on a real PostgreSQL server (issue 17): workers started at the same moment on a fresh database all
run, every trial is run once and completes, --trials is per worker, and the last worker to finish writes the whole
study. The server is Debian's `postgresql` package (.ci/run installs it), started here on 127.0.0.1, stopped after."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")

from .conftest import ROOT, make_images, write_official_batches  # noqa: E402

PG_CTL = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
USER = "cifar"

TUNE_YAML = """
subset: 200
precision: fp32
device: cpu
eval_batch_size: 200
model_args: {dropout: 0.0}
tune:
  space:
    optimizer: sgd
    lr: {low: 0.02, high: 0.1, log: true}
    momentum: 0.9
    batch_size: [32, 48]
    epochs: 1
    augment: none
    dropout: null
    weight_decay: null
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Callable[[str], str]]:
    """A PostgreSQL server on 127.0.0.1 (trust auth, user cifar); yields `fresh(name) -> URL` creating an empty
    database. Run as the `postgres` user when the tests run as root (the server refuses root)."""
    if not PG_CTL:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    bindir = Path(PG_CTL[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="cifar-pg-"))  # not under pytest's 0700 folders: the postgres user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def pg(tool: str, *args: str) -> None:
        done = subprocess.run([*as_user, str(bindir / tool), *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool}: {done.stdout}{done.stderr}"

    pg("initdb", "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "-t", "60", "start")
    try:

        def fresh(name: str) -> str:
            pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, name)
            return f"postgresql://{USER}@127.0.0.1:{port}/{name}"

        yield fresh
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tiny_official(tmp_path: Path) -> Path:
    x, y = make_images(20, seed=1)
    tx, ty = make_images(2, seed=2)
    return write_official_batches(tmp_path / "cifar-10-batches-py", x, y, tx, ty)


def start_workers(n: int, argv: list[str], outs: list[Path]) -> list[subprocess.Popen]:
    """n `cifar-cnn tune` processes started together (each its own --out, one thread each)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "cifar_cnn", *argv, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for out in outs[:n]
    ]


def test_workers_started_together_on_a_fresh_database_share_one_study(
    postgres: Callable[[str], str], tiny_official: Path, tmp_path: Path
) -> None:
    url = postgres("fresh")  # a plain postgresql:// URL: the installed driver is chosen
    (tmp_path / "tune.yaml").write_text(TUNE_YAML)
    argv = ["tune", "--data", str(tiny_official), "--config", str(tmp_path / "tune.yaml"), "--trials", "2"]
    argv += ["--storage", url, "--study", "shared", "--pruner", "none", "--threads", "1"]
    outs = [tmp_path / f"worker{i}" for i in range(3)]
    workers = start_workers(3, argv, outs)
    results = [w.communicate(timeout=300) for w in workers]
    for w, (_, err) in zip(workers, results):
        assert w.returncode == 0, err
    study = optuna.load_study(study_name="shared", storage=url.replace("postgresql://", "postgresql+psycopg://"))
    trials = study.get_trials(deepcopy=False)
    # --trials is per worker: 3 x 2, each run once (distinct numbers, distinct run folders) and completed
    assert len(trials) == 6 and sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
    run_dirs = sorted(t.user_attrs["run_dir"] for t in trials)
    assert len(set(run_dirs)) == 6 and all(Path(d, "best.pt").is_file() for d in run_dirs)
    assert sorted(len(list((o / "trials").iterdir())) for o in outs) == [2, 2, 2]
    # the three workers sampled with different seeds: no two trials share their values
    assert len({(t.params["lr"], t.params["batch_size"]) for t in trials}) == 6
    # every worker wrote the study as it stood when it finished; the last one wrote all six trials
    last = max(outs, key=lambda o: (o / "trials.csv").stat().st_mtime_ns)
    rows = (last / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(",complete," in r for r in rows)
    assert all((o / "best.yaml").is_file() for o in outs)
    best = max(trials, key=lambda t: t.value)
    assert f"# best trial {best.number} of study 'shared'" in (last / "best.yaml").read_text()


def test_a_study_with_another_space_is_refused_before_any_trial(
    postgres: Callable[[str], str], tiny_official: Path, tmp_path: Path
) -> None:
    url = postgres("other_space")
    storage = url.replace("postgresql://", "postgresql+psycopg://")
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.5}, distributions={"lr": optuna.distributions.FloatDistribution(0.1, 1.0)}, value=0.3
        )
    )
    (tmp_path / "tune.yaml").write_text(TUNE_YAML)
    argv = ["tune", "--data", str(tiny_official), "--config", str(tmp_path / "tune.yaml"), "--trials", "1"]
    argv += ["--storage", url, "--study", "s", "--threads", "1"]
    t0 = time.perf_counter()
    (w,) = start_workers(1, argv, [tmp_path / "w"])
    _, err = w.communicate(timeout=120)
    assert w.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "study 's'" in err and "another space: lr was 0.1..1" in err and "127.0.0.1" in err
    assert len(optuna.load_study(study_name="s", storage=storage).trials) == 1, "no trial may run"
    assert time.perf_counter() - t0 < 60
