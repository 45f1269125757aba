"""Options are declared once, in each command's signature, and fill the request dataclass by name
(vitprune/cli/options.make_request): each Typer command is checked against its request.

Every request field is an option of the command (same name, same default), or is listed here as
what the CLI derives it from; every option is a request field, a CLI-only setting or a hidden old
spelling. Then: the old spellings still work, contradictions are refused, --config YAML under the
command line, help panels, and messages that rewrite only the parameters an error names.
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

CLI_ONLY = {"threads", "json_out", "config"}  # torch's thread count and the output format are the CLI's own
# request field -> the option(s) the CLI derives it from (a flag that negates it, a switch, a parsed list);
# None: a library-only setting the CLI leaves at its default
DERIVED = {
    "apply": {"fuse": "no_fuse", "bench_batch": ("bench", "bench_batch"), "progress": "json_out"},
    "export": {"fuse": "no_fuse", "bench_batch": "bench_batch", "progress": "json_out", "verify_batch": None},
    "finetune": {"fuse": "no_fuse", "augment": "no_augment", "progress": "json_out", "eval_batch_size": None,
                 "features": None},
    "calibrate": {"progress": "json_out",
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
    hidden = {name for name, option in options.items() if getattr(option, "hidden", False)}
    stray = set(options) - fields - CLI_ONLY - derived_from - hidden
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


class Captured(Exception):
    pass


def _capture(monkeypatch, command: str) -> dict:
    """Replace `command`'s library call by one that records its request and stops with exit 2."""
    import importlib

    module = importlib.import_module(f"vitprune.commands.{command}")
    seen = {}

    def record(request):
        seen["request"] = request
        from vitprune.errors import VitpruneError

        raise VitpruneError("captured")

    monkeypatch.setattr(module, f"run_{command}", record)
    return seen


TINY = ["vit_tiny_patch16_224", "--no-pretrained"]


@pytest.mark.parametrize("command, args, field, expected", [
    ("export", ["--method", "evit:keep=0.7", "--onnx", "m.onnx", "--fp16"], "dtype", "float16"),
    ("export", ["--method", "evit:keep=0.7", "--onnx", "m.onnx", "--batch", "4"], "batch", "4"),
    ("calibrate", ["--data", "x", "--target-ratio", "0.5", "--batch", "8"], "budget", 8),
    ("calibrate", ["--data", "x", "--target-ratio", "0.5", "--no-head-only"], "head_only", False),
    ("finetune", ["--method", "evit:keep=0.7", "--data", "x", "-o", "out", "--amp", "bf16"], "dtype", "bfloat16"),
    ("finetune", ["--method", "evit:keep=0.7", "--data", "x", "-o", "out", "--sizes", "160,224"], "sizes", (160, 224)),
    ("show", ["--method", "evit:keep=0.7", "-o", "a.png", "--images", "img"], "images", "img"),
    ("show", ["--method", "evit:keep=0.7", "-o", "a.png", "-i", "img"], "images", "img"),
])
def test_old_spellings_still_work(monkeypatch, capsys, command, args, field, expected):
    seen = _capture(monkeypatch, command)
    assert run([command, *TINY, *args]) == 2
    assert capsys.readouterr().err.strip() == "error: captured"
    value = getattr(seen["request"], field)
    value = value.batch if field == "budget" else value
    assert (str(value) if field == "images" else value) == expected


@pytest.mark.parametrize("command", ["apply", "calibrate", "export", "finetune", "show", "cascade"])
def test_old_spellings_are_hidden_and_new_names_shown(command):
    options = _options(command)
    hidden = {name for name, option in options.items() if getattr(option, "hidden", False)}
    shown = {opt for name, option in options.items() if name not in hidden for opt in option.opts}
    for old in ("--fp16", "--amp", "--sizes", "--images", "--batch"):
        assert old not in shown, f"{command} shows the old spelling {old}"
    if command in ("apply", "export", "calibrate", "finetune", "cascade"):
        assert "--dtype" in shown
    if command in ("apply", "export", "calibrate"):
        assert "--bench-batch" in shown
    if command in ("apply", "export", "show", "finetune", "calibrate"):
        assert "--head-only" in shown and "--img-size" in shown


@pytest.mark.parametrize("command, args, flags", [
    ("export", ["--method", "evit:keep=0.7", "--fp16", "--dtype", "float32"], ("--fp16", "--dtype float32")),
    ("export", ["--method", "evit:keep=0.7", "--batch", "2", "--onnx-batch", "3"], ("--batch 2", "--onnx-batch 3")),
    ("apply", ["--method", "evit:keep=0.7", "--plan", "plan.json"], ("--plan", "--method")),
    ("apply", ["--method", "evit:keep=0.7", "--checkpoint", "w.pth"], ("--checkpoint", "--no-pretrained")),
    ("finetune", ["--method", "evit:keep=0.7", "--data", "x", "--amp", "fp16", "--dtype", "bfloat16"],
     ("--amp fp16", "--dtype bfloat16")),
    ("calibrate", ["--data", "x", "--target-ratio", "0.5", "--batch", "4", "--bench-batch", "8"],
     ("--batch 4", "--bench-batch 8")),
    ("calibrate", ["--data", "x", "--target-ratio", "0.5", "--target-gmacs", "1"], ("--target-gmacs", "--target-ratio")),
])
def test_contradicting_options_are_refused(tmp_path, monkeypatch, capsys, command, args, flags):
    monkeypatch.chdir(tmp_path)
    out = {"export": ["--onnx", "m.onnx"], "finetune": ["-o", "out"]}.get(command, ["-o", "out"])
    assert run([command, *TINY, *args, *out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert all(flag in err for flag in flags), err
    assert list(tmp_path.iterdir()) == []


def _config(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_config_fills_defaults_and_the_command_line_wins(tmp_path, monkeypatch, capsys):
    seen = _capture(monkeypatch, "finetune")
    config = _config(tmp_path, "epochs: 3\nbatch-size: 4\nweight_decay: 0.01\nimg-sizes: [48, 32]\nkeeps: 0.5,1\n"
                               "supervit: true\ndata: images\noutput: out\namp: bf16\nlr: 0.001\n")
    assert run(["finetune", *TINY, "--config", config, "--lr", "0.002", "--dtype", "float16"]) == 2
    request = seen["request"]
    assert (request.epochs, request.batch_size, request.weight_decay) == (3, 4, 0.01)
    assert request.sizes == (48, 32) and request.keeps == (0.5, 1.0) and request.supervit
    assert str(request.data) == "images" and str(request.output) == "out"
    assert request.lr == 0.002  # the command line wins over the file
    assert request.dtype == "float16"  # ... also over an old spelling in the file


def test_calibrate_takes_a_config(tmp_path, monkeypatch):
    seen = _capture(monkeypatch, "calibrate")
    config = _config(tmp_path, "target-ratio: 0.6\nhead-only: false\nbench-batch: 2\nimg_sizes: 64,48\ndata: x\n")
    assert run(["calibrate", *TINY, "--config", config, "--seed", "3"]) == 2
    request = seen["request"]
    assert request.budget.value == 0.6 and request.budget.batch == 2 and not request.head_only
    assert request.img_sizes == [64, 48] and request.seed == 3


@pytest.mark.parametrize("text, message", [
    ("epoch: 3\n", "unknown option 'epoch' in config file"),
    ("epochs: many\n", "epochs must be a whole number, got 'many'"),
    ("lr: [1, 2]\n", "lr must be a number"),
    ("- epochs\n", "must map option names to values"),
    ("epochs: [\n", "cannot read config file"),
    ("amp: bf16\ndtype: float16\n", "--amp bf16 and --dtype float16 contradict each other in"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, capsys, text, message):
    config = _config(tmp_path, text)
    assert run(["finetune", *TINY, "--method", "evit:keep=0.7", "--data", "x", "-o", str(tmp_path / "o"),
                "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and config in err, err
    assert not (tmp_path / "o").exists()


def test_finetune_and_calibrate_help_in_panels():
    from typer.testing import CliRunner

    help_text = CliRunner().invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    for panel in ("Data", "Schedule", "Distillation", "SuperViT", "Augmentation", "Model and reduction", "Output",
                  "Running"):
        assert f"─ {panel} ─" in help_text, panel
    help_text = CliRunner().invoke(app, ["calibrate", "--help"], env={"COLUMNS": "200"}).output
    assert "─ Budget ─" in help_text and "─ Search ─" in help_text and "--fp16" not in help_text


def test_messages_rewrite_only_the_parameters_the_error_names():
    from vitprune.cli import _with_flag

    argv = ["apply", "x"]
    # a file name or another library's words that happen to be a parameter's name stay as they are
    assert (_with_flag("cannot read data data/x: the dataset doesn't contain any data files", ("data",), argv)
            == "cannot read --data data/x: the dataset doesn't contain any data files")
    assert _with_flag("plan_file 'method' is unreadable", ("plan_file",), argv) == "--plan 'method' is unreadable"
    assert _with_flag("give plan_file or method, not both", ("plan_file", "method"), argv) == (
        "give --plan or --method, not both")
    assert _with_flag("batch_size and target_gmacs", ("batch_size",), argv) == "--batch-size and target_gmacs"
    assert _with_flag("keep must be in (0, 1]", (), argv) == "keep must be in (0, 1]"


def test_a_cascade_folder_is_not_a_model_to_reduce(tmp_path, capsys):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "cascade.json").write_text("{}")
    assert run(["export", str(tmp_path / "c"), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is a cascade folder" in err and "not a vitprune artifact" not in err
