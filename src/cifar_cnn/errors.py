"""The one exception type for a user's mistake or bad input.

The command line prints it as a single line and exits with code 2, without a traceback; library callers catch it
like any other exception.
"""

from __future__ import annotations


class CifarCnnError(Exception):
    """Bad usage or bad input: a message that names the file or value and says what to do."""

    exit_code = 2


class PartialFailure(CifarCnnError):
    """Some inputs failed while the rest were done (exit code 1)."""

    exit_code = 1
