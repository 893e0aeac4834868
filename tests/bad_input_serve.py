"""Bad-input catalogue rows for the HTTP server: hostile uploads, Host header, slow clients, options of `cifar-cnn
serve` (issue 16). Gathered by test_bad_input.py; the row types and builders are in bad_input_kit.py."""

from __future__ import annotations

from .bad_input_kit import Case, HttpCase

CASES: list[Case] = []
HTTP_CASES: list[HttpCase] = []
