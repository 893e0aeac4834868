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


class Stopped(BaseException):
    """A stop signal that arrived where nothing polls for one (the final test, calibration, the report): raised from
    the signal handler so the command stops within moments. A BaseException, so no `except Exception` swallows it;
    the command catches it, says what state the run is in, and exits with `exit_code` (128 + the signal number)."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"{name} received")
        self.signum, self.name = signum, name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
