"""The one exception type for bad input: the CLI turns it into a one-line error and exit code 2."""
from __future__ import annotations


class VitpruneError(Exception):
    """A user-facing error (bad model name, keep rate, checkpoint, folder...). Its message is one line.

    `param`: the library parameter the message is about (e.g. "keep"), or several when the message
    names more than one (("plan_file", "method")), each written in the message as a whole word, so
    the CLI can say its flag (--keep) there instead. Nothing else in the message is ever rewritten.
    """

    def __init__(self, message: str, *, param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.params = (param,) if isinstance(param, str) else tuple(param or ())
