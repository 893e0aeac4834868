"""Bad-input catalogue rows for run directories: one writer, resume into another folder, --overwrite checked before
anything is moved (issue 16). Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py."""

from __future__ import annotations

from pathlib import Path

from .bad_input_kit import Case, Env, HttpCase


def config_file(e: Env, name: str, text: str) -> Path:
    (e.tmp / name).write_text(text)
    return e.tmp / name


def another_run(e: Env) -> Path:
    """A folder holding a different (finished) run: what `--resume A/last.pt --out B` must not write into."""
    return e.tree({"best.pt": b"another run's weights", "config.yaml": b"epochs: 3\n", "run.json": b"{}"}, "other")


CASES: list[Case] = [
    (
        "resume-into-another-run",
        "run dir",
        "--resume A/last.pt --out B, where B holds another run",
        lambda e: ["train", "--resume", str(e.run / "last.pt"), "--out", str(another_run(e)), "--threads", "1"],
        "holds another run, not the one",
    ),
    (
        "overwrite-translate-too-large",
        "run dir",
        "--overwrite with translate 40 on 32-pixel images (torch would fail at the first step)",
        lambda e: e.train_into_run(
            "--data", str(e.official), "--config", str(config_file(e, "t.yaml", "translate: 40\n"))
        ),
        "translate 40: shifts must be smaller than the 32-pixel images",
    ),
    (
        "overwrite-airbench-zero-widths",
        "run dir",
        "--overwrite with airbench widths [0, 0, 0]",
        lambda e: e.train_into_run(
            "--data",
            str(e.official),
            "--config",
            str(config_file(e, "w.yaml", "model: airbench\nmodel_args: {widths: [0, 0, 0]}\n")),
        ),
        "every width must be >= 1",
    ),
]
HTTP_CASES: list[HttpCase] = []
