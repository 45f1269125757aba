"""The `vitprune` command: a Typer app whose commands parse, call the library and render.

Each command lives in its own module here and registers on `app`; bad input anywhere becomes a
one-line error and exit code 2 (`run`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

import click
import typer

from vitprune.cli import apply, calibrate, cascade, export, finetune, methods, show  # noqa: F401  (each registers its command)
from vitprune.cli.app import app
from vitprune.cli.common import registry_help
from vitprune.errors import VitpruneError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class Stopped(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (timeout, Slurm, docker stop, Kubernetes), raised where the run is so
    that every `finally` removes its temporary outputs. A BaseException: no `except Exception` swallows
    it, and unlike KeyboardInterrupt no library turns it into something else (Typer makes that exit 130)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


STOPS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code, errors printed as one line on stderr (and, with
    --json, as {"error": ...} on stdout)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    previous = {signum: signal.signal(signum, _stop) for signum in STOPS} if _main_thread() else {}
    try:
        with _quiet_libraries():
            return _dispatch(argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The CLI's stderr is its own: libraries' log records (timm's "Dataset info file not found" on every
    wds/FOLDER --split run, transformers, huggingface_hub) and Python warnings (torch's, PIL's) are not
    printed, so that an error is exactly one line and a success prints none. VITPRUNE_DEBUG shows them,
    one line each. Filters set inside the library (a decompression bomb made an error) still apply."""
    debug = bool(os.environ.get("VITPRUNE_DEBUG"))
    disabled = logging.root.manager.disable
    with warnings.catch_warnings():
        if debug:
            warnings.showwarning = _one_line_warning
        else:
            warnings.simplefilter("ignore")
            logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(disabled)


def _dispatch(argv: list[str]) -> int:
    try:
        command = typer.main.get_command(app)
        registry_help(command, argv)
        result = command.main(args=argv, prog_name="vitprune", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except VitpruneError as error:
        return _fail(_with_flag(str(error), error.param, argv), EXIT_BAD_INPUT, argv)
    except (click.exceptions.Exit, typer.Exit) as done:
        return done.exit_code
    except (click.exceptions.Abort, typer.Abort, KeyboardInterrupt):
        return _fail("interrupted", 130, argv, fresh_line=True)
    except Stopped as stop:
        message, code = STOPS[stop.signum]
        return _fail(message, code, argv, fresh_line=True)
    except Exception as error:
        if _is_out_of_memory(error):
            return _fail(_out_of_memory_message(error, argv), EXIT_BAD_INPUT, argv)
        if _is_usage_error(error):
            if not error.format_message():  # no arguments at all: the help was printed, nothing to add
                return error.exit_code
            return _fail(error.format_message(), error.exit_code, argv)
        if os.environ.get("VITPRUNE_DEBUG"):  # a bug, not bad input: still one line unless debugging
            raise
        return _fail(f"internal error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                     "(set VITPRUNE_DEBUG=1 for the traceback)", EXIT_INTERNAL, argv)


# What a run holds in memory at once, by the option that sets it, most effective first: an out-of-memory
# error names those of the command that ran (a setting that cannot fit at all is refused before any work).
MEMORY_OPTIONS = ("batch_size", "bench_batch", "batch", "search_images", "stages", "limit")
ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate", "CUDA out of memory", "out of memory",
                      "Cannot allocate memory", "std::bad_alloc")


def _is_out_of_memory(error: BaseException) -> bool:
    """An allocator failure: MemoryError, torch.OutOfMemoryError (CUDA, MPS), or the RuntimeError torch's
    CPU allocator raises ("DefaultCPUAllocator: can't allocate memory")."""
    torch = sys.modules.get("torch")  # not imported by the CLI itself: --help stays light
    if isinstance(error, MemoryError) or (torch is not None and isinstance(error, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in ALLOCATOR_FAILURES)


def _out_of_memory_message(error: BaseException, argv: list[str]) -> str:
    flags = _flags(argv)
    lower = [flags[name] for name in MEMORY_OPTIONS if name in flags]
    advice = f"; lower {', '.join(lower[:-1])} or {lower[-1]}" if len(lower) > 1 else (
        f"; lower {lower[0]}" if lower else "; use smaller inputs or a machine with more memory")
    return f"out of memory during the run{advice}"


def _fail(message: str, code: int, argv: list[str], fresh_line: bool = False) -> int:
    _error(message, fresh_line=fresh_line)
    if "--json" in argv:
        sys.stdout.write(json.dumps({"error": " ".join(message.split())}) + "\n")
    return code


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """torch/PIL warnings as one `warning:` line each, not a source excerpt."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"warning: {text}", file=sys.stderr)


def _with_flag(message: str, param: str | None, argv: list[str]) -> str:
    """The library names its parameters (`keep must be ...`); say the command's flags (`--keep`):
    the parameter the error is about, and any other option name with an underscore (never an
    ordinary word, e.g. no_pretrained)."""
    if param is None:  # not about a parameter (a file's field, a model): nothing to translate
        return message
    flags = _flags(argv)
    names = [name for name in flags if name == param or "_" in name]
    for name in sorted(names, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flags[name], message, count=1)
    return message


def _flags(argv: list[str]) -> dict[str, str]:
    """Parameter name -> its long flag, for the command in `argv`."""
    if not argv:
        return {}
    sub = getattr(typer.main.get_command(app), "commands", {}).get(argv[0])
    return {option.name: max(option.opts, key=len) for option in getattr(sub, "params", [])
            if option.opts and option.opts[0].startswith("--")}


def _is_usage_error(error: Exception) -> bool:
    """A click usage error (unknown option, bad value, missing argument). Recent typer releases
    vendor their own copy of click, whose exception classes are not click's: recognise both."""
    return isinstance(error, click.ClickException) or (
        callable(getattr(error, "format_message", None)) and isinstance(getattr(error, "exit_code", None), int))


def _error(message: str, fresh_line: bool = False) -> None:
    # an interrupt can land in the middle of a progress bar's line: start a fresh one
    print(("\n" if fresh_line and sys.stderr.isatty() else "") + f"error: {' '.join(message.split())}", file=sys.stderr)


def main() -> None:
    sys.exit(run())
