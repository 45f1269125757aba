"""What to reduce and where: a serialisable reduction plan.

A plan is a list of per-layer reductions (method + its parameter) plus the input size; it never
holds weights. `vitprune.json` stores it next to the base model's identity.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from vitprune.errors import VitpruneError

Method = Literal["evit", "ats", "tome"]
METHODS: tuple[str, ...] = ("evit", "ats", "tome")
PLAN_FORMAT = 1


def check_protect(weight: float, name: str) -> None:
    """ToMe's protect weight is finite and >= 0 (0: plain ToMe)."""
    if not (isinstance(weight, (int, float)) and 0 <= weight < math.inf):
        raise VitpruneError(f"{name} must be a finite weight >= 0, got {weight}")


@dataclass(frozen=True)
class Reduction:
    """One reduction inside block `layer` (0-based).

    evit: `keep` in (0, 1] of the patch tokens entering the block, `fuse` the dropped ones.
    ats: `keep` is the cap K, a ratio in (0, 1] of the tokens entering the model or a count > 1.
    tome: `r` token pairs merged in the block; `protect` > 0 weighs the class token's attention
    against merging a token (0: plain ToMe).
    """

    layer: int
    method: Method
    keep: float | None = None
    r: int | None = None
    fuse: bool = True
    protect: float = 0.0

    def validate(self, depth: int) -> None:
        if self.method not in METHODS:
            raise VitpruneError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if not 0 <= self.layer < depth:
            raise VitpruneError(f"layer {self.layer} is out of range: the model has blocks 0..{depth - 1}")
        if self.method == "tome":
            if self.r is None or self.r < 0 or int(self.r) != self.r:
                raise VitpruneError(f"tome needs r, a whole number >= 0 of tokens merged per layer (got {self.r})")
            check_protect(self.protect, "tome protect")
        elif self.protect:
            raise VitpruneError(f"protect applies to tome only, not {self.method}")
        elif self.keep is None:
            raise VitpruneError(f"{self.method} needs a keep rate")
        elif self.method == "evit" and not 0 < self.keep <= 1:
            raise VitpruneError(f"keep rate must be in (0, 1], got {self.keep}")
        elif self.method == "ats" and not (0 < self.keep <= 1 or (self.keep > 1 and self.keep == int(self.keep))):
            raise VitpruneError(f"ats keep must be a ratio in (0, 1] or a whole token count > 1, got {self.keep}")

    def describe(self) -> str:
        if self.method == "tome":
            return f"tome r={self.r}" + (f" protect={self.protect:g}" if self.protect else "")
        if self.method == "evit":
            return f"evit keep={self.keep:g}" + ("" if self.fuse else " no-fuse")
        return f"ats K={self.keep:g}"


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
        """'evit', 'tome', 'evit+tome', ... or 'none'."""
        used = [m for m in METHODS if any(red.method == m for red in self.reductions)]
        return "+".join(used) or "none"

    @property
    def layers(self) -> list[int]:
        return [red.layer for red in self.reductions]

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
        # After ATS the batch is padded per image; ToMe/EViT assume every image has the same tokens.
        first_ats = next((red.layer for red in self.reductions if red.method == "ats"), None)
        if first_ats is not None and any(r.method != "ats" for r in self.reductions if r.layer > first_ats):
            raise VitpruneError("ats must be the last method in a plan: evit/tome cannot follow an ats layer")
        if self.head_only and depth - 1 in layers:
            raise VitpruneError(
                f"the head-only last block already keeps only the class token in block {depth - 1}; "
                "a reduction there has nothing to reduce"
            )
        if self.img_size is not None and self.img_size <= 0:
            raise VitpruneError(f"image size must be positive, got {self.img_size}")

    def params(self) -> dict:
        """The plan in the compact form reports show: method, layers and the shared parameters."""
        out: dict = {"layers": self.layers}
        for key in ("keep", "r", "fuse", "protect"):
            values = {getattr(red, key) for red in self.reductions if _uses(red, key)}
            if len(values) == 1:
                out[key] = values.pop()
            elif values:
                out[key] = [getattr(red, key) for red in self.reductions if _uses(red, key)]
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
            "reductions": [asdict(red) for red in self.reductions],
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            reductions = tuple(Reduction(**red) for red in data["reductions"])
            return cls(reductions=reductions, img_size=data.get("img_size"), head_only=bool(data.get("head_only", False)),
                       notes=data.get("notes") or {})
        except (KeyError, TypeError) as exc:
            raise VitpruneError(f"malformed plan: {exc}") from None


def _uses(red: Reduction, key: str) -> bool:
    return {"keep": red.method in ("evit", "ats"), "r": red.method == "tome", "fuse": red.method == "evit",
            "protect": red.method == "tome" and bool(red.protect)}[key]


def default_layers(method: str, depth: int) -> list[int]:
    """EViT: the 4th, 7th and 10th of 12 blocks, scaled to depth; ATS: every block from the 4th
    (the official DeiT-S setting); ToMe: every block."""
    if method == "evit":
        return sorted({round(depth * i / 4) for i in (1, 2, 3)})
    if method == "ats":
        return list(range(round(depth / 4), depth))
    return list(range(depth))


def make_plan(
    method: str,
    depth: int,
    *,
    keep: float | None = None,
    r: int | None = None,
    layers: list[int] | None = None,
    fuse: bool = True,
    img_size: int | None = None,
    head_only: bool = False,
    protect: float = 0.0,
) -> Plan:
    """The plan for one method with one setting at several layers, validated against `depth`."""
    if method not in METHODS:
        raise VitpruneError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if method in ("evit", "ats") and keep is None:
        raise VitpruneError(f"--method {method} needs --keep")
    if method == "tome" and r is None:
        raise VitpruneError("--method tome needs --r (tokens merged per layer)")
    if protect and method != "tome":
        raise VitpruneError(f"--protect applies to --method tome only, not {method}")
    if layers is None:  # the head-only last block already reduces the last block to its class token
        layers = [layer for layer in default_layers(method, depth) if not (head_only and layer == depth - 1)]
    if not layers:
        raise VitpruneError("no layers given")
    plan = Plan(
        reductions=tuple(
            Reduction(layer=layer, method=method, keep=keep if method != "tome" else None,
                      r=r if method == "tome" else None, fuse=fuse if method == "evit" else True,
                      protect=protect)
            for layer in layers
        ),
        img_size=img_size,
        head_only=head_only,
    )
    plan.validate(depth)
    return plan


def parse_layers(text: str) -> list[int]:
    """'3,6,9' or '3-11' or a mix -> [3, 6, 9]."""
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                start, end = part.split("-", 1)
                layers.extend(range(int(start), int(end) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise VitpruneError(f"cannot read layers '{text}': use e.g. 3,6,9 or 3-11") from None
    return layers


def read_plan_file(path: str | Path) -> tuple[Plan, dict]:
    """A plan from a `vitprune.json` (or a bare plan JSON). Returns (plan, the model section or {})."""
    path = Path(path)
    if path.is_dir():
        path = path / "vitprune.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise VitpruneError(f"plan file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise VitpruneError(f"cannot read plan {path}: {exc}") from None
    if not isinstance(data, dict):
        raise VitpruneError(f"cannot read plan {path}: not a JSON object")
    return Plan.from_dict(data.get("plan", data)), data.get("model", {})
