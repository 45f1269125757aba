"""The search's frame, before any image is read: input sizes, the models per size, the methods the
model can run, the token geometry, the budget's GMACs target and ladder, and the floor check."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vitprune.budget import Budget
from vitprune.calibrate import policy
from vitprune.calibrate.evaluate import MacsCounter
from vitprune.calibrate.shapes import Geometry, auto_sizes, constant_shape, shape_plan
from vitprune.errors import VitpruneError
from vitprune.models import outputs_embeddings, patch_size_of
from vitprune.patch import apply_plan, check_plan_fits, has_position_bias, model_img_size, tokens_before
from vitprune.plan import Plan, make_plan

LADDER = (0.9, 0.8, 0.7, 0.6, 0.5)  # GMACs budgets: frontier points at these ratios above the target
# Budgets without a GMACs target (latency, accuracy drop): shapes are found at a middle budget, then
# scaled along this ladder of ratios.
SEARCH_RATIO = 0.6
OPEN_LADDER = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)


@dataclass
class Setup:
    """What every step of the search shares."""

    base_model: nn.Module
    sizes: list[int]  # input sizes searched, largest first
    methods: tuple[str, ...]  # the methods the model can run, block methods first
    block_methods: tuple[str, ...]  # any block, any amount (evit, tome), in the order the search tries them
    per_image: str | None  # the per-image method (ATS), with a shape of its own
    models: dict[int, nn.Module]  # input size -> an unreduced copy of the base at that size
    macs: MacsCounter
    geometry: Geometry
    target: float  # GMACs the shapes are fitted to
    ladder_targets: list[float]  # GMACs of the frontier's budgets, the target last (GMACs budgets)
    embedding: bool = False  # the model outputs an embedding: plans are scored by cosine and retrieval

    @property
    def depth(self) -> int:
        return self.geometry.depth

    @property
    def base_size(self) -> int:
        return self.geometry.base_size

    @property
    def base_gmacs(self) -> float:
        return self.geometry.base_gmacs

    def fits(self, plan: Plan) -> bool:
        return fits(self.base_model, plan)


def fits(model: nn.Module, plan: Plan) -> bool:
    try:
        check_plan_fits(model, plan)
    except VitpruneError:
        return False
    return True


def prepare(base_model: nn.Module, img_sizes: list[int] | None, head_only: bool, budget: Budget) -> Setup:
    """The search's frame for `base_model`; an unreachable budget fails here, before any image is read."""
    base_size = model_img_size(base_model)
    sizes = search_sizes(base_model, img_sizes)
    depth = len(base_model.blocks)
    usable = usable_methods(base_model)
    block_methods = tuple(m for m in usable if m in policy.block_methods())
    per_image = next((m for m in usable if m in policy.per_image_methods()), None)
    if not block_methods:
        why = ("; its relative position bias takes pruning only (the search's evit fuses tokens, tome and ppt merge "
               "them): use vitprune apply with evit fuse=false, ats or zerotprune") if has_position_bias(base_model) else ""
        raise VitpruneError(f"this model supports no token reduction method vitprune can calibrate{why}")
    models = {size: apply_plan(copy.deepcopy(base_model), Plan(img_size=size)) for size in sizes}
    macs = MacsCounter(models)
    base_gmacs = macs.gmacs(Plan(img_size=base_size))
    geometry = Geometry(depth=depth, num_prefix=base_model.num_prefix_tokens,
                        tokens_at={size: input_tokens(models[size], size) for size in sizes},
                        base_size=base_size, base_gmacs=base_gmacs,
                        head_only=head_only and fits(base_model, Plan(head_only=True)))
    target, ladder_targets = budget_targets(budget, base_gmacs)
    floor = floor_gmacs(macs, geometry, sizes[-1])
    if target < floor:
        raise VitpruneError(f"the budget of {target:.3f} GMACs is out of reach: the most reduced plan searched "
                            f"(ToMe at every block, {sizes[-1]}px) needs {floor:.3f} GMACs")
    return Setup(base_model=base_model, sizes=sizes, methods=usable, block_methods=block_methods,
                 per_image=per_image, models=models, macs=macs, geometry=geometry, target=target,
                 ladder_targets=[t for t in ladder_targets if t >= floor], embedding=outputs_embeddings(base_model))


def search_sizes(base_model: nn.Module, img_sizes: list[int] | None) -> list[int]:
    """The sizes asked for (default: auto_sizes) and the model's own, largest first, each checked."""
    base_size = model_img_size(base_model)
    patch = patch_size_of(base_model)
    sizes = sorted(set(img_sizes or auto_sizes(base_size, patch)) | {base_size}, reverse=True)
    bad = [size for size in sizes if size % patch]
    if bad:
        raise VitpruneError(f"img_sizes must be multiples of the patch size {patch}, got {bad}", param="img_sizes")
    return sizes


def usable_methods(base_model: nn.Module) -> tuple[str, ...]:
    """The methods this model can run: the searchable block methods in their order, then the per-image one."""
    depth = len(base_model.blocks)
    return tuple(name for name in policy.block_methods() + policy.per_image_methods()
                 if fits(base_model, make_plan(name, depth, **policy.fit_settings(name))))


def budget_targets(budget: Budget, base_gmacs: float) -> tuple[float, list[float]]:
    """(the GMACs target the shapes are fitted to, the GMACs of the frontier's budgets)."""
    if budget.has_gmacs_target:
        target = budget.gmacs(base_gmacs)
        ladder = sorted({round(r, 2) for r in LADDER if r * base_gmacs > target * 1.02}, reverse=True)
        return target, [r * base_gmacs for r in ladder] + [target]
    return SEARCH_RATIO * base_gmacs, [round(r, 2) * base_gmacs for r in OPEN_LADDER]


def floor_gmacs(macs: MacsCounter, geometry: Geometry, size: int) -> float:
    """GMACs of the most reduced plan searched: ToMe at every block, as much as it can, at `size`."""
    most = constant_shape(size, geometry.depth, "most")
    tokens = geometry.tokens_at[size]
    return macs.gmacs(shape_plan(most, float(tokens), tokens, geometry.num_prefix, geometry.head_only))


def input_tokens(model: nn.Module, size: int) -> int:
    """Tokens entering block 0 at this input size (prefix tokens included)."""
    return tokens_before(model, torch.zeros(1, 3, size, size), 0).shape[1]
