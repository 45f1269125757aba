"""The one exception type for bad input: the CLI turns it into a one-line error and exit code 2."""


class VitpruneError(Exception):
    """A user-facing error (bad model name, keep rate, checkpoint, folder...). Its message is one line."""
