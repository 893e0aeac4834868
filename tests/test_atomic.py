"""Atomic writes: the new file honours the umask (not mkstemp's 0600), a failed write keeps the old file."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from cifar_cnn import atomic
from cifar_cnn.atomic import atomic_write_bytes, atomic_write_text, current_umask


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_current_umask_reads_without_changing_it(set_umask: Callable[[int], None]) -> None:
    set_umask(0o027)
    assert current_umask() == 0o027
    assert current_umask() == 0o027  # reading it did not reset it
    set_umask(0o002)
    assert current_umask() == 0o002


def test_current_umask_falls_back_without_proc(
    set_umask: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_proc(*args: object, **kwargs: object) -> None:
        raise FileNotFoundError("/proc/self/status")

    monkeypatch.setattr(atomic, "open", no_proc, raising=False)
    set_umask(0o037)
    assert current_umask() == 0o037
    monkeypatch.undo()
    assert current_umask() == 0o037  # the fallback put the umask back


def test_new_file_under_umask_022_is_0644(tmp_path: Path, set_umask: Callable[[int], None]) -> None:
    set_umask(0o022)
    target = tmp_path / "best.pt"
    atomic_write_bytes(target, lambda f: f.write(b"weights"))
    assert target.read_bytes() == b"weights"
    assert mode_of(target) == 0o644


def test_new_file_under_umask_077_is_0600(tmp_path: Path, set_umask: Callable[[int], None]) -> None:
    set_umask(0o077)
    target = tmp_path / "best.pt"
    atomic_write_bytes(target, lambda f: f.write(b"weights"))
    assert mode_of(target) == 0o600


def test_new_file_under_umask_002_is_0664(tmp_path: Path, set_umask: Callable[[int], None]) -> None:
    set_umask(0o002)
    target = tmp_path / "report.json"
    atomic_write_text(target, "{}")
    assert mode_of(target) == 0o664


def test_overwrite_takes_the_current_umask_mode(tmp_path: Path, set_umask: Callable[[int], None]) -> None:
    target = tmp_path / "last.pt"
    set_umask(0o077)
    atomic_write_bytes(target, lambda f: f.write(b"one"))
    assert mode_of(target) == 0o600
    set_umask(0o022)
    atomic_write_bytes(target, lambda f: f.write(b"two"))
    assert (target.read_bytes(), mode_of(target)) == (b"two", 0o644)
    set_umask(0o077)
    atomic_write_bytes(target, lambda f: f.write(b"three"))
    assert (target.read_bytes(), mode_of(target)) == (b"three", 0o600)


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path, set_umask: Callable[[int], None]) -> None:
    set_umask(0o022)
    target = tmp_path / "best.pt"
    atomic_write_bytes(target, lambda f: f.write(b"old complete file"))

    def half_then_fail(f: object) -> None:
        f.write(b"new but trunc")  # type: ignore[attr-defined]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_bytes(target, half_then_fail)
    assert target.read_bytes() == b"old complete file"
    assert mode_of(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    def fail(f: object) -> None:
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        atomic_write_bytes(tmp_path / "new.json", fail)
    assert list(tmp_path.iterdir()) == []


def test_text_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "notes.txt"
    text = "accuracy 93.4 %\nclasses: chat, Hund, 鳥\n"
    atomic_write_text(target, text)
    assert target.read_text(encoding="utf-8") == text
    assert target.read_bytes() == text.encode("utf-8")
    atomic_write_text(target, "")
    assert target.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
