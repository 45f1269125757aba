"""The `vitprune` command: a Typer app whose commands parse, call the library and render.

Each command lives in its own module here and registers on `app`; bad input anywhere becomes a
one-line error and exit code 2 (`run`).
"""
from __future__ import annotations

import os
import re
import sys

import click
import typer

from vitprune.cli import apply, calibrate, cascade, export, finetune  # noqa: F401  (each registers its command)
from vitprune.cli.app import app
from vitprune.errors import VitpruneError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, errors printed as one line on stderr."""
    try:
        result = app(args=argv, prog_name="vitprune", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except VitpruneError as error:
        _error(_with_flag(str(error), error.param, argv if argv is not None else sys.argv[1:]))
        return EXIT_BAD_INPUT
    except (click.exceptions.Exit, typer.Exit) as done:
        return done.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except Exception as error:
        if _is_usage_error(error):
            if error.format_message():  # no arguments at all: the help was printed, nothing to add
                _error(error.format_message())
            return error.exit_code
        if os.environ.get("VITPRUNE_DEBUG"):  # a bug, not bad input: still one line unless debugging
            raise
        _error(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
               "(set VITPRUNE_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


def _with_flag(message: str, param: str | None, argv: list[str]) -> str:
    """The library names its parameters (`keep must be ...`); say the command's flag (`--keep`)."""
    flag = _flag_of(param, argv)
    if flag is None:
        return message
    return re.sub(rf"(?<![\w-]){re.escape(param)}(?![\w-])", flag, message, count=1)


def _flag_of(param: str | None, argv: list[str]) -> str | None:
    if param is None or not argv:
        return None
    command = typer.main.get_command(app)
    sub = getattr(command, "commands", {}).get(argv[0])
    for option in getattr(sub, "params", []):
        if option.name == param and option.opts and option.opts[0].startswith("--"):
            return max(option.opts, key=len)
    return None


def _is_usage_error(error: Exception) -> bool:
    """A click usage error (unknown option, bad value, missing argument). Recent typer releases
    vendor their own copy of click, whose exception classes are not click's: recognise both."""
    return isinstance(error, click.ClickException) or (
        callable(getattr(error, "format_message", None)) and isinstance(getattr(error, "exit_code", None), int))


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def main() -> None:
    sys.exit(run())
