"""The one budget type calibrate and cascade share: GMACs, a ratio of the base, latency or an accuracy drop."""
from __future__ import annotations

import math
from dataclasses import dataclass

from vitprune.errors import VitpruneError

KINDS = ("gmacs", "ratio", "latency", "max_drop")


@dataclass(frozen=True)
class Budget:
    """What a plan or cascade must fit.

    gmacs: at most `value` GMACs per image; ratio: at most `value` (in (0, 1]) times the base
    GMACs; latency: at most `value` ms per image at batch `batch`, measured; max_drop: the
    cheapest plan within `value` points of the base.
    """

    kind: str
    value: float
    batch: int = 32  # latency budgets: the batch size timed

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VitpruneError(f"unknown budget kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        value = self.value
        if not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise VitpruneError(f"{_PARAM[self.kind]} must be a finite number, got {value!r}", param=_PARAM[self.kind])
        if self.kind == "ratio" and not 0 < value <= 1:
            raise VitpruneError(f"target_ratio is a fraction of the base GMACs and must be in (0, 1], got {value:g}",
                                param="target_ratio")
        if self.kind in ("gmacs", "latency") and not value > 0:
            raise VitpruneError(f"{_PARAM[self.kind]} must be positive, got {value:g}", param=_PARAM[self.kind])
        if self.kind == "max_drop" and not value >= 0:
            raise VitpruneError(f"max_drop must be zero or more points, got {value:g}", param="max_drop")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise VitpruneError(f"batch must be a whole number >= 1, got {self.batch!r}", param="batch")

    @classmethod
    def from_targets(cls, *, target_gmacs: float | None = None, target_ratio: float | None = None,
                     target_latency_ms: float | None = None, max_drop: float | None = None, batch: int = 32,
                     allowed: tuple[str, ...] = KINDS) -> Budget:
        """Exactly one of the targets, checked; `allowed` the kinds the caller supports."""
        given = {kind: value for kind, value in (("gmacs", target_gmacs), ("ratio", target_ratio),
                                                 ("latency", target_latency_ms), ("max_drop", max_drop))
                 if value is not None}
        names = " or ".join(_PARAM[kind] for kind in allowed)
        if not given:
            raise VitpruneError(f"give a budget: {names}", param=tuple(_PARAM[kind] for kind in allowed))
        if len(given) > 1:
            raise VitpruneError(f"give one budget, not several (got {' and '.join(_PARAM[k] for k in given)})",
                                param=tuple(_PARAM[k] for k in given))
        kind, value = next(iter(given.items()))
        if kind not in allowed:
            raise VitpruneError(f"{_PARAM[kind]} is not a budget here; give {names}",
                                param=(_PARAM[kind], *(_PARAM[k] for k in allowed if k != kind)))
        return cls(kind, float(value), batch=batch)

    @property
    def has_gmacs_target(self) -> bool:
        """A gmacs or ratio budget: a GMACs figure to fit (latency and max_drop are measured)."""
        return self.kind in ("gmacs", "ratio")

    def gmacs(self, base_gmacs: float) -> float:
        """The GMACs target of a gmacs or ratio budget."""
        if not self.has_gmacs_target:
            raise VitpruneError(f"a {self.kind} budget has no GMACs target")
        return self.value if self.kind == "gmacs" else self.value * base_gmacs

    def describe(self) -> str:
        return {
            "gmacs": f"at most {self.value:g} GMACs / image",
            "ratio": f"at most {self.value:.0%} of the base GMACs",
            "latency": f"at most {self.value:g} ms / image at batch {self.batch} (measured)",
            "max_drop": f"the cheapest plan within {self.value:g} points of the base",
        }[self.kind]

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "value": self.value, "text": self.describe()}
        if self.kind == "latency":
            out["batch"] = self.batch
        return out


_PARAM = {"gmacs": "target_gmacs", "ratio": "target_ratio", "latency": "target_latency_ms", "max_drop": "max_drop"}
