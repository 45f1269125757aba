"""Shapes: how a plan spreads its reduction over the blocks, scaled to a budget.

A `Shape` gives each block a method (one calibrate may give any block with any amount,
`vitprune.methods.searchable`) and a relative weight; `shape_plan` turns it into a plan removing
about `scale * weight` tokens per block, within each method's limits (`policy.removing`). An
`AtsShape` runs the per-image method (ATS) from one block on with a cap. `fit_to_budget` finds,
by bisection on exact GMACs, the least reduction of a shape that meets a budget.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

from torch import Tensor

from vitprune import methods
from vitprune.calibrate import policy
from vitprune.calibrate.evaluate import MacsCounter
from vitprune.plan import Plan, Reduction, make_plan

GAMMAS = (0.0, 1.0, 2.0)  # 0: the same amount everywhere (ToMe's schedule); 2: strongly by efficiency
BISECTION_STEPS = 18
# The yardstick's constant schedule (ToMe: the same r in every block) is the most reduced plan searched
# (the budget's floor), the schedule the protect weight is chosen on, the guard's fallback.
CONSTANT_METHOD = policy.yardstick()


@dataclass
class Geometry:
    depth: int
    num_prefix: int
    tokens_at: dict[int, int]  # input size -> tokens entering block 0
    base_size: int
    base_gmacs: float
    head_only: bool = False  # every plan computes only the prefix tokens in the last block
    protect: float = 0.0  # the protect weight of every ToMe block


@dataclass(frozen=True)
class Shape:
    """How a plan spreads its reduction over the blocks; `shape_plan` scales it to an amount."""

    img_size: int
    methods: tuple[str | None, ...]  # per block: a searchable method or None
    weights: tuple[float, ...]  # relative number of tokens removed in each block
    label: str

    def normalised(self) -> Shape:
        top = max((w for w, m in zip(self.weights, self.methods, strict=True) if m is not None), default=0.0)
        if top <= 0:
            return self
        return replace(self, weights=tuple(round(w / top, 4) for w in self.weights))

    def most(self, geometry: Geometry) -> float:
        """An amount past which nothing more is removed."""
        return float(geometry.tokens_at[self.img_size])

    def build(self, amount: float, geometry: Geometry) -> Plan:
        return shape_plan(self, amount, geometry.tokens_at[self.img_size], geometry.num_prefix, geometry.head_only,
                          geometry.protect)


@dataclass(frozen=True)
class AtsShape:
    """The per-image method (ATS) in the blocks from `start` on, its cap scaled to the budget."""

    img_size: int
    start: int
    method: str

    @property
    def label(self) -> str:
        return self.method

    def most(self, geometry: Geometry) -> float:
        return 1.0

    def build(self, amount: float, geometry: Geometry) -> Plan:  # amount 0 -> cap 1.0 (no explicit cap), 1 -> cap 0.05
        return ats_plan(self, 1.0 - 0.95 * amount, geometry.depth, geometry.head_only)


def shape_plan(shape: Shape, scale: float, num_tokens: int, num_prefix: int, head_only: bool = False,
               protect: float = 0.0) -> Plan:
    """Remove about `scale * weight` tokens in each block (within each method's limits), ToMe blocks
    with the `protect` weight. With `head_only` the last block keeps only the prefix tokens, so it
    reduces nothing else."""
    reductions = []
    tokens = num_tokens
    last = len(shape.methods) - 1
    for layer, (method, weight) in enumerate(zip(shape.methods, shape.weights, strict=True)):
        if method is None or weight <= 0 or (head_only and layer == last):
            continue
        removal = policy.removing(method, round(scale * weight), tokens, num_prefix, protect)
        if removal is not None:
            settings, tokens = removal
            reductions.append(Reduction(layer, method, **settings))
    return Plan(reductions=tuple(reductions), img_size=shape.img_size, head_only=head_only)


def ats_plan(shape: AtsShape, keep: float, depth: int, head_only: bool = False) -> Plan:
    return Plan(reductions=tuple(Reduction(layer, shape.method, **policy.amount_settings(shape.method, round(keep, 4)))
                                 for layer in range(shape.start, depth - 1 if head_only else depth)),
                img_size=shape.img_size, head_only=head_only)


def fit_to_budget(shape: Shape | AtsShape, target: float, geometry: Geometry, macs: MacsCounter,
                  count_images: dict[int, Tensor]) -> Plan | None:
    """The least reduction of `shape` whose GMACs fit `target`, or None when it cannot reach it."""
    images = count_images[shape.img_size]
    if macs.gmacs(shape.build(0.0, geometry), images) <= target:
        return shape.build(0.0, geometry)
    high = shape.most(geometry)
    if macs.gmacs(shape.build(high, geometry), images) > target:
        return None
    low = 0.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if macs.gmacs(shape.build(middle, geometry), images) <= target:
            high = middle
        else:
            low = middle
    return shape.build(high, geometry)


def constant_shape(size: int, depth: int, label: str) -> Shape:
    """ToMe's constant schedule: the same amount in every block."""
    return Shape(size, (CONSTANT_METHOD,) * depth, (1.0,) * depth, label)


def make_shapes(sensitivity: list[dict], geometry: Geometry, block_methods: tuple[str, ...], sizes: list[int],
                per_image: str | None) -> list[Shape | AtsShape]:
    """Candidate shapes from the sensitivity of each block: per input size, each method alone and the
    more efficient per block, weighted by (GMACs saved / KL)^gamma; each method's own default blocks;
    and the per-image method (ATS) from its first default block."""
    depth = geometry.depth
    efficiency = block_efficiency(sensitivity, block_methods)
    assignments: dict[str, tuple[str | None, ...]] = {m: (m,) * depth for m in block_methods}
    if len(block_methods) > 1:
        assignments["mixed"] = tuple(max(block_methods, key=lambda m: efficiency(layer, m)) for layer in range(depth))
    shapes: list[Shape | AtsShape] = []
    for size in sizes:
        for name, assignment in assignments.items():
            for gamma in GAMMAS:
                weights = tuple(efficiency(layer, m) ** gamma for layer, m in enumerate(assignment))
                shapes.append(Shape(size, assignment, weights, f"{name} gamma={gamma:g}").normalised())
        for method in block_methods:  # a method's own schedule (EViT: three evenly spaced blocks)
            own = set(methods.get(method).default_layers(depth))
            if own != set(range(depth)):
                shapes.append(Shape(size, tuple(method if layer in own else None for layer in range(depth)),
                                    (1.0,) * depth, f"{method} {len(own)} blocks"))
    if per_image is not None:
        shapes.append(AtsShape(geometry.base_size, start=methods.get(per_image).default_layers(depth)[0],
                               method=per_image))
    return shapes


def block_efficiency(sensitivity: list[dict], block_methods: tuple[str, ...]):
    """(layer, method) -> GMACs saved per unit of divergence (KL, or 1 - cosine) at the sensitivity probe."""
    kls = [row[m]["divergence"] for row in sensitivity for m in block_methods]
    floor = max(sorted(kls)[len(kls) // 2] * 0.05, 1e-6)  # a nearly free block must not take everything

    def efficiency(layer: int, method: str) -> float:
        entry = sensitivity[layer][method]
        return max(entry["saved_gmacs"], 1e-9) / max(entry["divergence"], floor)

    return efficiency


def mutate(shape: Shape, block_methods: tuple[str, ...], sizes: list[int], rng: random.Random) -> Shape:
    """One to two blocks change weight or method; sometimes the input size moves one step."""
    weights, chosen = list(shape.weights), list(shape.methods)
    block_methods = list(block_methods)
    for layer in rng.sample(range(len(weights)), k=rng.choice((1, 2))):
        move = rng.random()
        if move < 0.3 and len(block_methods) > 1:
            chosen[layer] = rng.choice([m for m in block_methods if m != chosen[layer]])
            weights[layer] = weights[layer] or 0.5
        elif chosen[layer] is None or weights[layer] == 0:
            chosen[layer] = chosen[layer] or rng.choice(block_methods)
            weights[layer] = rng.choice((0.25, 0.5, 1.0))
        else:
            weights[layer] *= rng.choice((0.0, 0.5, 1.5, 2.0))
    size = shape.img_size
    if len(sizes) > 1 and rng.random() < 0.2:
        index = sizes.index(size) + rng.choice((-1, 1))
        size = sizes[min(max(index, 0), len(sizes) - 1)]
    return Shape(size, tuple(chosen), tuple(weights), "refined").normalised()


def reference_plans(depth: int, usable) -> dict[str, Plan]:
    """The published settings of each method's policy that the model can run (`usable(plan)`), at the
    method's default blocks (EViT keep 0.7 at its 3 blocks, ToMe r = 8, 13, 16), named by their plan line."""
    plans = [make_plan(text, depth) for name in methods.names() for text in policy.policy(name).references]
    return {plan.describe(): plan for plan in plans if usable(plan)}


def auto_sizes(base_size: int, patch: int) -> list[int]:
    """The model's size and up to 3 smaller multiples of the patch size, down to 3/4 of it."""
    return [base_size - k * patch for k in range(4) if base_size - k * patch >= 0.75 * base_size]
