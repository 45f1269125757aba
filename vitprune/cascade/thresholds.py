"""Thresholds from cached stage outputs: run every stage once, then any threshold set is tensor ops.

`stage_table` caches every stage's confidence, prediction and cost per image; `simulate` replays
the exit rule for many threshold sets at once; `calibrate_thresholds` picks the set with the most
right answers within a GMACs budget (DVT's procedure: how many images leave at each stage);
`evaluate` and `curve` give the figures of chosen sets.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.cascade.exits import confidence
from vitprune.cascade.grammar import describe_stage
from vitprune.cascade.model import CascadeModel, Resized
from vitprune.data import predict, resize_images
from vitprune.errors import VitpruneError
from vitprune.metrics import match_percent

MAX_GRID = 40_000  # threshold sets in the first, full grid
CHUNK = 2_048
ASCENT_ROUNDS = 4
CURVE_STEP = 0.05  # budget ratios of the accuracy-vs-budget curve


@dataclass
class StageTable:
    """Every stage's answer for every image, computed once; a threshold set is then pure tensor ops."""

    confidence: Tensor  # (S, N) float
    prediction: Tensor  # (S, N) long
    gmacs: Tensor  # (S, N) float64, GMACs of running stage s on image n

    def subset(self, index: Tensor) -> StageTable:
        return StageTable(self.confidence[:, index], self.prediction[:, index], self.gmacs[:, index])

    @property
    def num_stages(self) -> int:
        return self.confidence.shape[0]


@torch.inference_mode()
def stage_table(cascade: CascadeModel, images: Tensor, *, batch_size: int = 64, progress: bool = True) -> StageTable:
    """Run every stage on every image (resized from `images` as the cascade does)."""
    confidences, predictions, costs = [], [], []
    for index, (stage, size, plan) in enumerate(zip(cascade.stages, cascade.stage_sizes, cascade.plans, strict=True)):
        logits = predict(Resized(stage, size), images, batch_size=batch_size, progress=progress,
                         description=f"Stage {index + 1} ({describe_stage(plan)})")
        confidences.append(confidence(logits, cascade.criterion))
        predictions.append(logits.argmax(dim=-1))
        costs.append(_stage_costs(cascade, index, images, batch_size))
    return StageTable(torch.stack(confidences), torch.stack(predictions), torch.stack(costs))


def _stage_costs(cascade: CascadeModel, index: int, images: Tensor, batch_size: int) -> Tensor:
    """GMACs of stage `index` per image: counted on the images when they vary per image."""
    if not cascade.plans[index].varies_per_image:
        return torch.full((len(images),), cascade.stage_gmacs[index], dtype=torch.float64)
    device = next(cascade.stages[index].parameters()).device
    size = cascade.stage_sizes[index]
    return torch.cat([cascade.stage_gmacs_per_image(index, resize_images(images[i:i + batch_size].to(device), size))
                      for i in range(0, len(images), batch_size)])


def simulate(table: StageTable, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Exit stage (K, N) and GMACs per image (K, N) for K threshold sets (K, S-1), without running a model."""
    num_stages, num_images = table.confidence.shape
    thresholds = thresholds.reshape(-1, num_stages - 1)
    count = thresholds.shape[0]
    exit_stage = torch.full((count, num_images), num_stages - 1, dtype=torch.long)
    undecided = torch.ones((count, num_images), dtype=torch.bool)
    for index in range(num_stages - 1):
        leaving = undecided & (table.confidence[index][None, :] >= thresholds[:, index:index + 1])
        exit_stage.masked_fill_(leaving, index)
        undecided &= ~leaving
    spent = table.gmacs.cumsum(dim=0)  # an image exiting at stage s ran stages 0..s
    return exit_stage, spent.gather(0, exit_stage)


def json_threshold(threshold: float | None) -> float | None:
    """+inf (nobody leaves) and the last stage's missing threshold are stored as null."""
    return threshold if threshold is not None and math.isfinite(threshold) else None


def threshold_entry(threshold: float | None) -> dict:
    """A stage's threshold as cascade.json / cascade_onnx.json store it (see `threshold_of`)."""
    return {"threshold": json_threshold(threshold), "exit_always": threshold is not None and threshold == -math.inf}


def threshold_of(entry: dict) -> float:
    """The threshold of a stored stage entry: -inf (everybody leaves), +inf (null: nobody) or the number."""
    if entry.get("exit_always"):
        return -math.inf
    return math.inf if entry["threshold"] is None else float(entry["threshold"])


@dataclass
class Calibration:
    thresholds: list[float]
    budget_gmacs: float
    mean_gmacs: float  # on the calibration images
    accuracy: float  # percent of the calibration images answered right (labels or base agreement)
    exit_fraction: list[float]
    searched: int  # threshold sets evaluated

    def to_dict(self) -> dict:
        return {"thresholds": [json_threshold(t) for t in self.thresholds], "budget_gmacs": round(self.budget_gmacs, 4),
                "mean_gmacs": round(self.mean_gmacs, 4), "accuracy": round(self.accuracy, 2),
                "exit_fraction": [round(f, 4) for f in self.exit_fraction], "searched": self.searched}


def calibrate_thresholds(table: StageTable, correct_targets: Tensor, budget_gmacs: float) -> Calibration:
    """Thresholds with the most right answers among those whose mean GMACs <= `budget_gmacs`.

    The paper's procedure: choose how many images leave at each stage, then read the thresholds off
    the sorted confidences. Candidates for stage s are its sorted confidences on the calibration
    images (a threshold equal to the k-th largest lets k images leave), plus +inf (none leave).
    A grid over all free thresholds (as fine as MAX_GRID allows: every candidate for 2 stages,
    200 per stage for 3) is followed by coordinate ascent over every candidate of one stage at a time.
    `correct_targets`: (N,) the labels, or the base model's predictions (agreement).
    """
    num_stages, num_images = table.confidence.shape
    right = table.prediction == correct_targets[None, :]  # (S, N)
    floor_gmacs = float(table.gmacs[0].mean())
    if budget_gmacs < floor_gmacs - 1e-9:
        raise VitpruneError(f"budget {budget_gmacs:.3f} GMACs is below the first stage's own cost "
                            f"({floor_gmacs:.3f} GMACs, every image runs it); raise the budget or use a cheaper "
                            "first stage")
    candidates = [torch.cat([table.confidence[s].unique(), torch.tensor([math.inf])]) for s in range(num_stages - 1)]
    per_stage = max(2, int(MAX_GRID ** (1 / (num_stages - 1))))
    grids = [_spread(c, per_stage) for c in candidates]
    best = _search(table, right, budget_gmacs, torch.cartesian_prod(*grids).reshape(-1, num_stages - 1), None)
    best, ascended = _ascend(table, right, budget_gmacs, candidates, best)
    thresholds, correct, _ = best
    exit_stage, spent = simulate(table, thresholds)
    counts = torch.bincount(exit_stage[0], minlength=num_stages).double() / num_images
    return Calibration(thresholds=[float(t) for t in thresholds], budget_gmacs=budget_gmacs,
                       mean_gmacs=float(spent[0].mean()), accuracy=100.0 * correct / num_images,
                       exit_fraction=counts.tolist(), searched=math.prod(len(g) for g in grids) + ascended)


def _ascend(table: StageTable, right: Tensor, budget: float, candidates: list[Tensor], best) -> tuple[tuple, int]:
    """Coordinate ascent from `best`: one stage at a time over all its candidates; (best, sets tried)."""
    searched = 0
    for _ in range(ASCENT_ROUNDS):
        improved = False
        for s, stage_candidates in enumerate(candidates):
            trial = best[0].repeat(len(stage_candidates), 1)
            trial[:, s] = stage_candidates
            searched += len(trial)
            found = _search(table, right, budget, trial, best)
            if found is not best:
                best, improved = found, True
        if not improved:
            break
    return best, searched


def _spread(values: Tensor, count: int) -> Tensor:
    """At most `count` of the sorted `values`, evenly spaced by rank, always keeping both ends."""
    if len(values) <= count:
        return values
    picks = torch.linspace(0, len(values) - 1, count).round().long().unique()
    return values[picks]


def _search(table: StageTable, right: Tensor, budget: float, trials: Tensor, best):
    """The best (thresholds, right answers, mean GMACs) among `trials` and `best`: feasible first,
    then most right answers, then fewest GMACs."""
    for start in range(0, len(trials), CHUNK):
        chunk = trials[start:start + CHUNK]
        exit_stage, spent = simulate(table, chunk)
        correct = right.gather(0, exit_stage).sum(dim=1)
        cost = spent.mean(dim=1)
        feasible = cost <= budget + 1e-9
        if not feasible.any():
            continue
        score = torch.where(feasible, correct.double(), -1.0)
        tied = (score == score.max()).nonzero().squeeze(1)
        pick = int(tied[cost[tied].argmin()])
        candidate = (chunk[pick].clone(), int(correct[pick]), float(cost[pick]))
        if best is None or (candidate[1], -candidate[2]) > (best[1], -best[2]):
            best = candidate
    if best is None:
        raise VitpruneError(f"no thresholds meet the budget of {budget:.3f} GMACs")
    return best


def percent_equal(predicted: Tensor, target: Tensor) -> float:
    """`vitprune.metrics.match_percent`, rounded as the reports show it."""
    return round(match_percent(predicted, target), 2)


def evaluate(table: StageTable, thresholds: Sequence[float], labels: Tensor | None, reference: Tensor) -> dict:
    """Figures of one threshold set on cached stage outputs: mean GMACs, top-1/agreement, exits."""
    exit_stage, spent = simulate(table, torch.tensor([thresholds], dtype=torch.float32))
    exit_stage, spent = exit_stage[0], spent[0]
    prediction = table.prediction.gather(0, exit_stage[None, :])[0]
    return exit_figures(prediction, exit_stage, spent, labels, reference, table.num_stages)


def exit_figures(prediction: Tensor, exit_stage: Tensor, spent: Tensor, labels: Tensor | None, reference: Tensor,
                 num_stages: int) -> dict:
    """n_images, mean GMACs, agreement (and top-1 with labels) and the exit histogram of a cascade's answers."""
    out = {"n_images": int(len(prediction)), "gmacs": round(float(spent.mean()), 4),
           "agreement": percent_equal(prediction, reference)}
    if labels is not None:
        out["top1"] = percent_equal(prediction, labels)
    out["exits"] = exit_histogram(exit_stage, num_stages)
    return out


def exit_histogram(exit_stage: Tensor, num_stages: int) -> list[dict]:
    counts = torch.bincount(exit_stage.cpu(), minlength=num_stages)
    total = max(int(counts.sum()), 1)
    return [{"stage": s + 1, "images": int(counts[s]), "percent": round(100.0 * int(counts[s]) / total, 2)}
            for s in range(num_stages)]


def curve(table: StageTable, calib_idx: Tensor, hold_idx: Tensor, targets: Tensor, labels: Tensor | None,
          reference: Tensor, base_gmacs: float, budget: float) -> list[dict]:
    """Accuracy vs budget: thresholds calibrated per budget, figures on the held-out images."""
    calib_table, hold_table = table.subset(calib_idx), table.subset(hold_idx)
    first_stage = float(calib_table.gmacs[0].mean())
    hold_labels = labels[hold_idx] if labels is not None else None
    rows = []
    for ratio in _curve_ratios(calib_table, base_gmacs, budget):
        calibration = calibrate_thresholds(calib_table, targets[calib_idx], max(ratio * base_gmacs, first_stage))
        held = evaluate(hold_table, calibration.thresholds, hold_labels, reference[hold_idx])
        rows.append({"budget_ratio": ratio, "budget_gmacs": round(ratio * base_gmacs, 4),
                     "thresholds": [json_threshold(round(t, 5)) for t in calibration.thresholds],
                     "calibration_gmacs": round(calibration.mean_gmacs, 4),
                     "calibration_accuracy": round(calibration.accuracy, 2),
                     "holdout_gmacs": held["gmacs"], "holdout_top1": held.get("top1"),
                     "holdout_agreement": held["agreement"],
                     "holdout_exit_percent": [e["percent"] for e in held["exits"]]})
    return rows


def _curve_ratios(calib_table: StageTable, base_gmacs: float, budget: float) -> list[float]:
    """Budget ratios every CURVE_STEP from the first stage's cost to the whole cascade's (at most 1),
    plus the first stage's own ratio and the budget's."""
    floor = float(calib_table.gmacs[0].mean()) / base_gmacs
    ceiling = float(calib_table.gmacs.sum(dim=0).mean()) / base_gmacs
    ratios = {round(CURVE_STEP * k, 4) for k in range(math.ceil(floor / CURVE_STEP - 1e-9),
                                                      int(min(ceiling, 1.0) / CURVE_STEP + 1e-9) + 1)}
    return sorted(r for r in ratios | {round(floor, 4), round(budget / base_gmacs, 4)} if r >= floor - 1e-9)
