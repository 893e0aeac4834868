"""Bad-input catalogue rows for what the report reads and what outputs name: a damaged metrics.csv or run.json in a
run directory (a copy of the finished run, so `e.run` stays untouched) is one line naming the file and its line
(issue 16). Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py. (Non-UTF-8 file names
and non-finite model outputs are per-file results with exit code 1, so they are held in test_predict.py and
test_report.py instead.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .bad_input_kit import Case, Env, HttpCase

HEADER = "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n"
ROW = "1,2.30,0.10,2.29,0.20,0.01,0.2\n"


def run_copy(e: Env, name: str, **files: str) -> Path:
    """A copy of the finished run in e.tmp with some of its files (metrics_csv=..., run_json=...) replaced."""
    copy = e.tmp / name
    shutil.copytree(e.run, copy)
    for key, text in files.items():
        (copy / key.replace("_", ".")).write_text(text)
    return copy


def run_json_with(e: Env, **fields: object) -> str:
    """The finished run's run.json with some fields replaced."""
    return json.dumps({**json.loads((e.run / "run.json").read_text()), **fields})


def report_of(e: Env, name: str, **files: str) -> list[str]:
    return ["report", str(run_copy(e, name, **files)), "--threads", "1"]


CASES: list[Case] = [
    (
        "report-metrics-not-a-number",
        "report",
        "metrics.csv with a word where train_loss goes",
        lambda e: report_of(e, "nan_row", metrics_csv=HEADER + ROW + "2,abc,0.1,2.2,0.2,0.01,0.2\n"),
        "metrics.csv:3: train_loss is 'abc', not a number",
    ),
    (
        "report-metrics-short-row",
        "report",
        "metrics.csv with a row of 3 cells",
        lambda e: report_of(e, "short_row", metrics_csv=HEADER + "1,2.3,0.1\n"),
        "metrics.csv:2: 3 cells under a header of 7",
    ),
    (
        "report-metrics-header",
        "report",
        "metrics.csv whose header lacks columns",
        lambda e: report_of(e, "bad_header", metrics_csv="epoch,loss\n1,2.3\n"),
        "metrics.csv:1: the header lacks train_loss",
    ),
    (
        "report-metrics-epoch",
        "report",
        "metrics.csv with epoch 0.5",
        lambda e: report_of(e, "half_epoch", metrics_csv=HEADER + ROW.replace("1,", "0.5,", 1)),
        "epoch is '0.5', not a whole number",
    ),
    (
        "report-metrics-binary",
        "report",
        "metrics.csv holding bytes that are not UTF-8",
        lambda e: ["report", str(_binary_metrics(e)), "--threads", "1"],
        "metrics.csv: not a CSV file of numbers",
    ),
    (
        "report-run-json-list",
        "report",
        "run.json holding a list",
        lambda e: report_of(e, "list_run", run_json="[1, 2]"),
        "run.json: expected a JSON object, found a list",
    ),
    (
        "report-run-json-garbled",
        "report",
        "run.json cut short",
        lambda e: report_of(e, "cut_run", run_json='{"status": "fin'),
        "run.json: not valid JSON",
    ),
    (
        "report-run-json-status-type",
        "report",
        "run.json whose status is a list",
        lambda e: report_of(e, "status_list", run_json=run_json_with(e, status=["finished"])),
        "field 'status' is a list",
    ),
    (
        "report-run-json-seconds-type",
        "report",
        "run.json whose seconds is a string",
        lambda e: report_of(e, "seconds_text", run_json=run_json_with(e, seconds="ten")),
        "field 'seconds' is a string",
    ),
    (
        "report-run-json-threads-bool",
        "report",
        "run.json whose threads is true",
        lambda e: report_of(e, "threads_bool", run_json=run_json_with(e, threads=True)),
        "field 'threads' is true/false",
    ),
]


def _binary_metrics(e: Env) -> Path:
    copy = run_copy(e, "binary_metrics")
    (copy / "metrics.csv").write_bytes(b"epoch,train_loss\xff\xfe\n")
    return copy


HTTP_CASES: list[HttpCase] = []
