"""Options are declared once, in the request dataclasses: each Typer command is checked against its request.

Every request field is an option of the command (same name, same default), or is listed here as
what the CLI derives it from; every option is a request field or a CLI-only setting.
"""
import dataclasses
import subprocess
import sys

import pytest
import typer

from vitprune.cli import app, run
from vitprune.commands.apply import ApplyRequest
from vitprune.commands.calibrate import CalibrateRequest
from vitprune.commands.cascade import CascadeRequest
from vitprune.commands.export import ExportRequest
from vitprune.commands.finetune import FinetuneRequest
from vitprune.commands.show import ShowRequest

CLI_ONLY = {"threads", "json_out"}  # torch's thread count and the output format are the CLI's own
# request field -> the option(s) the CLI derives it from (a flag that negates it, a switch, a parsed list);
# None: a library-only setting the CLI leaves at its default
DERIVED = {
    "apply": {"fuse": "no_fuse", "bench_batches": ("bench", "bench_batch"), "progress": "json_out"},
    "export": {"fuse": "no_fuse", "bench_batches": "bench_batch", "progress": "json_out", "verify_batch": None},
    "finetune": {"fuse": "no_fuse", "augment": "no_augment", "progress": "json_out", "eval_batch_size": None,
                 "features": None},
    "calibrate": {"head_only": "no_head_only", "progress": "json_out",
                  "budget": ("target_gmacs", "target_ratio", "target_latency_ms", "max_drop", "batch"),
                  "finetune": ("finetune", "epochs", "lr", "trainable")},
    "cascade": {"progress": "json_out", "budget": ("target_gmacs", "target_ratio")},
    "show": {"fuse": "no_fuse", "features": None},
}
REQUESTS = {"apply": ApplyRequest, "export": ExportRequest, "finetune": FinetuneRequest,
            "calibrate": CalibrateRequest, "cascade": CascadeRequest, "show": ShowRequest}


def _options(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {param.name: param for param in command.params}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_every_request_field_is_an_option_with_the_same_default(name):
    options = _options(name)
    derived = DERIVED[name]
    derived_from = {opt for value in derived.values() if value for opt in ((value,) if isinstance(value, str) else value)}
    for field in dataclasses.fields(REQUESTS[name]):
        if field.name in derived:
            continue
        assert field.name in options, f"{name}: request field {field.name} has no option"
        default = field.default if field.default is not dataclasses.MISSING else None
        cli_default = options[field.name].default
        if isinstance(default, tuple) and isinstance(cli_default, str):  # a comma-separated list option
            cli_default = tuple(part.strip() for part in cli_default.split(","))
        if field.default is not dataclasses.MISSING and not callable(cli_default):
            assert cli_default == default or (isinstance(default, tuple) and cli_default is None), (
                f"{name}: --{field.name} default {cli_default!r} but the request's is {default!r}")
    fields = {field.name for field in dataclasses.fields(REQUESTS[name])}
    stray = set(options) - fields - CLI_ONLY - derived_from
    assert not stray, f"{name}: options that are not request fields: {sorted(stray)}"


def test_the_front_door_does_not_import_torch():
    code = "import sys, vitprune.cli; vitprune.cli.run(['--help']); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def test_library_errors_name_parameters_and_the_cli_names_flags(capsys):
    from vitprune.errors import VitpruneError
    from vitprune.plan import make_plan

    with pytest.raises(VitpruneError, match=r"^evit keep must be a number in \(0, 1\], got 1.5$"):
        make_plan("evit", 12, keep=1.5)
    assert run(["apply", "vit_tiny", "--no-pretrained", "--method", "evit", "--keep", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: evit --keep must be a number in (0, 1], got 1.5"
