"""Bad-input catalogue rows for run directories: one writer, resume into another folder, --overwrite checked before
anything is moved (issue 16). Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py."""

from __future__ import annotations

from .bad_input_kit import Case, HttpCase

CASES: list[Case] = []
HTTP_CASES: list[HttpCase] = []
