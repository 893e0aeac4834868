"""Bad-input catalogue rows for `tune` on a database (issue 17): an unreachable server, a study searched over another
space, a driver that is not installed. Gathered by test_bad_input.py; the row types and builders are in
bad_input_kit.py. The shared search itself (workers racing on a fresh PostgreSQL) is tests/test_tune_postgres.py."""

from __future__ import annotations

import socket
from pathlib import Path

from .bad_input_kit import Case, Env, HttpCase


def tune(e: Env, *args: str) -> list[str]:
    return ["tune", "--data", str(e.official), "--trials", "1", "--threads", "1", *args]


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound by the OS, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def study_of_another_space(e: Env) -> Path:
    """OUT holding a SQLite study whose one trial searched lr over 0.1..1 (the default space has lr per optimizer)."""
    import optuna

    out = e.tmp / "other-space"
    out.mkdir()
    study = optuna.create_study(study_name="cifar-cnn", storage=f"sqlite:///{out / 'study.db'}", direction="maximize")
    lr = optuna.distributions.FloatDistribution(0.1, 1.0)
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.5}, distributions={"lr": lr}, value=0.3))
    return out


CASES: list[Case] = [
    (
        "tune-database-unreachable",
        "tune",
        "--storage postgresql://... at a port where no server listens",
        lambda e: tune(e, "--out", str(e.tmp / "t"), "--storage", f"postgresql://cifar@127.0.0.1:{closed_port()}/db"),
        "cannot connect to the database at 127.0.0.1:",
    ),
    (
        "tune-study-of-another-space",
        "tune",
        "--study naming a study whose trials were sampled from another search space",
        lambda e: tune(e, "--out", str(study_of_another_space(e))),
        "study 'cifar-cnn' in sqlite:///",
    ),
    (
        "tune-driver-missing",
        "tune",
        "--storage postgresql+pg8000://... (a driver that is not installed)",
        lambda e: tune(e, "--out", str(e.tmp / "t"), "--storage", "postgresql+pg8000://cifar@127.0.0.1:5432/db"),
        "its driver 'pg8000' is not installed; pip install 'cifar-cnn[postgres]'",
    ),
]
HTTP_CASES: list[HttpCase] = []
