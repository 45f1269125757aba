"""The one table renderer: a report table built once, rendered as markdown (report.md) or rich (the terminal)."""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.table import Table


@dataclass
class ReportTable:
    """Columns and rows of strings; the first column is left-aligned, the others right-aligned."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    title: str = ""

    def add(self, *cells: object) -> None:
        self.rows.append([str(cell) for cell in cells])

    def markdown(self) -> str:
        lines = [f"| {' | '.join(self.columns)} |", "|" + "---|" * len(self.columns)]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)

    def rich(self) -> Table:
        table = Table(title=self.title or None, title_justify="left")
        for index, column in enumerate(self.columns):
            table.add_column(column, justify="left" if index == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table
