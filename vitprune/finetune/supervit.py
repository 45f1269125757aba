"""The configurations a student serves: one plan, or SuperViT's every input size x EViT keep rate.

SuperViT trains one set of weights for all of them at once; the artifact stores the grid in its
plan notes, and `load_variant` serves any one of it.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vitprune.artifact import load_artifact, read_metadata
from vitprune.errors import VitpruneError
from vitprune.models import patch_size_of
from vitprune.patch import apply_plan, has_position_bias, model_img_size, remove_plan, set_dynamic_img_size
from vitprune.plan import Plan, make_plan

SUPERVIT_METHOD = "evit"  # SuperViT's token reduction: top-k at the method's default layers


@dataclass
class Variant:
    """One configuration the student serves: a plan at an input size."""

    key: str  # column prefix in metrics.csv
    label: str  # what people read
    plan: Plan  # with img_size (None: the model's own size), as users apply it
    img_size: int
    keep: float | None = None  # SuperViT keep rate


def single_variant(plan: Plan, model: nn.Module) -> Variant:
    """The one configuration of a plain run: `plan` on `model`."""
    return Variant(key="val", label=plan.describe(), plan=plan, img_size=plan.img_size or model_img_size(model))


def grid_variants(model: nn.Module, sizes: tuple[int, ...], keeps: tuple[float, ...]) -> list[Variant]:
    """SuperViT's configurations for `model` (see `supervit_variants`)."""
    if has_position_bias(model):  # its bias is made for one grid, and SuperViT's EViT fuses tokens
        raise VitpruneError("supervit trains at several input sizes with EViT's fused token; this model's relative "
                            "position bias is made for one grid and takes pruning only (finetune one plan instead)",
                            param="supervit")
    return supervit_variants(len(model.blocks), model_img_size(model), sizes, keeps, patch_size_of(model))


def supervit_variants(depth: int, model_size: int, sizes: tuple[int, ...], keeps: tuple[float, ...],
                      patch_size: int) -> list[Variant]:
    """Every size x keep rate, largest first: EViT top-k at its default layers (3, 6, 9 of 12);
    keep 1.0 is the plain model. Sizes must be multiples of the patch size, the largest the
    model's own size (the weights are stored at that size; smaller ones are resampled from it)."""
    for size in sizes:
        if size < patch_size or size % patch_size:
            raise VitpruneError(f"SuperViT sizes must be multiples of the patch size {patch_size}, got {size}",
                                param="sizes")
    if max(sizes) != model_size:
        raise VitpruneError(f"the largest SuperViT size must be the model's input size {model_size} "
                            f"(got {max(sizes)}); set img_size to change the model's size", param=("sizes", "img_size"))
    variants = []
    for size in sorted(sizes, reverse=True):
        for keep in sorted(keeps, reverse=True):
            img_size = None if size == model_size else size
            plan = Plan(img_size=img_size) if keep == 1 else make_plan(SUPERVIT_METHOD, depth, keep=keep,
                                                                       img_size=img_size)
            variants.append(Variant(key=f"{size}_k{keep:g}", label=f"{size}px keep {keep:g}", plan=plan,
                                    img_size=size, keep=keep))
    return variants


def make_student(weights: nn.Module, plan: Plan, supervit: bool) -> nn.Module:
    """A copy of `weights` (the unreduced model being fine-tuned) running `plan`; with SuperViT it takes
    every input size."""
    student = apply_plan(copy.deepcopy(weights), plan)
    if supervit:
        set_dynamic_img_size(student, True)  # one set of weights, every input size
    return student


def served_model(trained: nn.Module, plan: Plan) -> nn.Module:
    """A copy of the trained weights running `plan` exactly as `vitprune.load` + `vitprune.apply`
    would serve it (a fixed input size, the position embedding resampled once)."""
    model = copy.deepcopy(trained)
    set_dynamic_img_size(model, False)
    remove_plan(model)
    return apply_plan(model, plan).eval()


def list_variants(path: str | Path) -> list[dict]:
    """The SuperViT configurations stored in a finetune artifact: name, img_size, keep, plan, GMACs, accuracy."""
    notes = read_metadata(path).get("plan", {}).get("notes") or {}
    if "supervit" not in notes:
        raise VitpruneError(f"{path} was not trained with supervit: it serves only its own plan")
    return notes["supervit"]["variants"]


def load_variant(path: str | Path, img_size: int, keep: float, *, device: str | torch.device = "cpu") -> nn.Module:
    """The SuperViT artifact at `path` running its configuration (img_size, keep)."""
    variants = list_variants(path)
    chosen = next((v for v in variants if v["img_size"] == img_size and math.isclose(v["keep"], keep)), None)
    if chosen is None:
        available = ", ".join(f"{v['img_size']}:{v['keep']:g}" for v in variants)
        raise VitpruneError(f"no configuration {img_size}px keep {keep:g} in {path}; it has (size:keep) {available}")
    return apply_plan(load_artifact(path, device=device), Plan.from_dict(chosen["plan"]))
