"""What to reduce and where: a serialisable reduction plan.

A plan is a list of per-layer reductions (a method of `vitprune.methods` and its settings) plus
the input size; it never holds weights. `vitprune.json` stores it next to the base model's identity.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitprune import methods
from vitprune.checks import is_whole
from vitprune.errors import VitpruneError

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

    def validate(self, depth: int) -> None:
        spec = self.spec
        if not 0 <= self.layer < depth:
            raise VitpruneError(f"layer {self.layer} is out of range: the model has blocks 0..{depth - 1}")
        spec.validate(self.settings)

    def describe(self) -> str:
        return self.spec.describe(self.settings)

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


@dataclass
class Plan:
    """Reductions for one base model. An empty plan is the unreduced model."""

    reductions: tuple[Reduction, ...] = ()
    img_size: int | None = None  # None: the model's own input size
    # The last block computes only the prefix tokens the head reads (exact with class-token pooling).
    head_only: bool = False
    notes: dict = field(default_factory=dict)  # free-form provenance (e.g. how a plan was calibrated)

    def __post_init__(self) -> None:
        self.reductions = tuple(sorted(self.reductions, key=lambda red: red.layer))

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

    def validate(self, depth: int) -> None:
        layers = self.layers
        if len(set(layers)) != len(layers):
            raise VitpruneError(f"a layer appears twice in the plan: {layers}")
        for red in self.reductions:
            red.validate(depth)
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
        """The plan in the compact form reports show: method, layers and the shared settings."""
        out: dict = {"layers": self.layers}
        shown = [red.spec.shown_params(red.settings) for red in self.reductions]
        for key in _ordered_keys(shown):
            values = [settings[key] for settings in shown if key in settings]
            out[key] = values[0] if len(set(values)) == 1 else values
        if self.img_size is not None:
            out["img_size"] = self.img_size
        if self.head_only:
            out["head_only"] = True
        return out

    def describe(self) -> str:
        head = "; head-only last block" if self.head_only else ""
        if not self.reductions:
            return ("no reduction" if not head else head[2:]) + (f" @ {self.img_size}px" if self.img_size else "")
        groups: dict[str, list[int]] = {}
        for red in self.reductions:
            groups.setdefault(red.describe(), []).append(red.layer)
        text = "; ".join(f"{what} @ {','.join(map(str, layers))}" for what, layers in groups.items())
        return text + head + (f"; {self.img_size}px" if self.img_size else "")

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


def _ordered_keys(settings: list[dict]) -> list[str]:
    """Setting names in the order of the shared report fields, then any others."""
    order = ("keep", "r", "fuse", "protect")
    seen = {key for entry in settings for key in entry}
    return [key for key in order if key in seen] + sorted(seen - set(order))


def make_plan(method: str, depth: int, *, layers: list[int] | None = None, img_size: int | None = None,
              head_only: bool = False, **settings: Any) -> Plan:
    """The plan for one method with one setting at several layers, validated against `depth`.

    `settings` are the method's parameters (evit: keep, fuse; ats: keep; tome: r, protect).
    """
    spec = methods.get(method)
    given = {key: value for key, value in settings.items() if value is not None}
    spec.validate(spec.settings(given))
    if layers is None:  # the head-only last block already reduces the last block to its class token
        layers = [layer for layer in spec.default_layers(depth) if not (head_only and layer == depth - 1)]
    if not layers:
        raise VitpruneError("layers is empty: give at least one block to reduce in")
    plan = Plan(reductions=tuple(Reduction(layer, method, **given) for layer in layers), img_size=img_size,
                head_only=head_only)
    plan.validate(depth)
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


