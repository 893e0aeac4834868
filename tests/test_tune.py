"""Hyper-parameter search: pruning of a bad trial, a resumable SQLite study, best.yaml that train accepts, the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cifar_cnn import resolve_config
from cifar_cnn.errors import CifarCnnError

optuna = pytest.importorskip("optuna")

from cifar_cnn import tune  # noqa: E402
from cifar_cnn.tune import DEFAULT_SPACE, config_for, read_tune_settings, run_study, suggest  # noqa: E402

from .conftest import run_cli  # noqa: E402

TUNE_YAML = """
subset: 300
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
    epochs: 2
    augment: none
    dropout: null
    weight_decay: null
  startup_trials: 2
  enqueue: [{lr: 0.05, batch_size: 32}, {lr: 0.03, batch_size: 32}, {lr: 0.000001, batch_size: 32}]
"""


def quiet(_: str) -> None:
    pass


def test_default_space_samples_valid_configs() -> None:
    base = resolve_config("seed")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        values = suggest(trial, DEFAULT_SPACE)
        config = config_for(base, values)
        lr_range = DEFAULT_SPACE["lr"][config.optimizer]
        assert lr_range["low"] <= config.lr <= lr_range["high"]
        assert config.batch_size in DEFAULT_SPACE["batch_size"] and 0 <= config.model_args["dropout"] <= 0.5
        study.tell(trial, 0.5)


def test_bad_tune_sections_are_refused(tmp_path: Path) -> None:
    for section, message in [
        ({"space": {"lr": {"low": 0, "high": 1, "log": True}}}, "log range needs low > 0"),
        ({"space": {"nonsense": [1, 2]}}, "cannot be searched"),
        ({"space": {"augment": ["wild"]}}, "augment: choose from"),
        ({"pruner": "hyperband"}, "median or none"),
        ({"trials": 4}, "unknown key"),
    ]:
        f = tmp_path / "t.yaml"
        f.write_text(yaml.safe_dump({"tune": section}))
        with pytest.raises(CifarCnnError, match=message):
            read_tune_settings(f)


def test_absurd_learning_rates_are_pruned_after_the_first_epoch(tmp_path: Path, official_dir: Path) -> None:
    (tmp_path / "tune.yaml").write_text(
        TUNE_YAML.replace("{lr: 0.000001, batch_size: 32}", "{lr: 0.000001, batch_size: 32}, {lr: 1.0e+6}")
    )
    settings = read_tune_settings(tmp_path / "tune.yaml")
    base = resolve_config(None, tmp_path / "tune.yaml")
    summary = run_study(base, str(official_dir), tmp_path / "t", trials=4, settings=settings, log=quiet, threads=1)
    study = optuna.load_study(study_name="cifar-cnn", storage=summary["storage"])
    states = [t.state for t in study.trials]
    assert states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    tiny, huge = study.trials[2], study.trials[3]
    # lr 1e-6 learns nothing: below the median of the first two at epoch 1, so the median pruner stops it there
    assert tiny.state == optuna.trial.TrialState.PRUNED and list(tiny.intermediate_values) == [1]
    assert tiny.intermediate_values[1] < min(t.intermediate_values[1] for t in study.trials[:2])
    # lr 1e6 diverges inside its first epoch: pruned too, nothing reported
    assert huge.state == optuna.trial.TrialState.PRUNED and not huge.intermediate_values
    assert summary["best"]["trial"] in (0, 1) and summary["states"] == {"complete": 2, "pruned": 2}
    # no trial was evaluated on the test split
    assert not list((tmp_path / "t" / "trials").rglob("test_metrics.json"))


def test_cli_tune_resumes_the_study_and_best_config_trains(tmp_path: Path, official_dir: Path) -> None:
    cfg = tmp_path / "tune.yaml"
    cfg.write_text(TUNE_YAML)
    out = tmp_path / "search"
    args = ["tune", "--data", str(official_dir), "--config", str(cfg), "--out", str(out), "--threads", "1", "--json"]
    first = run_cli(*args, "--trials", "3")
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert summary["trials"] == 3 and (out / "study.db").is_file() and summary["storage"].startswith("sqlite:///")
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call with the same study continues it
    second = run_cli(*args, "--trials", "1")
    assert second.returncode == 0, second.stderr
    again = json.loads(second.stdout)
    assert again["trials"] == 4 and "3 trial(s) so far" in second.stderr
    best = again["best"]
    rows = (out / "trials.csv").read_text().splitlines()[1:]
    done = [float(r.split(",")[2]) for r in rows if ",complete," in r]
    assert best["val_acc"] == max(done)
    # best.yaml is a config file train accepts, holding the best trial's values
    stored = yaml.safe_load((out / "best.yaml").read_text())
    assert stored["lr"] == pytest.approx(best["values"]["lr"]) and stored["batch_size"] == best["values"]["batch_size"]
    run = run_cli(
        "train", "--config", str(out / "best.yaml"), "--data", str(official_dir), "--epochs", "1",
        "--out", str(tmp_path / "run"), "--threads", "1", "--no-report", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    trained = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert {k: v for k, v in trained.items() if k != "epochs"} == {k: v for k, v in stored.items() if k != "epochs"}


def test_a_plain_postgresql_url_gets_the_installed_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"psycopg"}
    monkeypatch.setattr(tune.importlib.util, "find_spec", lambda name: object() if name in installed else None)
    assert tune.storage_url("postgresql://u@h:5433/db") == "postgresql+psycopg://u@h:5433/db"
    assert tune.storage_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"  # Heroku-style, SQLAlchemy refuses
    installed = {"psycopg2"}  # SQLAlchemy 2.1 would pick psycopg 3 for a plain URL, which is not there
    assert tune.storage_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    for url in ("postgresql+pg8000://u@h/db", "sqlite:////tmp/s.db", "mysql://u@h/db"):
        assert tune.storage_url(url) == url  # a named driver or another database: as given
    installed = set()
    with pytest.raises(CifarCnnError, match=r"no PostgreSQL driver is installed; pip install 'cifar-cnn\[postgres\]'"):
        tune.storage_url("postgresql://u:secret@h/db")
    assert tune.shown_url("postgresql+psycopg://u:secret@h/db") == "postgresql+psycopg://u:***@h/db"


def test_a_study_is_continued_only_over_the_space_it_was_searched_over() -> None:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(8):  # both optimizers: lr[sgd] and lr[adamw] each in some trials only
        trial = study.ask()
        suggest(trial, DEFAULT_SPACE)
        study.tell(trial, 0.5)
    tune.check_same_space(study, DEFAULT_SPACE, optuna, "memory")  # the same space: accepted
    narrower = {**DEFAULT_SPACE, "batch_size": [32, 64]}
    with pytest.raises(CifarCnnError, match=r"another space: batch_size was choices 32, 64, 128, now choices 32, 64;"):
        tune.check_same_space(study, narrower, optuna, "memory")
    with pytest.raises(CifarCnnError, match=r"another space: dropout was 0..0.5, now not searched"):
        tune.check_same_space(study, {k: v for k, v in DEFAULT_SPACE.items() if k != "dropout"}, optuna, "memory")
    with pytest.raises(CifarCnnError, match=r"another space: momentum was not searched, now it is"):
        tune.check_same_space(study, {**DEFAULT_SPACE, "momentum": [0.8, 0.9]}, optuna, "memory")
