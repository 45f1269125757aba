"""The `vitprune` command: a Typer app whose commands parse, call the library and render.

Each command lives in its own module here and registers on `app`; bad input anywhere becomes a
one-line error and exit code 2 (`run`).
"""
from __future__ import annotations

import os
import sys

import click
import typer

from vitprune.errors import VitpruneError

app = typer.Typer(
    name="vitprune",
    help="Make pretrained timm Vision Transformers faster by token reduction, with evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, errors printed as one line on stderr."""
    from vitprune.cli import apply  # noqa: F401  (registers the commands)
    from vitprune.cli import commands  # noqa: F401

    try:
        result = app(args=argv, prog_name="vitprune", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except VitpruneError as error:
        _error(str(error))
        return EXIT_BAD_INPUT
    except (click.exceptions.Exit, typer.Exit) as done:
        return done.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except Exception as error:
        if _is_usage_error(error):
            _error(error.format_message())
            return error.exit_code
        if os.environ.get("VITPRUNE_DEBUG"):  # a bug, not bad input: still one line unless debugging
            raise
        _error(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
               "(set VITPRUNE_DEBUG=1 for the traceback)")
        return EXIT_INTERNAL


def _is_usage_error(error: Exception) -> bool:
    """A click usage error (unknown option, bad value, missing argument). Recent typer releases
    vendor their own copy of click, whose exception classes are not click's: recognise both."""
    return isinstance(error, click.ClickException) or (
        callable(getattr(error, "format_message", None)) and isinstance(getattr(error, "exit_code", None), int))


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def main() -> None:
    sys.exit(run())


def _show_version(value: bool) -> None:
    if value:
        from vitprune import __version__

        print(f"vitprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version."),
) -> None:
    """Make pretrained timm Vision Transformers faster by token reduction, with evidence."""
