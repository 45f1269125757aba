"""What to reduce and where: a serialisable reduction plan.

A plan is a list of per-layer reductions (a method of `vitprune.methods` and its settings) plus
the input size; it never holds weights. `vitprune.json` stores it next to the base model's identity.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitprune import methods
from vitprune.checks import is_whole
from vitprune.errors import VitpruneError
from vitprune.methods import Param

PLAN_FORMAT = 1


def _is_blank(value: object) -> bool:
    """Plans written before the methods registry list every method's fields, the unused ones blank."""
    return value is None or value is True or (type(value) is float and value == 0.0)


class Reduction:
    """One reduction inside block `layer` (0-based): a method and its settings.

        Reduction(3, "evit", keep=0.7)       Reduction(0, "tome", r=8, protect=0.2)

    Settings are the method's parameters (`vitprune.methods.get(name).params`), defaults filled
    in; they read as attributes (`reduction.keep`). Immutable and hashable.
    """

    __slots__ = ("layer", "method", "_settings")

    def __init__(self, layer: int, method: str, **settings: Any) -> None:
        given = {key: value for key, value in settings.items() if value is not None}
        if method in methods.names():
            given = methods.get(method).settings(given)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "_settings", tuple(sorted(given.items())))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @property
    def spec(self) -> methods.Method:
        """The method this reduction runs (an unknown name fails here, with the choices)."""
        return methods.get(self.method)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        for key, value in self._settings:
            if key == name:
                return value
        raise AttributeError(f"{self.method} reduction has no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Reduction is immutable; use .replace(...)")

    def __reduce__(self):
        return (_rebuild_reduction, (self.layer, self.method, self.settings))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reduction) and (self.layer, self.method, self._settings) == (
            other.layer, other.method, other._settings)

    def __hash__(self) -> int:
        return hash((self.layer, self.method, self._settings))

    def __repr__(self) -> str:
        settings = "".join(f", {key}={value!r}" for key, value in self._settings)
        return f"Reduction({self.layer}, {self.method!r}{settings})"

    def replace(self, **changes: Any) -> Reduction:
        layer = changes.pop("layer", self.layer)
        return Reduction(layer, self.method, **{**self.settings, **changes})

    def validate(self, depth: int, tokens: int | None = None) -> None:
        """In the model's blocks, every setting in range (`tokens`: the tokens entering the model)."""
        spec = self.spec
        if not 0 <= self.layer < depth:
            raise VitpruneError(f"layer {self.layer} is out of range: the model has blocks 0..{depth - 1}",
                                param="layers")
        spec.validate(self.settings, tokens)

    def describe(self) -> str:
        """The method and its settings in the plan grammar, without the layer: 'tome:r=13,protect=0.2'."""
        shown = self.spec.shown(self.settings)
        return self.method + (":" + ",".join(f"{key}={format_value(value)}" for key, value in shown.items())
                              if shown else "")

    def to_dict(self) -> dict:
        return {"layer": self.layer, "method": self.method, **self.settings}

    @classmethod
    def from_dict(cls, data: dict) -> Reduction:
        data = dict(data)
        layer, method = data.pop("layer"), data.pop("method")
        known = {param.name for param in methods.get(method).params} if method in methods.names() else set(data)
        for key in [key for key in data if key not in known]:
            if not _is_blank(data[key]):
                raise VitpruneError(f"{key} is not a parameter of {method}")
            del data[key]
        return cls(layer, method, **data)


def _rebuild_reduction(layer: int, method: str, settings: dict) -> Reduction:
    return Reduction(layer, method, **settings)


@dataclass(frozen=True)
class Plan:
    """Reductions for one base model. An empty plan is the unreduced model. Immutable and hashable
    (`dataclasses.replace` makes a changed copy); `describe()` writes it in the plan grammar."""

    reductions: tuple[Reduction, ...] = ()
    img_size: int | None = None  # None: the model's own input size
    # The last block computes only the prefix tokens the head reads (exact with class-token pooling).
    head_only: bool = False
    # free-form provenance (e.g. how a plan was calibrated): compared, but not part of the hash
    notes: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "reductions", tuple(sorted(self.reductions, key=lambda red: red.layer)))

    @property
    def method(self) -> str:
        """'evit', 'tome', 'evit+tome', ... or 'none' (in the registry's order)."""
        used = [name for name in methods.names() if any(red.method == name for red in self.reductions)]
        return "+".join(used) or "none"

    @property
    def layers(self) -> list[int]:
        return [red.layer for red in self.reductions]

    @property
    def varies_per_image(self) -> bool:
        """Some block keeps a different token count per image (its FLOPs depend on the image)."""
        return any(red.spec.varies_per_image for red in self.reductions)

    def at(self, layer: int) -> Reduction | None:
        return next((red for red in self.reductions if red.layer == layer), None)

    def first_reduced_layer(self, depth: int) -> int:
        """Blocks before this one run unreduced (`depth` when none is reduced)."""
        return min(self.layers + ([depth - 1] if self.head_only else []), default=depth)

    def validate(self, depth: int, tokens: int | None = None) -> None:
        """The plan on a model of `depth` blocks (`tokens`: the tokens entering it, when known)."""
        layers = self.layers
        if len(set(layers)) != len(layers):
            raise VitpruneError(f"a layer appears twice in the plan: {layers}", param="layers")
        for red in self.reductions:
            red.validate(depth, tokens)
        # After a per-image method the batch is padded per image; the others assume equal counts.
        first = next((red for red in self.reductions if red.spec.varies_per_image), None)
        if first is not None:
            later = next((red for red in self.reductions if red.layer > first.layer and red.method != first.method), None)
            if later is not None:
                raise VitpruneError(f"{first.method} must be the last method in a plan: {later.method} cannot "
                                    f"follow a {first.method} layer (it keeps a different count per image)")
        if self.head_only and depth - 1 in layers:
            raise VitpruneError(
                f"the head-only last block already keeps only the class token in block {depth - 1}; "
                "a reduction there has nothing to reduce"
            )
        if self.img_size is not None and not is_whole(self.img_size, 1):
            raise VitpruneError(f"img_size must be a positive whole number, got {self.img_size!r}")

    def params(self) -> dict:
        """The plan in the compact form reports show: layers and the settings shown (`Method.shown`)."""
        out: dict = {"layers": self.layers}
        shown = [red.spec.shown(red.settings) for red in self.reductions]
        for key in dict.fromkeys(key for settings in shown for key in settings):
            values = [settings[key] for settings in shown if key in settings]
            out[key] = values[0] if len(set(values)) == 1 else values
        if self.img_size is not None:
            out["img_size"] = self.img_size
        if self.head_only:
            out["head_only"] = True
        return out

    def describe(self) -> str:
        """The plan in the grammar `make_plan` reads: 'tome:r=8@0-5+evit:keep=0.7@6,9+head-only+160px'."""
        groups: dict[str, list[int]] = {}
        for red in self.reductions:
            groups.setdefault(red.describe(), []).append(red.layer)
        terms = [f"{what}@{format_layers(layers)}" for what, layers in groups.items()]
        terms += [HEAD_ONLY] if self.head_only else []
        terms += [f"{self.img_size}px"] if self.img_size else []
        return "+".join(terms) or NONE

    def to_dict(self) -> dict:
        return {
            "format": PLAN_FORMAT,
            "img_size": self.img_size,
            "head_only": self.head_only,
            "reductions": [red.to_dict() for red in self.reductions],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "plan") -> Plan:
        """A plan from its JSON form, checked field by field (`source` names the file in errors)."""
        if not isinstance(data, dict):
            raise VitpruneError(f"{source}: a plan must be a JSON object, got {type(data).__name__}")
        reductions = data.get("reductions")
        if not isinstance(reductions, list):
            raise VitpruneError(f"{source}: plan field reductions must be a list, got {_json_type(reductions)}")
        img_size, head_only, notes = data.get("img_size"), data.get("head_only", False), data.get("notes") or {}
        if img_size is not None and not is_whole(img_size, 1):
            raise VitpruneError(f"{source}: plan field img_size must be a positive whole number or null, got {img_size!r}")
        if not isinstance(head_only, bool) or not isinstance(notes, dict):
            field_name = "head_only" if not isinstance(head_only, bool) else "notes"
            raise VitpruneError(f"{source}: plan field {field_name} has the wrong type")
        return cls(reductions=tuple(_reduction_from(red, f"{source}: reductions[{index}]")
                                    for index, red in enumerate(reductions)),
                   img_size=img_size, head_only=head_only, notes=notes)


def _reduction_from(data: object, where: str) -> Reduction:
    if not isinstance(data, dict):
        raise VitpruneError(f"{where} must be a JSON object, got {_json_type(data)}")
    layer, method = data.get("layer"), data.get("method")
    if not is_whole(layer):
        raise VitpruneError(f"{where}.layer must be a whole number, got {layer!r}")
    if method not in methods.names():
        raise VitpruneError(f"{where}.method: unknown method {method!r}; choose one of {', '.join(methods.names())}")
    try:
        reduction = Reduction.from_dict(data)
        reduction.spec.validate(reduction.settings)
    except VitpruneError as error:
        raise VitpruneError(f"{where}: {error}") from None
    return reduction


def _json_type(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


NONE, HEAD_ONLY = "none", "head-only"
PLAN_GRAMMAR = ("METHOD[:NAME=VALUE,...][@LAYERS] joined by '+', with 'head-only' and SIZEpx terms, "
                "e.g. tome:r=13,protect=0.2@0-10, tome:r=8@0-5+evit:keep=0.7@6,9+head-only, evit:0.7 "
                "(METHOD:VALUE sets the method's first parameter)")
_TERM = re.compile(r"(?P<method>[a-z][a-z0-9_-]*)(?::(?P<settings>[^@]*))?(?:@(?P<layers>.*))?")


def format_value(value: Any) -> str:
    """A setting as the grammar writes it: floats exactly (repr; whole ones without '.0'), bools as
    true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return str(value)


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 3, 6, 9] -> '0-3,6,9'."""
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(f"{a}" if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}" for a, b in runs)


def parse_layers(text: str) -> list[int]:
    """'3,6,9' or '3-11' or a mix -> [3, 6, 9]."""
    layers: list[int] = []
    for part in (part.strip() for part in text.split(",")):
        start, _, end = part.partition("-") if "-" in part[1:] else (part, "", part)
        if not (start.strip().isdigit() and end.strip().isdigit()):
            raise VitpruneError(f"cannot read layers {text!r}: use e.g. 3,6,9 or 3-11", param="layers")
        layers.extend(range(int(start), int(end) + 1))
    return layers


def _read_value(method: str, param: Param, text: str) -> Any:
    """A setting's text as the parameter's type; the error names the method, the parameter and its range."""
    word = text.strip().lower()
    value: Any = None
    if param.kind is bool:
        value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(word)
    else:
        try:
            value = int(word) if param.kind is int and word.lstrip("+-").isdigit() else float(word)
            if param.kind is int and math.isfinite(value) and value == int(value):
                value = int(value)
        except ValueError:
            value = None
    if value is None:
        raise VitpruneError(f"{method} {param.name} must be {param.range_text}, got {text!r}", param=param.name)
    return value


def _read_settings(spec: methods.Method, text: str | None) -> dict[str, Any]:
    """'r=13,protect=0.2' -> {'r': 13, 'protect': 0.2}; a bare value sets the first parameter."""
    if text is None or not text.strip():
        return {}
    if "=" not in text and "," not in text and spec.params:
        return {spec.params[0].name: _read_value(spec.name, spec.params[0], text)}
    settings: dict[str, Any] = {}
    params = {param.name: param for param in spec.params}
    for item in text.split(","):
        name, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not name:
            raise VitpruneError(f"cannot read {spec.name} setting {item.strip()!r}: write NAME=VALUE "
                                f"({', '.join(params) or 'it takes none'})", param="method")
        if name not in params:
            raise VitpruneError(f"{name} is not a parameter of {spec.name} (it takes {', '.join(params) or 'none'})",
                                param=name)
        if name in settings:
            raise VitpruneError(f"{spec.name} {name} is given twice", param=name)
        settings[name] = _read_value(spec.name, params[name], value)
    return settings


def _read_terms(text: str) -> tuple[list[tuple[str, dict, list[int] | None]], bool, int | None]:
    """The grammar's terms: [(method, settings, layers or None)], head-only, the input size or None."""
    if not isinstance(text, str) or not text.strip():
        raise VitpruneError(f"give a reduction: {PLAN_GRAMMAR}", param="method")
    terms, head_only, img_size = [], False, None
    for term in (part.strip() for part in text.strip().split("+")):
        lowered = term.lower()
        if lowered == NONE:
            continue
        if lowered == HEAD_ONLY:
            head_only = True
        elif lowered.endswith("px") and lowered[:-2].isdigit():
            img_size = int(lowered[:-2])
        elif (match := _TERM.fullmatch(lowered)) is not None:
            spec = methods.get(match["method"])  # an unknown name fails here, naming the choices
            layers = None if match["layers"] is None else parse_layers(match["layers"])
            terms.append((spec.name, _read_settings(spec, match["settings"]), layers))
        else:
            raise VitpruneError(f"cannot read {term!r} in {text!r}: {PLAN_GRAMMAR}", param="method")
    return terms, head_only, img_size


def read_plan_text(method: str, *, layers: list[int] | None = None, img_size: int | None = None,
                   head_only: bool = False, tokens: int | None = None, **settings: Any) -> PlanText:
    """The plan grammar read and every setting checked, before any model (see `make_plan`)."""
    terms, text_head_only, text_size = _read_terms(method)
    given = {key: value for key, value in settings.items() if value is not None}
    if (given or layers is not None) and len(terms) != 1:
        name = next(iter(given), "layers")
        raise VitpruneError(f"{name} given apart from a plan of {len(terms)} methods: write the settings inside "
                            "the plan, e.g. tome:r=8@0-5+evit:keep=0.7@6,9", param=name)
    if img_size is not None and text_size is not None and img_size != text_size:
        raise VitpruneError(f"img_size {img_size} disagrees with the plan's {text_size}px", param="img_size")
    if img_size is not None and not is_whole(img_size, 1):
        raise VitpruneError(f"img_size must be a positive whole number, got {img_size!r}", param="img_size")
    merged_terms = []
    for name, own, own_layers in terms:
        spec = methods.get(name)
        clash = next((key for key in given if key in own and own[key] != given[key]), None)
        if clash is not None:
            raise VitpruneError(f"{name} {clash} is given twice ({own[clash]} and {given[clash]})", param=clash)
        if layers is not None and own_layers is not None and layers != own_layers:
            raise VitpruneError(f"layers are given twice for {name}", param="layers")
        merged = spec.settings({**own, **given})
        spec.validate(merged, tokens)
        merged_terms.append((name, merged, own_layers if own_layers is not None else layers))
    return PlanText(tuple(merged_terms), head_only or text_head_only, img_size if img_size is not None else text_size)


@dataclass(frozen=True)
class PlanText:
    """A plan as its text says it, before the model's depth places the default layers."""

    terms: tuple[tuple[str, dict, list[int] | None], ...]  # (method, settings, layers or None: its default)
    head_only: bool
    img_size: int | None


def make_plan(method: str, depth: int, *, layers: list[int] | None = None, img_size: int | None = None,
              head_only: bool = False, tokens: int | None = None, **settings: Any) -> Plan:
    """The plan `method` says in the plan grammar (`PLAN_GRAMMAR`; a method name alone is that method
    at its default layers), validated against `depth` (and `tokens`, the tokens entering the model).

        make_plan("tome:r=13,protect=0.2@0-10", 12)      make_plan("evit", 12, keep=0.7)

    `layers`, `head_only`, `img_size` and `settings` (the method's parameters; None: not given) fill
    in what a one-method text leaves out (the command line's shorthand flags); a value given both
    ways must agree.
    """
    text = read_plan_text(method, layers=layers, img_size=img_size, head_only=head_only, tokens=tokens, **settings)
    reductions = []
    for name, merged, chosen in text.terms:
        if chosen is None:  # the head-only last block already reduces the last block to its class token
            chosen = [layer for layer in methods.get(name).default_layers(depth)
                      if not (text.head_only and layer == depth - 1)]
        if not chosen:
            raise VitpruneError("layers is empty: give at least one block to reduce in", param="layers")
        reductions += [Reduction(layer, name, **merged) for layer in chosen]
    plan = Plan(reductions=tuple(reductions), img_size=text.img_size, head_only=text.head_only)
    plan.validate(depth, tokens)
    return plan


def read_plan_file(path: str | Path) -> tuple[Plan, dict]:
    """A plan from a `vitprune.json` (or a bare plan JSON). Returns (plan, the model section or {})."""
    path = Path(path)
    if path.is_dir():
        path = path / "vitprune.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VitpruneError(f"plan file not found: {path}") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise VitpruneError(f"cannot read plan {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(data, dict):
        raise VitpruneError(f"cannot read plan {path}: not a JSON object")
    return Plan.from_dict(data.get("plan", data), source=str(path)), data.get("model", {})


