"""The one exception type for bad input: the CLI turns it into a one-line error and exit code 2."""
from __future__ import annotations


class VitpruneError(Exception):
    """A user-facing error (bad model name, keep rate, checkpoint, folder...). Its message is one line.

    `param`: the library parameter the message names first (e.g. "keep"), so the CLI can say
    its flag (--keep) instead.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
