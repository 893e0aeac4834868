"""Labels files for a folder of images: formats, paths kept inside the folder, one-line errors at the right line,
--skip-bad, and the stratified test carve."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cifar_cnn.data.labels import (
    LabelRow,
    carve_test_split,
    check_training_classes,
    labels_line_message,
    read_labels,
)
from cifar_cnn.data.split import stratified_split
from cifar_cnn.errors import CifarCnnError

IMAGES = ("cat/1.png", "cat/2.png", "dog/1.png", "dog/2.png", "bird/1.png", "a,b.png", "x.png")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An image folder holding the files in IMAGES (their contents do not matter here)."""
    folder = tmp_path / "images"
    for rel in IMAGES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"not decoded by the labels reader")
    return folder


def write(tmp_path: Path, text: str | bytes, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def error_of(root: Path, labels: Path, **kwargs: bool) -> str:
    """The message read_labels raises, checked to be a single line."""
    with pytest.raises(CifarCnnError) as info:
        read_labels(root, labels, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


def at_line(message: str, labels: Path, line: int) -> None:
    assert message.startswith(f"{labels}:{line}: "), message
    assert "; " in message, "every message says what to do"


# ---- formats ----


def test_csv_without_split(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, "path,label\ncat/1.png,cat\ndog/1.png,dog\n\nbird/1.png,bird\n")
    table = read_labels(root, labels)
    assert [(r.rel, r.label, r.split, r.line) for r in table.rows] == [
        ("cat/1.png", "cat", None, 2),
        ("dog/1.png", "dog", None, 3),
        ("bird/1.png", "bird", None, 5),
    ]
    assert table.rows[0].path == root.absolute() / "cat" / "1.png" and table.rows[0].path.is_absolute()
    assert table.rows[2].where == f"{labels}:5"
    assert table.classes == ["bird", "cat", "dog"]
    assert table.has_splits is False and table.skipped == []


def test_csv_with_split_any_column_order_and_extra_columns_ignored(root: Path, tmp_path: Path) -> None:
    labels = write(
        tmp_path,
        "note,Split,label,path\nhi,train,cat,cat/1.png\n,val,cat,cat/2.png\nx,train,dog,dog/1.png\n,test,dog,dog/2.png\n",
    )
    table = read_labels(root, labels)
    assert table.has_splits
    assert [(r.rel, r.label, r.split) for r in table.rows] == [
        ("cat/1.png", "cat", "train"),
        ("cat/2.png", "cat", "val"),
        ("dog/1.png", "dog", "train"),
        ("dog/2.png", "dog", "test"),
    ]


def test_csv_quoted_fields_and_line_numbers_after_a_multiline_record(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, 'path,label\n"a,b.png","two\nlines"\nx.png,"quoted, comma"\nnope.png,cat\n')
    with pytest.raises(CifarCnnError, match="control or invalid character"):
        read_labels(root, labels)  # a label with a line break in it is refused ...
    labels = write(tmp_path, 'path,label\n"a,b.png","with, comma"\n"x.png",plain\n"cat/1.png","x"\n')
    table = read_labels(root, labels)  # ... a quoted comma is kept
    assert [(r.rel, r.label, r.line) for r in table.rows] == [
        ("a,b.png", "with, comma", 2),
        ("x.png", "plain", 3),
        ("cat/1.png", "x", 4),
    ]
    # a record spanning lines 2-3: the next record starts on line 4, and a missing file there is reported at 4
    labels = write(tmp_path, 'path,label,note\n"a,b.png",cat,"a note\nover two lines"\nnope.png,cat,\n')
    at_line(error_of(root, labels), labels, 4)


def test_csv_with_bom_and_crlf(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, b"\xef\xbb\xbfpath,label\r\ncat/1.png,cat\r\ndog/1.png,dog\r\n")
    table = read_labels(root, labels)
    assert [(r.rel, r.label, r.line) for r in table.rows] == [("cat/1.png", "cat", 2), ("dog/1.png", "dog", 3)]


def test_backslashes_normalized(root: Path, tmp_path: Path) -> None:
    table = read_labels(root, write(tmp_path, "path,label\ncat\\1.png,cat\n"))
    assert table.rows[0].rel == "cat/1.png" and table.rows[0].path == root.absolute() / "cat" / "1.png"


def test_jsonl(root: Path, tmp_path: Path) -> None:
    labels = write(
        tmp_path,
        '{"path": "cat/1.png", "label": "cat", "extra": 1}\n\n   \n'
        '{"label": "dog", "path": "dog/1.png", "split": null}\n',
        "labels.jsonl",
    )
    table = read_labels(root, labels)
    assert [(r.rel, r.label, r.split, r.line) for r in table.rows] == [
        ("cat/1.png", "cat", None, 1),
        ("dog/1.png", "dog", None, 4),
    ]
    assert not table.has_splits
    labels = write(
        tmp_path,
        '{"path": "cat/1.png", "label": "cat", "split": "train"}\n'
        '{"path": "cat/2.png", "label": "cat", "split": "test"}\n',
        "labels.jsonl",
    )
    table = read_labels(root, labels)
    assert table.has_splits and [r.split for r in table.rows] == ["train", "test"]


def test_jsonl_line_numbers_with_crlf_and_bare_cr(root: Path, tmp_path: Path) -> None:
    for newline in ("\r\n", "\r"):
        text = newline.join(['{"path": "cat/1.png", "label": "cat"}', "", '{"path": "gone.png", "label": "cat"}', ""])
        labels = write(tmp_path, text, "labels.jsonl")
        at_line(error_of(root, labels), labels, 3)


def test_class_names_are_string_sorted(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    names = ["b", "9", "10", "B", "a"]
    for i in range(len(names)):
        (folder / f"{i}.png").write_bytes(b"x")
    text = "path,label\n" + "".join(f"{i}.png,{name}\n" for i, name in enumerate(names))
    table = read_labels(folder, write(tmp_path, text))
    assert table.classes == ["10", "9", "B", "a", "b"]


# ---- paths ----


@pytest.mark.parametrize("path", ["../outside.png", "cat/../../outside.png", "/etc/passwd", "C:/x.png", "c:\\x.png"])
def test_paths_leaving_the_folder_are_refused(root: Path, tmp_path: Path, path: str) -> None:
    (tmp_path / "outside.png").write_bytes(b"x")
    labels = write(tmp_path, f"path,label\ncat/1.png,cat\n{path},cat\n")
    message = error_of(root, labels)
    at_line(message, labels, 3)
    assert "leaves the image folder" in message
    # still refused with skip_bad: the mistake is in the labels file
    at_line(error_of(root, labels, skip_bad=True), labels, 3)


def test_symlink_escaping_the_folder_is_refused_one_inside_is_kept(root: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(root / "cat" / "1.png", root / "alias.png")
    os.symlink(tmp_path, root / "updir")
    table = read_labels(root, write(tmp_path, "path,label\nalias.png,cat\n"))
    assert [r.rel for r in table.rows] == ["alias.png"]
    for bad in ("escape.png", "updir/secret.png"):
        labels = write(tmp_path, f"path,label\ncat/1.png,cat\n\n{bad},cat\n")
        message = error_of(root, labels)
        at_line(message, labels, 4)
        assert "outside the image folder" in message


# ---- errors: one line, at the right line ----

CSV_ERRORS = [
    # (labels text, line, words in the message)
    ("path,label\ncat/1.png,cat\ndog/1.png,dog,extra\n", 3, "3 fields, but the header has 2"),
    ("path,label\ncat/1.png\n", 2, "1 fields"),
    ("path,label\n,cat\n", 2, "empty path"),
    ("path,label\ncat/1.png,cat\n\ndog/1.png,  \n", 4, "empty label"),
    ('path,label\ncat/1.png,cat\n"dog/1.png,dog\n', 3, "bad CSV"),
    ("path,label,split\ncat/1.png,cat,train\ndog/1.png,dog,training\n", 3, "unknown split 'training'; use one of"),
    ("file,label,kind\ncat/1.png,cat,x\n", 1, "no 'path' column (columns found: 'file', 'label', 'kind')"),
    ("path,class\ncat/1.png,cat\n", 1, "no 'label' column"),
    ("path,label,label\ncat/1.png,cat,cat\n", 1, "names 'label' twice"),
    ("path,label\ncat/1.png,cat\ncat/2.png,cat\ncat/1.png,dog\n", 4, "duplicate path cat/1.png (also on line 2)"),
    ("path,label\ncat/1.png,cat\ncat/./1.png,dog\n", 3, "also on line 2"),
    (
        "path,label\ncat/1.png,cat\ncat/9.png,cat\n",
        3,
        "cat/9.png: no such file; fix or remove the row, or pass --skip-bad",
    ),
    ("path,label\ncat,cat\n", 2, "cat: not a regular file"),
    ("path,label,split\ncat/1.png,cat,train\ncat/2.png,cat,\ndog/1.png,dog,val\n", 3, "no split, but line 2 has one"),
    (
        "path,label,split\ncat/1.png,cat,train\ndog/1.png,dog,val\ndog/2.png,dog,test\n",
        3,
        "class 'dog' has no training",
    ),
]


@pytest.mark.parametrize(("text", "line", "words"), CSV_ERRORS)
def test_csv_errors_name_the_line(root: Path, tmp_path: Path, text: str, line: int, words: str) -> None:
    labels = write(tmp_path, text)
    message = error_of(root, labels)
    at_line(message, labels, line)
    assert words in message


def test_not_utf8_names_the_file_and_line(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, b"path,label\ncat/1.png,cat\n" + "dog/1.png,chien\xe9\n".encode("latin-1"))
    message = error_of(root, labels)
    at_line(message, labels, 3)
    assert "not UTF-8" in message


JSONL_ERRORS = [
    ('{"path": "cat/1.png", "label": "cat"}\n{"path": "dog/1.png", "label": "dog"\n', 2, "invalid JSON"),
    ('\n["cat/1.png", "cat"]\n', 2, "expected a JSON object, got list"),
    ('{"path": "cat/1.png", "label": "cat"}\n\n{"path": "dog/1.png"}\n', 3, 'missing key "label"'),
    ('{"label": "cat"}\n', 1, 'missing key "path"'),
    ('{"path": 3, "label": "cat"}\n', 1, '"path" must be a string, got 3 (int)'),
    ('{"path": "cat/1.png", "label": 1}\n', 1, '"label" must be a string'),
    ('{"path": "cat/1.png", "label": "cat", "split": "dev"}\n', 1, "unknown split 'dev'; use one of test, val, train"),
    ('{"path": "cat/1.png", "label": "cat", "split": 1}\n', 1, '"split" must be a string'),
    ('{"path": "cat/1.png", "label": "cat"}\n{"path": "cat/1.png", "label": "cat"}\n', 2, "also on line 1"),
    ('{"path": "cat/1.png", "label": "cat\\nx"}\n', 1, "control or invalid character"),
    ('{"path": "cat/\\ud800.png", "label": "cat"}\n', 1, "control or invalid character"),
]


@pytest.mark.parametrize(("text", "line", "words"), JSONL_ERRORS)
def test_jsonl_errors_name_the_line(root: Path, tmp_path: Path, text: str, line: int, words: str) -> None:
    labels = write(tmp_path, text, "labels.jsonl")
    message = error_of(root, labels)
    at_line(message, labels, line)
    assert words in message


@pytest.mark.parametrize(("text", "name"), [("", "labels.csv"), ("path,label\n\n", "labels.csv"), ("\n\n", "l.jsonl")])
def test_a_file_without_rows_is_an_error(root: Path, tmp_path: Path, text: str, name: str) -> None:
    labels = write(tmp_path, text, name)
    assert error_of(root, labels).startswith(f"{labels}: the labels file has no rows")


def test_unknown_suffix_names_the_accepted_ones(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, "path,label\ncat/1.png,cat\n", "labels.txt")
    message = error_of(root, labels)
    assert message.startswith(str(labels)) and ".csv" in message and ".jsonl" in message and "'.txt'" in message


def test_missing_labels_file_and_missing_folder(root: Path, tmp_path: Path) -> None:
    assert "no such labels file" in error_of(root, tmp_path / "none.csv")
    labels = write(tmp_path, "path,label\ncat/1.png,cat\n")
    assert "not a folder" in error_of(tmp_path / "nowhere", labels)


# ---- skip_bad ----


def test_skip_bad_skips_missing_files_and_reports_them(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, "path,label\ncat/1.png,cat\ngone.png,cat\ndog/1.png,dog\ncat,cat\nalso/gone.png,dog\n")
    table = read_labels(root, labels, skip_bad=True)
    assert [r.rel for r in table.rows] == ["cat/1.png", "dog/1.png"]
    assert table.skipped == [
        f"{labels}:3: gone.png: no such file",
        f"{labels}:5: cat: not a regular file",
        f"{labels}:6: also/gone.png: no such file",
    ]
    assert table.classes == ["cat", "dog"]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("path,label\ngone.png,cat\ncat/1.png,cat,x\n", 3),  # syntax
        ("path,label,split\ngone.png,cat,train\ncat/1.png,cat,dev\n", 3),  # unknown split
        ("path,label\ngone.png,cat\ngone.png,cat\n", 3),  # duplicate, even of a skipped row
    ],
)
def test_skip_bad_still_raises_on_mistakes_in_the_labels_file(root: Path, tmp_path: Path, text: str, line: int) -> None:
    labels = write(tmp_path, text)
    at_line(error_of(root, labels, skip_bad=True), labels, line)


def test_skip_bad_with_every_row_skipped_is_an_error(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, "path,label\ngone.png,cat\nlost.png,dog\n")
    message = error_of(root, labels, skip_bad=True)
    assert message.startswith(f"{labels}: all 2 rows name missing") and f"{labels}:2: gone.png" in message


def test_skip_bad_can_leave_a_class_without_training_rows(root: Path, tmp_path: Path) -> None:
    labels = write(tmp_path, "path,label,split\ncat/1.png,cat,train\ngone.png,dog,train\ndog/1.png,dog,val\n")
    at_line(error_of(root, labels), labels, 3)  # without skip_bad the missing file is the error ...
    message = error_of(root, labels, skip_bad=True)
    at_line(message, labels, 4)  # ... with it, dog is left with val rows only
    assert "class 'dog'" in message


# ---- helpers for the caller ----


def test_labels_line_message() -> None:
    row = LabelRow(Path("/d/photos/x.jpg"), "photos/x.jpg", "cat", None, 7, "labels.csv:7")
    assert labels_line_message(row, "cannot decode it") == (
        "labels.csv:7: photos/x.jpg: cannot decode it; fix or remove the row, or pass --skip-bad to skip it"
    )


def test_check_training_classes_after_a_carve() -> None:
    rows = [
        LabelRow(Path(f"/d/{i}.png"), f"{i}.png", lab, None, i + 2, f"l.csv:{i + 2}") for i, lab in enumerate("aab")
    ]
    check_training_classes(rows, [True, False, True], held_out="the test split")
    with pytest.raises(CifarCnnError, match=r"^l\.csv:4: class 'b' has no training images .*the test split"):
        check_training_classes(rows, [True, True, False], held_out="the test split")


def keys(n: int) -> list[str]:
    return [f"photos/{i}.jpg" for i in range(n)]


def test_carve_holds_out_about_the_fraction_of_each_class() -> None:
    labels = np.repeat(np.arange(4), [1000, 500, 10, 3])
    train, test = carve_test_split(labels, keys(len(labels)), 0.2)
    held = np.bincount(labels[test], minlength=4)
    assert 170 <= held[0] <= 230 and 80 <= held[1] <= 120  # binomial: within 3 standard deviations of 20%
    assert 1 <= held[2] <= 9 and 1 <= held[3] <= 2
    assert set(train).isdisjoint(test) and len(set(train) | set(test)) == len(labels)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)


def test_carve_small_classes() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    train, test = carve_test_split(labels, keys(len(labels)), 0.01)
    assert np.bincount(labels[test], minlength=3).tolist() == [0, 1, 1]  # at least one when a class has >= 2 rows
    train, test = carve_test_split(labels, keys(len(labels)), 0.99)
    assert np.bincount(labels[train], minlength=3).tolist() == [1, 1, 1]  # never the whole class
    train, test = carve_test_split(labels, keys(len(labels)), 0.0)
    assert len(test) == 0 and train.tolist() == list(range(len(labels)))


def test_carve_depends_on_each_rows_path_only() -> None:
    """Adding, removing or reordering rows never moves a row between training and test."""
    names = keys(200)
    test = {names[i] for i in carve_test_split(np.zeros(200, dtype=int), names, 0.25)[1]}
    assert 30 <= len(test) <= 70
    more = names + [f"photos/new{i}.jpg" for i in range(50)]
    test_more = {more[i] for i in carve_test_split(np.zeros(250, dtype=int), more, 0.25)[1]}
    assert test_more & set(names) == test  # the old rows kept their splits
    fewer = names[::2]
    assert {fewer[i] for i in carve_test_split(np.zeros(100, dtype=int), fewer, 0.25)[1]} == test & set(fewer)
    shuffled = list(reversed(names))
    assert {shuffled[i] for i in carve_test_split(np.zeros(200, dtype=int), shuffled, 0.25)[1]} == test
    assert test != {names[i] for i in stratified_split(np.zeros(200, dtype=int), 0.25, seed=0)[1]}


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_carve_refuses_a_bad_fraction(fraction: float) -> None:
    with pytest.raises(CifarCnnError, match="test fraction must be in"):
        carve_test_split(np.zeros(4, dtype=int), keys(4), fraction)
