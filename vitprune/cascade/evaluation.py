"""What a calibrated cascade is worth: measured on held-out images, next to single fixed plans.

`evaluate_cascade` calibrates the thresholds to the budget on the calibration images, runs the
CascadeModel on the held-out ones, draws the accuracy-vs-budget curve and measures the single
models (each stage alone and the fixed EViT/ToMe schedules of FRONTIER) on the same images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitprune.cascade.grammar import describe_stage
from vitprune.cascade.model import CascadeModel, Resized, build_stages
from vitprune.cascade.thresholds import (
    StageTable,
    calibrate_thresholds,
    curve,
    evaluate,
    exit_figures,
    percent_equal,
    stage_table,
)
from vitprune.data import predict
from vitprune.flops import count_macs
from vitprune.patch import model_img_size
from vitprune.plan import Plan, make_plan
from vitprune.progress import progress_bar


@dataclass(frozen=True)
class Schedule:
    """A family of fixed single-model plans to compare the cascade with, and how the curve plot draws it."""

    method: str
    setting: str
    values: tuple
    label: str
    marker: str
    color: str


FRONTIER = (
    Schedule("evit", "keep", (0.5, 0.6, 0.7, 0.8), "EViT keep 0.5-0.8", "^", "C1"),
    Schedule("tome", "r", tuple(range(4, 17)), "ToMe r=4..16", "v", "C2"),
)


@dataclass
class CascadeImages:
    """The preprocessed images (at the cascade's input size), labels or None, and the split."""

    images: Tensor
    labels: Tensor | None
    calib_idx: Tensor
    hold_idx: Tensor

    def labels_at(self, index: Tensor) -> Tensor | None:
        return self.labels[index] if self.labels is not None else None

    def images_at(self, index: Tensor) -> Tensor:
        return self.images[index.to(self.images.device)]


@dataclass
class EvalOptions:
    batch_size: int = 64
    progress: bool = True
    frontier: bool = True  # also measure the FRONTIER single models


def frontier_plans(depth: int) -> list[Plan]:
    """Fixed single-model schedules: EViT keep 0.5-0.8 at its default layers, ToMe r = 4..16."""
    return [make_plan(schedule.method, depth, **{schedule.setting: value})
            for schedule in FRONTIER for value in schedule.values]


def evaluate_cascade(cascade: CascadeModel, model: nn.Module, data: CascadeImages, budget: float, base_gmacs: float,
                     options: EvalOptions) -> dict:
    """Calibrate `cascade`'s thresholds to `budget` (GMACs) and its report sections: calibration,
    holdout, holdout_base, curve, frontier, comparison."""
    table = stage_table(cascade, data.images, batch_size=options.batch_size, progress=options.progress)
    reference = base_predictions(cascade, model, data.images, table, options)
    targets = data.labels if data.labels is not None else reference
    calib, hold = data.calib_idx, data.hold_idx
    calib_table, hold_table = table.subset(calib), table.subset(hold)
    calibration = calibrate_thresholds(calib_table, targets[calib], budget)
    cascade.set_thresholds(calibration.thresholds)
    measured = measure(cascade, data.images_at(hold), data.labels_at(hold), reference[hold], options)
    rows = curve(table, calib, hold, targets, data.labels, reference, base_gmacs, budget)
    frontier = single_models(cascade, model, data, reference, hold_table, base_gmacs, options)
    return {
        "calibration": {**calibration.to_dict(), **evaluate(calib_table, calibration.thresholds,
                                                            data.labels_at(calib), reference[calib])},
        "holdout": measured,
        "holdout_base": base_figures(data.labels_at(hold), reference[hold]),
        "curve": rows,
        "frontier": frontier,
        "comparison": compare(measured, frontier, data.labels is not None),
    }


def base_predictions(cascade: CascadeModel, model: nn.Module, images: Tensor, table: StageTable,
                     options: EvalOptions) -> Tensor:
    """Predictions of the unreduced model at its own size (the agreement reference)."""
    size = model_img_size(model)
    for s, plan in enumerate(cascade.plans):
        if not plan.reductions and plan.img_size == size:
            return table.prediction[s]
    with torch.inference_mode():
        return predict(Resized(model, size), images, batch_size=options.batch_size, progress=options.progress,
                       description="Base model").argmax(dim=-1)


def base_figures(labels: Tensor | None, reference: Tensor) -> dict:
    out = {"agreement": 100.0}
    if labels is not None:
        out["top1"] = percent_equal(reference, labels)
    return out


def measure(cascade: CascadeModel, images: Tensor, labels: Tensor | None, reference: Tensor,
            options: EvalOptions) -> dict:
    """Held-out figures from really running the CascadeModel (batched, gather/scatter)."""
    predictions, exits, gmacs = [], [], []
    with torch.inference_mode(), progress_bar(options.progress) as bar:
        task = bar.add_task("Cascade on held-out images", total=len(images))
        for start in range(0, len(images), options.batch_size):
            run = cascade.run(images[start:start + options.batch_size], count_macs=True)
            predictions.append(run.logits.argmax(dim=-1).cpu())
            exits.append(run.exit_stage.cpu())
            gmacs.append(run.gmacs_per_image)
            bar.advance(task, len(run.exit_stage))
    return exit_figures(torch.cat(predictions), torch.cat(exits), torch.cat(gmacs), labels, reference.cpu(),
                        len(cascade.stages))


def single_models(cascade: CascadeModel, model: nn.Module, data: CascadeImages, reference: Tensor,
                  hold_table: StageTable, base_gmacs: float, options: EvalOptions) -> list[dict]:
    """Held-out figures of single models: each stage alone (from the cached outputs) and, with
    `options.frontier`, the FRONTIER schedules at the model's own size."""
    hold_reference, hold_labels = reference[data.hold_idx], data.labels_at(data.hold_idx)

    def row(family: str, name: str, gmacs: float, prediction: Tensor) -> dict:
        out = {"family": family, "name": name, "gmacs": round(gmacs, 4), "ratio": round(gmacs / base_gmacs, 4),
               "agreement": percent_equal(prediction, hold_reference)}
        if hold_labels is not None:
            out["top1"] = percent_equal(prediction, hold_labels)
        return out

    rows = [row("stage", f"stage {s + 1}: {describe_stage(plan)}", float(hold_table.gmacs[s].mean()),
                hold_table.prediction[s]) for s, plan in enumerate(cascade.plans)]
    if not options.frontier:
        return rows
    size = model_img_size(model)
    held = data.images_at(data.hold_idx)
    for plan in frontier_plans(len(model.blocks)):
        reduced = build_stages(model, [Plan(reductions=plan.reductions, img_size=size)])[0]
        with torch.inference_mode():
            logits = predict(Resized(reduced, size), held, batch_size=options.batch_size, progress=options.progress,
                             description=f"Single model: {plan.describe()}")
        rows.append(row(plan.method, plan.describe(), count_macs(reduced).gmacs, logits.argmax(dim=-1)))
    return rows


def compare(measured: dict, frontier: list[dict], labelled: bool) -> dict:
    """The cascade against the best single model that costs no more than it does (held-out)."""
    metric = "top1" if labelled else "agreement"
    affordable = [row for row in frontier if row["gmacs"] <= measured["gmacs"] + 1e-9]
    out = {"metric": metric, "cascade": measured[metric], "cascade_gmacs": measured["gmacs"]}
    if affordable:
        best = max(affordable, key=lambda row: (row[metric], -row["gmacs"]))
        out.update({"best_single": best["name"], "best_single_gmacs": best["gmacs"], "best_single_value": best[metric],
                    "margin": round(measured[metric] - best[metric], 2)})
    else:
        out["best_single"] = None
    return out
