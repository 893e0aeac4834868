"""A labels file for a folder of images (`--data DIR --labels FILE`): which image has which class, and optionally
which split it belongs to. Torch-free.

Two formats: CSV with a header naming `path` and `label` (and optionally `split`; other columns are ignored), or
JSON Lines with one object per line holding "path", "label" and optionally "split". Paths are relative to DIR and
may not leave it. Every mistake is reported as one line, `<file>:<line>: <what is wrong>; <what to do>`, where the
line is the physical line (1-based) on which the row starts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..choices import SPLITS
from ..errors import CifarCnnError
from .images import read_capped

MAX_LABELS_BYTES = 256 * 2**20  # a labels file of millions of rows is ~100 MB

LABEL_SUFFIXES = (".csv", ".jsonl")
SKIP_ADVICE = "fix or remove the row, or pass --skip-bad to skip it"
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # would break a one-line message


@dataclass(frozen=True)
class LabelRow:
    """One kept row of the labels file."""

    path: Path  # absolute path of the image file (DIR / rel)
    rel: str  # the path as written, backslashes normalized to '/'
    label: str  # the class name
    split: str | None  # 'train' | 'val' | 'test', or None when the file has no split column
    line: int  # 1-based line in the labels file on which the row starts
    where: str  # f"{labels_file}:{line}" for messages


@dataclass
class LabelTable:
    """What a labels file says, after checking it against the image folder."""

    rows: list[LabelRow]  # the kept rows, in file order
    classes: list[str]  # the sorted set of labels of the kept rows
    skipped: list[str]  # one message per row skipped with skip_bad ("labels.csv:7: photos/x.jpg: no such file")
    has_splits: bool  # every row names its split; False: every row is a training row
    listed: list[Path] = field(default_factory=list)  # every path the file names, skipped rows' too


@dataclass(frozen=True)
class _Record:
    """A row as parsed, before its path is checked against the folder."""

    line: int
    path: str
    label: str
    split: str | None


def labels_line_message(row: LabelRow, problem: str) -> str:
    """The message for an image that the labels file lists but that cannot be used (missing, undecodable...)."""
    return f"{row.where}: {row.rel}: {problem}; {SKIP_ADVICE}"


def read_labels(root: Path, labels_file: Path, *, skip_bad: bool = False) -> LabelTable:
    """Read and check `labels_file` for the images under `root`.

    With `skip_bad`, rows naming a missing or unreadable file are left out and listed in `skipped`; mistakes in the
    labels file itself (syntax, unknown split, duplicate, a path leaving `root`) are errors either way.
    """
    name = str(labels_file)
    suffix = Path(labels_file).suffix.lower()
    if suffix not in LABEL_SUFFIXES:
        raise CifarCnnError(
            f"{name}: unknown labels file type {suffix or '(no suffix)'!r}; use a {' or '.join(LABEL_SUFFIXES)} file"
        )
    if not Path(root).is_dir():
        raise CifarCnnError(f"{root}: not a folder; --data must name the folder the labels file's paths start from")
    text = _read_text(Path(labels_file), name)
    parse = _csv_records if suffix == ".csv" else _jsonl_records
    records = list(parse(text, name))
    if not records:
        raise CifarCnnError(f"{name}: the labels file has no rows; list one image per row with its path and label")
    has_splits = _check_split_column(records, name)
    rows, skipped = _check_paths(Path(root), records, name, skip_bad)
    if not rows:
        raise CifarCnnError(
            f"{name}: all {len(skipped)} rows name missing or unreadable files (first: {skipped[0]}); "
            "check that --data names the folder the paths start from"
        )
    if has_splits:
        check_training_classes(rows, [row.split == "train" for row in rows])
    listed = [Path(root) / rec.path for rec in records]
    return LabelTable(rows, sorted({row.label for row in rows}), skipped, has_splits, listed)


def check_training_classes(rows: Sequence[LabelRow], is_train: Sequence[bool], held_out: str = "val/test") -> None:
    """Error, at the class's first row, when a class has rows but none of them is for training.

    `is_train[i]` says whether `rows[i]` trains; `held_out` names where the other rows went, for the message.
    """
    trained = {row.label for row, train in zip(rows, is_train, strict=True) if train}
    first: dict[str, LabelRow] = {}
    for row in rows:
        first.setdefault(row.label, row)
    missing = sorted(first.keys() - trained)
    if missing:
        raise CifarCnnError(
            f"{first[missing[0]].where}: class {missing[0]!r} has no training images (it appears only in {held_out}); "
            "give it rows with split train, or remove its rows"
        )


def carve_test_split(labels: np.ndarray, keys: Sequence[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): a row is a test row when the hash of its key (its path), read as a number in [0, 1), is
    below `fraction`, so about that fraction of each class is held out and a row's split depends on its own path only:
    adding, removing or fixing other rows never moves a row between training and test. A class with 2 or more rows
    keeps at least one of each (its lowest or highest hash moves); a class with a single row stays in train."""
    if not 0.0 <= fraction < 1.0:
        raise CifarCnnError(f"the test fraction must be in [0, 1), got {fraction}; pick a fraction such as 0.2")
    labels = np.asarray(labels)
    u = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:15], 16) / 16**15 for k in keys])
    chosen = u < fraction
    for cls in np.unique(labels) if fraction > 0 else ():
        idx = np.flatnonzero(labels == cls)
        if len(idx) >= 2 and not chosen[idx].any():
            chosen[idx[np.argmin(u[idx])]] = True
        if chosen[idx].all():
            chosen[idx[np.argmax(u[idx])]] = False
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)


def _read_text(labels_file: Path, name: str) -> str:
    if not labels_file.exists():
        raise CifarCnnError(f"{name}: no such labels file; check the --labels path")
    raw = read_capped(labels_file, name, MAX_LABELS_BYTES)  # a FIFO or /dev/zero is refused, not read forever
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CifarCnnError(
            f"{name}:{line}: the labels file is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it as UTF-8"
        ) from None


def _csv_records(text: str, name: str) -> Iterator[_Record]:
    """The rows of a CSV labels file, each with the line it starts on; blank lines are skipped."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _next_fields(reader, name, 1)
    if header is None:
        return
    columns, width = _csv_header(header, name), len(header)
    while True:
        start = reader.line_num + 1  # a record starts on the line after the previous one ended
        fields = _next_fields(reader, name, start)
        if fields is None:
            return
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        where = f"{name}:{start}"
        if len(fields) != width:
            raise CifarCnnError(
                f"{where}: {len(fields)} fields, but the header has {width}; "
                'quote a path or label that contains a comma ("a,b.jpg")'
            )
        split = fields[columns["split"]] if "split" in columns else None
        yield _record(where, start, fields[columns["path"]], fields[columns["label"]], split)


def _next_fields(reader: Iterator[list[str]], name: str, start: int) -> list[str] | None:
    """The next CSV record, or None at the end of the file."""
    try:
        return next(reader, None)
    except csv.Error as e:
        raise CifarCnnError(f"{name}:{start}: bad CSV ({e}); check the quotes on this row") from None


def _csv_header(fields: list[str], name: str) -> dict[str, int]:
    """Column positions of path, label and split from the header on line 1."""
    found = [f.strip().lower() for f in fields]
    columns: dict[str, int] = {}
    for i, column in enumerate(found):
        if column in ("path", "label", "split"):
            if column in columns:
                raise CifarCnnError(f"{name}:1: the header names {column!r} twice; keep one {column} column")
            columns[column] = i
    missing = [c for c in ("path", "label") if c not in columns]
    if missing:
        shown = ", ".join(repr(f) for f in fields) or "none"
        raise CifarCnnError(
            f"{name}:1: no {' or '.join(repr(c) for c in missing)} column (columns found: {shown}); "
            "line 1 must be a header naming path and label (and optionally split)"
        )
    return columns


def _jsonl_records(text: str, name: str) -> Iterator[_Record]:
    """The objects of a JSON Lines labels file, one per line; blank lines are skipped."""
    for line, content in enumerate(io.StringIO(text, newline=""), start=1):
        if not content.strip():
            continue
        where = f"{name}:{line}"
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as e:
            raise CifarCnnError(
                f"{where}: invalid JSON ({e.msg} at column {e.colno}); write one object per line"
            ) from None
        if not isinstance(obj, dict):
            raise CifarCnnError(
                f'{where}: expected a JSON object, got {type(obj).__name__}; write {{"path": ..., "label": ...}}'
            )
        for key in ("path", "label"):
            if key not in obj:
                raise CifarCnnError(f'{where}: missing key "{key}"; every object needs "path" and "label"')
        for key in ("path", "label", "split"):
            value = obj.get(key)
            if not isinstance(value, str) and not (key == "split" and value is None):
                raise CifarCnnError(
                    f'{where}: "{key}" must be a string, got {_show(value)} ({type(value).__name__}); quote it'
                )
        yield _record(where, line, obj["path"], obj["label"], obj.get("split"))


def _record(where: str, line: int, path: str, label: str, split: str | None) -> _Record:
    """A row's values checked on their own: non-empty printable path and label, a known split (or none)."""
    path, label = path.strip(), label.strip()
    for what, value in (("path", path), ("label", label)):
        if not value:
            raise CifarCnnError(f"{where}: empty {what}; give every row a path and a label")
        if _CONTROL.search(value) or not _is_encodable(value):
            raise CifarCnnError(f"{where}: the {what} {_show(value)} contains a control or invalid character; fix it")
    split = (split or "").strip() or None
    if split is not None and split not in SPLITS:
        raise CifarCnnError(f"{where}: unknown split {_show(split)}; use one of {', '.join(SPLITS)}")
    return _Record(line, path.replace("\\", "/"), label, split)


def _check_split_column(records: list[_Record], name: str) -> bool:
    """True when every row names a split, False when none does; an error when only some do."""
    with_split = next((r for r in records if r.split is not None), None)
    without = next((r for r in records if r.split is None), None)
    if with_split is not None and without is not None:
        raise CifarCnnError(
            f"{name}:{without.line}: this row has no split, but line {with_split.line} has one ({with_split.split}); "
            f"give every row a split ({', '.join(SPLITS)}) or none"
        )
    return with_split is not None


def _check_paths(root: Path, records: list[_Record], name: str, skip_bad: bool) -> tuple[list[LabelRow], list[str]]:
    """Rows whose paths stay inside `root`, are not repeated and name regular files (or are skipped, with skip_bad)."""
    base = root.absolute()
    real_base = Path(os.path.realpath(root))
    seen: dict[tuple[str, ...], int] = {}
    rows: list[LabelRow] = []
    skipped: list[str] = []
    for rec in records:
        where = f"{name}:{rec.line}"
        parts = tuple(p for p in rec.path.split("/") if p not in ("", "."))
        if rec.path.startswith("/") or _DRIVE.match(rec.path) or ".." in parts:
            raise CifarCnnError(
                f"{where}: the path {rec.path} leaves the image folder; write paths relative to --data, inside it"
            )
        path = base.joinpath(*parts)
        if not Path(os.path.realpath(path)).is_relative_to(real_base):
            raise CifarCnnError(
                f"{where}: the path {rec.path} is a link to a file outside the image folder; copy the file into it"
            )
        if parts in seen:
            raise CifarCnnError(
                f"{where}: duplicate path {rec.path} (also on line {seen[parts]}); remove one of the two rows"
            )
        seen[parts] = rec.line
        row = LabelRow(path, rec.path, rec.label, rec.split, rec.line, where)
        problem = _file_problem(path)
        if problem is None:
            rows.append(row)
        elif skip_bad:
            skipped.append(f"{where}: {rec.path}: {problem}")
        else:
            raise CifarCnnError(labels_line_message(row, problem))
    return rows, skipped


def _file_problem(path: Path) -> str | None:
    """Why the image file cannot be used, or None."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:
        return f"cannot read it ({e.strerror or e})"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "cannot read it (permission denied)"
    return None


def _is_encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800" escape
        return False
    return True


def _show(value: object) -> str:
    """A user's value for a message, quoted and on one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
