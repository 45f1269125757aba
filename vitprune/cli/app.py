"""The Typer app the command modules register on."""
from __future__ import annotations

import typer

from vitprune import __version__

app = typer.Typer(
    name="vitprune",
    help="Make pretrained timm Vision Transformers faster by token reduction, with evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _show_version(value: bool) -> None:
    if value:
        print(f"vitprune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True, help="Print the version."),
) -> None:
    """Make pretrained timm Vision Transformers faster by token reduction, with evidence."""
