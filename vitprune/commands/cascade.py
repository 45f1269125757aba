"""`cascade` as a library call: build the stages, calibrate the thresholds to a GMACs budget,
measure held-out figures next to single models, write the cascade folder."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vitprune.artifact import versions
from vitprune.budget import Budget
from vitprune.cascade import (
    CRITERIA,
    CascadeImages,
    CascadeModel,
    EvalOptions,
    build_cascade,
    cascade_report,
    evaluate_cascade,
    parse_stages,
    plot_curve,
    render_cascade_markdown,
    save_cascade,
)
from vitprune.checks import check_finite, check_whole
from vitprune.commands.common import check_device
from vitprune.data import ImageSet, check_labels, load_images, split, transform_for
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.io import check_output_dir
from vitprune.models import outputs_embeddings, patch_size_of
from vitprune.patch import model_img_size
from vitprune.runtime import Runtime, check_fits
from vitprune.source import BaseModel, load_base
from vitprune.timm_datasets import DatasetOptions, find_image_set


@dataclass
class CascadeRequest(DatasetOptions):
    """Everything `vitprune cascade` takes; the same fields as its options."""

    model: str
    stages: str
    data: Path | str  # an image folder or a dataset timm reads (hfds/..., wds/..., .tar; bound it with limit)
    target_gmacs: float | None = None
    target_ratio: float | None = None
    criterion: str = "maxprob"
    checkpoint: Path | None = None
    no_pretrained: bool = False
    holdout: float = 0.5
    seed: int = 0
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    frontier: bool = True
    onnx: bool = False
    device: str = "cpu"
    dtype: str = "float32"  # autocast precision of every evaluation (vitprune.runtime)
    output: Path | None = None
    force: bool = False
    progress: bool = True

    def check(self) -> Budget:
        """Every setting, before any model is built or image read; returns the budget."""
        if self.criterion not in CRITERIA:
            raise VitpruneError(f"unknown criterion '{self.criterion}'; choose {' or '.join(CRITERIA)}",
                                param="criterion")
        check_finite(self.holdout, "holdout", low=0, high=1, low_open=True, high_open=True, rule="a fraction in (0, 1)")
        self.check_data_options(self.data)
        check_whole(self.batch_size, "batch_size", 1)
        check_whole(self.workers, "workers", 0)
        if self.limit is not None:
            check_whole(self.limit, "limit", 1)
        budget = self.budget()
        if self.onnx and self.output is None:
            raise VitpruneError("output is required with onnx (the ONNX graphs go into the output folder)",
                                param="output")
        check_device(self.device)
        Runtime(device=self.device, dtype=self.dtype).check()
        if self.output is not None:
            check_output_dir(self.output, self.force)
        return budget

    def budget(self) -> Budget:
        """The GMACs budget: target_gmacs, or target_ratio in (0, 1] of the base model's GMACs."""
        return Budget.from_targets(target_gmacs=self.target_gmacs, target_ratio=self.target_ratio,
                                   allowed=("gmacs", "ratio"))

    def budget_param(self) -> str:
        return "target_gmacs" if self.target_gmacs is not None else "target_ratio"


@dataclass
class CascadeResult:
    cascade: CascadeModel
    report: dict
    curve_png: bytes | None = None
    extra: dict = field(default_factory=dict)


def run_cascade(request: CascadeRequest) -> CascadeResult:
    """Build the cascade, calibrate its thresholds to the budget, report held-out figures, the
    accuracy-vs-budget curve next to single fixed plans, and write the artifact if asked."""
    budget = request.check()
    image_set = find_image_set(request.data, request, limit=request.limit)
    base = load_base(request.model, request.checkpoint, request.no_pretrained, None)
    if outputs_embeddings(base.model):
        raise VitpruneError(f"{request.model} outputs an embedding (no classifier head): a cascade exits on a "
                            "confident class prediction and an embedding has no confidence; use apply or calibrate")
    check_labels(image_set, base.model.num_classes)  # before any stage is built or run
    model = base.model.to(request.device).eval()
    cascade = _build(request, model, base.info)
    base_gmacs = count_macs(model).gmacs
    budget_gmacs = _budget_gmacs(request, budget, base_gmacs, cascade)
    data = _load_images(request, model, cascade, image_set)
    options = EvalOptions(batch_size=request.batch_size, progress=request.progress, frontier=request.frontier)
    runtime = Runtime(device=request.device, dtype=request.dtype)
    with runtime.autocast():
        figures = evaluate_cascade(cascade, model, data, budget_gmacs, base_gmacs, options)
    report = cascade_report(cascade, base.info, img_size=model_img_size(model), base_gmacs=base_gmacs,
                            budget={"gmacs": budget_gmacs, "given": _flag(request.budget_param())},
                            data=_data_section(request, image_set, data), figures=figures, versions=versions())
    report["runtime"] = runtime.to_dict()
    png = plot_curve(report)
    if request.output is not None:
        _write(request, cascade, base, report, png)
    return CascadeResult(cascade=cascade, report=report, curve_png=png)


def _build(request: CascadeRequest, model: nn.Module, info: dict) -> CascadeModel:
    """The stages of `request.stages` on `model`'s weights (thresholds not calibrated yet)."""
    plans = parse_stages(request.stages, depth=len(model.blocks), base_size=model_img_size(model),
                         patch_size=patch_size_of(model))
    check_fits(model, batch=request.batch_size, img_size=max(plan.img_size for plan in plans), device=request.device,
               batch_param="batch_size", size_param="stages")  # before any stage is built at that size
    return build_cascade(model, plans, criterion=request.criterion, info=info)


def _budget_gmacs(request: CascadeRequest, budget: Budget, base_gmacs: float, cascade: CascadeModel) -> float:
    """The budget in GMACs, refused before the long work when every image's first stage exceeds it."""
    gmacs = budget.gmacs(base_gmacs)
    first_cost = cascade.stage_gmacs[0]
    if not cascade.plans[0].varies_per_image and gmacs < first_cost:
        raise VitpruneError(f"budget {gmacs:.3f} GMACs is below the first stage's own cost ({first_cost:.3f} GMACs, "
                            "every image runs it); raise the budget or use a cheaper first stage",
                            param=request.budget_param())
    return gmacs


def _load_images(request: CascadeRequest, model: nn.Module, cascade: CascadeModel, image_set: ImageSet) -> CascadeImages:
    """The images at the cascade's input size (on the device), split into calibration and held-out."""
    images, labels = load_images(image_set, transform_for(model, img_size=cascade.input_size),
                                 num_workers=request.workers, batch_size=request.batch_size, progress=request.progress)
    calibration_set, holdout_set = split(image_set, request.holdout, request.seed)
    return CascadeImages(images=images.to(request.device), labels=labels,
                         calib_idx=_indices(image_set, calibration_set), hold_idx=_indices(image_set, holdout_set))


def _indices(image_set: ImageSet, part: ImageSet) -> Tensor:
    position = {file: index for index, file in enumerate(image_set.files)}
    return torch.tensor([position[file] for file in part.files], dtype=torch.long)


def _data_section(request: CascadeRequest, image_set: ImageSet, data: CascadeImages) -> dict:
    labelled = data.labels is not None
    return {"path": str(request.data), "n_images": len(image_set), "n_calibration": len(data.calib_idx),
            "n_holdout": len(data.hold_idx), "labelled": labelled, "holdout_fraction": request.holdout,
            "seed": request.seed,
            "metric": "top-1 against the labels" if labelled else "agreement with the base model"}


def _flag(param: str) -> str:
    """How report.json has always named the budget given: as the command's option."""
    return "--" + param.replace("_", "-")


def _write(request: CascadeRequest, cascade: CascadeModel, base: BaseModel, report: dict, png: bytes) -> None:
    save_cascade(request.output, cascade.cpu(), base.info, report=report, report_md=render_cascade_markdown(report),
                 extra_files={"curve.png": png}, force=request.force, onnx=request.onnx)


__all__ = ["CascadeRequest", "CascadeResult", "run_cascade"]
