"""The one progress-bar factory: rich, on stderr (stdout stays clean for --json)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(enabled: bool = True, *, fields: str = "") -> Progress:
    """A rich Progress for one step or several; `fields` adds a text column (e.g. "{task.fields[loss]}")."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    if fields:
        columns.append(TextColumn(fields))
    return Progress(*columns, console=Console(stderr=True), disable=not enabled)
