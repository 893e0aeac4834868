"""Bad-input catalogue rows for images, archives, folders and file names: size budgets after resizing, archive members,
non-regular files, links, EXIF (issue 16). Gathered by test_bad_input.py; the row types and builders are in
bad_input_kit.py."""

from __future__ import annotations

from .bad_input_kit import Case, HttpCase

CASES: list[Case] = []
HTTP_CASES: list[HttpCase] = []
