"""The cascade module: stages of one model's weights, each image answering at the first stage sure enough."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vitprune.cascade.exits import CascadeRun, check_criterion, run_exits
from vitprune.cascade.grammar import describe_stage
from vitprune.data import resize_images, transform_for
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.patch import apply_plan, model_img_size, plan_of
from vitprune.plan import Plan


class CascadeModel(nn.Module):
    """Stages of increasing cost; each image answers at the first stage confident enough.

    `stages[i]` are timm ViTs (reduced by `vitprune.patch.apply_plan`) sharing their weight tensors;
    `thresholds[i]` is the confidence at or above which an image leaves stage i (one per stage but
    the last, which always answers). forward(images) -> logits, images preprocessed at `input_size`.
    """

    def __init__(self, stages: Sequence[nn.Module], thresholds: Sequence[float], *, criterion: str = "maxprob",
                 stage_gmacs: Sequence[float] | None = None, base: nn.Module | None = None,
                 info: dict | None = None) -> None:
        super().__init__()
        if len(stages) < 2:
            raise VitpruneError(f"a cascade needs at least 2 stages, got {len(stages)}")
        check_criterion(criterion)
        self.stages = nn.ModuleList(stages)
        self.criterion = criterion
        self.set_thresholds(thresholds)
        self.stage_sizes = [model_img_size(stage) for stage in stages]
        self.input_size = max(self.stage_sizes)
        # Unregistered: its parameters are the stages' own (shared), kept only to save the weights once.
        object.__setattr__(self, "base", base)
        self.info = dict(info or {})
        self.stage_gmacs = [float(g) for g in stage_gmacs] if stage_gmacs is not None else [
            count_macs(stage).gmacs for stage in stages]
        self.eval()

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != len(self.stages) - 1:
            raise VitpruneError(f"{len(self.stages)} stages take {len(self.stages) - 1} thresholds, "
                                f"got {len(thresholds)}")
        if any(math.isnan(t) for t in thresholds):
            raise VitpruneError("a threshold is NaN")
        self.thresholds = thresholds

    @property
    def plans(self) -> list[Plan]:
        return [plan_of(stage) or Plan(img_size=size)
                for stage, size in zip(self.stages, self.stage_sizes, strict=True)]

    def forward(self, images: Tensor) -> Tensor:
        return self.run(images).logits

    def run(self, images: Tensor, *, count_macs: bool = False) -> CascadeRun:
        """Logits, the stage each image exited at and (with `count_macs`) the GMACs each image cost."""
        return run_exits(images, self.stages, self.stage_sizes, self.thresholds, self.criterion,
                         cost=self.stage_gmacs_per_image if count_macs else None)

    def stage_gmacs_per_image(self, index: int, inputs: Tensor) -> Tensor:
        """GMACs of stage `index` on each of `inputs` (at the stage's size): counted on the images
        when the plan's token count varies per image, else the stage's fixed cost."""
        if self.plans[index].varies_per_image:
            return count_macs(self.stages[index], inputs).gmacs_per_image
        return torch.full((inputs.shape[0],), self.stage_gmacs[index], dtype=torch.float64)

    def transform(self):
        """timm's eval preprocessing for this cascade's input size."""
        widest = self.stages[self.stage_sizes.index(self.input_size)]
        return transform_for(widest, self.input_size)

    def describe(self) -> str:
        return "; ".join(describe_stage(plan) for plan in self.plans)  # pastes back as --stages


class Resized(nn.Module):
    """A stage fed with the full-size batch, resized as inside the cascade (for `vitprune.data.predict`)."""

    def __init__(self, stage: nn.Module, size: int) -> None:
        super().__init__()
        self.stage, self.size = stage, size

    def forward(self, images: Tensor) -> Tensor:
        return self.stage(resize_images(images, self.size))


def build_stages(base: nn.Module, plans: Sequence[Plan]) -> list[nn.Module]:
    """One model per plan, sharing the base's parameter tensors (deepcopy with the parameters
    pre-seeded in the memo); a stage at another input size gets its own resampled position
    embedding (timm's set_input_size replaces that one parameter on the copy only)."""
    if plan_of(base) is not None and plan_of(base).reductions:
        raise VitpruneError("the cascade's base model must be unreduced; give the plain model")
    shared = {id(param): param for param in base.parameters()}
    stages = []
    for plan in plans:
        stage = copy.deepcopy(base, memo=dict(shared))
        stages.append(apply_plan(stage, plan).eval())
    return stages


def build_cascade(base: nn.Module, plans: Sequence[Plan], thresholds: Sequence[float] | None = None, *,
                  criterion: str = "maxprob", info: dict | None = None,
                  stage_gmacs: Sequence[float] | None = None) -> CascadeModel:
    """A CascadeModel over `base`'s weights; thresholds default to +inf (every image runs every
    stage up to the last; calibrate them with `calibrate_thresholds`)."""
    thresholds = [math.inf] * (len(plans) - 1) if thresholds is None else thresholds
    return CascadeModel(build_stages(base, plans), thresholds, criterion=criterion, base=base, info=info,
                        stage_gmacs=stage_gmacs)
