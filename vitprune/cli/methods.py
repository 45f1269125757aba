"""`vitprune methods`: the registered token-reduction methods and their parameters."""
from __future__ import annotations

from rich.table import Table

from vitprune.cli.app import app
from vitprune.cli.common import JsonOpt, console, emit_json


@app.command("methods")
def methods_command(json_out: JsonOpt = False) -> None:
    """List each method: parameters (type, default, range), default layers, needs, calibrate, paper."""
    from vitprune.commands.methods import REFERENCE_DEPTH, method_table  # torch loads only when the command runs
    from vitprune.plan import format_value

    table = method_table()
    if json_out:
        emit_json({"methods": table, "default_layers_depth": REFERENCE_DEPTH})
        return
    overview = Table(title=f"Methods (default layers of a {REFERENCE_DEPTH}-block model)")
    for column in ("method", "default layers", "needs", "calibrate", "paper"):
        overview.add_column(column, overflow="fold")
    params = Table(title="Parameters: --method METHOD:NAME=VALUE,...@LAYERS")
    for column in ("method", "parameter", "type", "default", "range", "help"):
        params.add_column(column, overflow="fold")
    for entry in table:
        needs = ", ".join(entry["needs"] + (["per-image counts"] if entry["per_image"] else [])) or "-"
        overview.add_row(entry["name"], entry["default_layers"], needs, entry["calibrate"], entry["paper"])
        for param in entry["params"]:
            default = "required" if param["required"] else format_value(param["default"])
            params.add_row(entry["name"], param["name"], param["type"], default, param["range"], param["help"])
    console.print(overview)
    console.print(params)
