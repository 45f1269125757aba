"""Calibrate's search policy per method: which methods the search gives blocks to, and how it asks
one to remove an amount of tokens at a block. Keyed by method name; a method not in the table gets a
policy read from its first declared parameter (a keep rate in (0, 1], or a count of tokens), so a
new method needs nothing here to be searched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vitprune import methods
from vitprune.reducers import evit_keep_count

MIN_SEARCH_KEEP = 0.2  # a rate method never keeps fewer than this share of a block's patch tokens
RATE, COUNT, CAP, NONE = "rate", "count", "cap", "none"


@dataclass(frozen=True)
class Policy:
    """How calibrate sets one method's first parameter to remove tokens.

    kind: RATE (the share of patch tokens kept), COUNT (the tokens removed), CAP (a per-image cap on
    the tokens kept, from one block on: ATS) or NONE (not searched)."""

    kind: str
    fixed: dict = field(default_factory=dict)  # settings the search always gives (EViT fuses)
    added: int = 0  # tokens a block adds back after removing (EViT's fused token)
    protect: bool = False  # takes the search's protect weight (the class token's attention, ToMe)
    yardstick: bool = False  # its constant schedule is the search's yardstick and floor (ToMe)
    references: tuple[str, ...] = ()  # published settings reported beside the frontier (plan grammar)


POLICIES = {
    "evit": Policy(RATE, fixed={"fuse": True}, added=1, references=("evit:keep=0.7",)),
    "ats": Policy(CAP),
    "tome": Policy(COUNT, protect=True, yardstick=True, references=("tome:r=8", "tome:r=13", "tome:r=16")),
    "ppt": Policy(COUNT),  # on the frontier: beats ToMe at equal GMACs on deit_tiny (docs/methods.md)
    "zerotprune": Policy(NONE),
    "transform": Policy(NONE),
}


def policy(name: str) -> Policy:
    """The table's policy, or one read from the method's first parameter."""
    if name in POLICIES:
        return POLICIES[name]
    method = methods.get(name)
    first = method.params[0] if method.params else None
    if first is None or method.varies_per_image:
        return Policy(NONE)
    if first.kind is float and first.low == 0 and first.low_open and first.high == 1:
        return Policy(RATE)
    return Policy(COUNT) if first.kind is int and first.counts_tokens else Policy(NONE)


def block_methods() -> tuple[str, ...]:
    """The methods the search may give any block with any amount, in the registry's order."""
    return tuple(name for name in methods.names() if policy(name).kind in (RATE, COUNT))


def per_image_methods() -> tuple[str, ...]:
    return tuple(name for name in methods.names() if policy(name).kind == CAP)


def yardstick() -> str:
    """The method whose constant schedule is the search's floor and fallback."""
    return next(name for name, entry in POLICIES.items() if entry.yardstick)


def amount_settings(name: str, value: float, protect: float = 0.0) -> dict:
    """The settings that set `name`'s first parameter to `value` (and the policy's fixed settings)."""
    entry = policy(name)
    settings = {methods.get(name).params[0].name: value, **entry.fixed}
    return settings | ({"protect": protect} if entry.protect else {})


def fit_settings(name: str) -> dict:
    """A small valid setting, to ask whether a model can run the method at all."""
    return amount_settings(name, 1 if policy(name).kind == COUNT else 0.9)


def removing(name: str, want: int, tokens: int, num_prefix: int, protect: float) -> tuple[dict, int] | None:
    """Settings that remove about `want` of the `tokens` entering a block, and the tokens after; None: nothing."""
    entry, patch = policy(name), tokens - num_prefix
    if entry.kind == RATE:
        removed = min(want, patch - max(1, math.ceil(MIN_SEARCH_KEEP * patch)))
        if removed <= 0:
            return None
        keep = round((patch - removed) / patch, 4)
        return amount_settings(name, keep), num_prefix + evit_keep_count(patch, keep) + entry.added
    count = min(want, patch // 2)
    if count <= 0:
        return None
    return amount_settings(name, count, protect), tokens - count


def probe(name: str, unit: int, tokens: int, num_prefix: int, protect: float) -> dict:
    """Settings that remove `unit` patch tokens at one block (the sensitivity probe)."""
    patch = tokens - num_prefix
    if policy(name).kind == RATE:
        return amount_settings(name, round(1 - unit / patch, 4))
    return amount_settings(name, min(unit, patch // 2), protect)
