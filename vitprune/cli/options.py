"""How a command's options become its request, one way for every command.

An option is declared once, in the command's signature (flag, help, panel, default); the request
dataclass has a field of the same name and default (tests/test_cli_options.py holds them together), and
`make_request` fills the request from the parameters by name. Old spellings are hidden options that
stand for a new one (`Alias`); `--config FILE` (YAML) fills the options the command line leaves at
their defaults, as timm's train script does. No torch here.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # recent typer releases vendor their own copy of click; older ones use click itself
    from typer._click.core import ParameterSource
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - typer before it vendored click
    from click import get_current_context
    from click.core import ParameterSource

from vitprune.errors import VitpruneError

# help panels shared by the commands with many options
MODEL_PANEL = "Model and reduction"
DATA_PANEL = "Data"
RUN_PANEL = "Running"
OUTPUT_PANEL = "Output"


@dataclass(frozen=True)
class Alias:
    """A hidden old spelling (`old`, a parameter name) of the option `new`; `value` turns the old
    option's value into the new one's (the same value when None)."""

    old: str
    new: str
    value: Callable[[Any], Any] | None = None


def make_request(request_type: type, params: dict, *, aliases: tuple[Alias, ...] = (),
                 derive: dict[str, Callable[[dict], Any]] | None = None, required: tuple[str, ...] = ()) -> Any:
    """The request `request_type` from a command's parameters (`locals()` at its start): each field
    from the parameter of its name, after the --config file, the aliases and `derive` (field ->
    its value from the parameters: a parsed list, a negated flag). `required`: options that may
    come from the command line or the config file, but must come from one."""
    context = get_current_context()
    values = dict(params)
    sources = {name: _source(context, name) for name in values}
    if values.get("config") is not None:
        _read_config(Path(values["config"]), context, values, sources)
    for alias in aliases:
        _resolve(alias, context, values, sources)
    for name in required:
        if values[name] is None:
            raise VitpruneError(f"give {_flag(context, name)}" + (" (here or in the --config file)" if "config" in values else ""))
    for name, rule in (derive or {}).items():
        values[name] = rule(values)
    names = {field.name for field in dataclasses.fields(request_type)}
    return request_type(**{name: value for name, value in values.items() if name in names})


def _source(context, name: str) -> str:
    source = context.get_parameter_source(name)
    return "default" if source in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP) else "command line"


def _flag(context, name: str) -> str:
    param = next((param for param in context.command.params if param.name == name), None)
    return max(param.opts, key=len) if param is not None and param.opts else name


def _resolve(alias: Alias, context, values: dict, sources: dict) -> None:
    """The old spelling's value into the new option; both given with different values: refused
    (the command line's one wins over the config file's)."""
    old_source = sources.get(alias.old, "default")
    if old_source == "default":
        return
    value = values[alias.old] if alias.value is None else alias.value(values[alias.old])
    new_source = sources.get(alias.new, "default")
    if new_source == old_source and values[alias.new] != value:
        old, new = _flag(context, alias.old), _flag(context, alias.new)
        old_given = old if isinstance(values[alias.old], bool) else f"{old} {values[alias.old]}"
        where = "" if old_source == "command line" else f" in {values['config']}"
        raise VitpruneError(f"{old_given} and {new} {values[alias.new]} contradict each other{where} ({old_given} "
                            f"is the old spelling of {new} {value}); give {new} only")
    if new_source == "command line" and old_source != "command line":
        return
    values[alias.new] = value
    sources[alias.new] = old_source


def _config_names(context) -> dict:
    """Every way a config file may name an option: its flags without dashes, with - or _."""
    names = {}
    for param in context.command.params:
        if not param.opts or not param.opts[0].startswith("-") or param.name == "config":
            continue
        for spelling in (opt.lstrip("-") for opt in param.opts if opt.startswith("--")):
            names[spelling] = names[spelling.replace("-", "_")] = names[spelling.replace("_", "-")] = param
    return names


def _read_config(path: Path, context, values: dict, sources: dict) -> None:
    """The YAML file's options into every parameter the command line left at its default."""
    import yaml

    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VitpruneError(f"config file {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise VitpruneError(f"cannot read config file {path}: {' '.join(str(error).split())}") from None
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise VitpruneError(f"config file {path} must map option names to values (epochs: 8), "
                            f"got a {type(settings).__name__}")
    names = _config_names(context)
    for key, raw in settings.items():
        param = names.get(str(key))
        if param is None:
            raise VitpruneError(f"unknown option {key!r} in config file {path} (options are named as on the "
                                f"command line without dashes, e.g. batch-size)")
        if sources[param.name] == "command line":
            continue
        descriptor = getattr(param, "type_descriptor", None)  # typer's declared type (older typer: the default's)
        annotation = descriptor.annotation if descriptor is not None else type(param.default or "")
        values[param.name] = _convert(raw, annotation, key, path)
        sources[param.name] = "config file"


def _convert(raw: Any, annotation: Any, key: str, path: Path) -> Any:
    """A YAML value as the option's type (bool, int, float, str, Path; a list for a comma-separated option)."""
    kinds = [kind for kind in (typing.get_args(annotation) or (annotation,)) if kind is not type(None)]
    kind = kinds[0] if kinds else str
    if raw is None:
        if type(None) in typing.get_args(annotation):
            return None
    elif kind is bool and isinstance(raw, bool):
        return raw
    elif kind is int and isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    elif kind is float and isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    elif kind in (str, Path) and isinstance(raw, str | int | float | list) and not isinstance(raw, bool):
        text = ",".join(str(item) for item in raw) if isinstance(raw, list) else str(raw)  # img-sizes: [224, 192]
        return kind(text)
    expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "text")
    raise VitpruneError(f"config file {path}: {key} must be {expected}, got {raw!r}")
