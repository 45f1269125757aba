"""Calibrate: find the reduction plan that fits a budget best, on the user's own images.

The search never trains anything; it scores candidate plans by how closely the reduced model
follows the unreduced one on calibration images, and reports every figure on held-out images.
The calibration images are split once more: the search runs on a subset of them, and its finalists
are re-ranked and guarded on the rest (the validation images), which it did not select them on.

    policy.py    the search policy per method: which it searches, how it sets an amount at a block
    prepare.py   the frame: input sizes, models per size, methods, geometry, budget target, floor
    images.py    the split, images per size, base logits, the three evaluators
    evaluate.py  Score, TokenCache, Evaluator, MacsCounter: plans scored with caches
    shapes.py    Shape, AtsShape, shape_plan, fit_to_budget, make_shapes, mutate, reference_plans
    search.py    protect weight, sensitivity, ranking, refinement, ladder, guard, choice
    gradient.py  the gradient rate search: per-block counts learned on the frozen model (DiffRate-style)
    measure.py   held-out scores and latency of the frontier, the chosen plan and the references
    report.py    report.json's calibration section, report.md, pareto.png

The command (`vitprune.commands.calibrate.run_calibrate`) calls these steps in order.
"""
from __future__ import annotations

from vitprune.calibrate.evaluate import (
    AUTO_OBJECTIVE,
    EMBEDDING_OBJECTIVES,
    OBJECTIVE_TEXT,
    OBJECTIVES,
    Evaluator,
    MacsCounter,
    Score,
    TokenCache,
    distinct,
    plan_key,
    resolve_objective,
)
from vitprune.calibrate.gradient import gradient_search, learn_rates, learned_shape
from vitprune.calibrate.images import (
    MIN_VALIDATION_IMAGES,
    Evaluators,
    ImageSplit,
    check_objective,
    load_split,
    make_evaluators,
    split_images,
)
from vitprune.calibrate.measure import HeldOut, measure_held_out, sized
from vitprune.calibrate.prepare import Setup, prepare
from vitprune.calibrate.report import (
    Rows,
    RunInfo,
    calibration_report,
    calibration_section,
    measured_figures,
    pareto_png,
    render_calibration_markdown,
    write_calibration,
    written_plan,
)
from vitprune.calibrate.search import (
    GUARD_Z,
    PROTECT_WEIGHTS,
    SEARCHES,
    Found,
    Search,
    best_distinct,
    choose,
    frontier_ladder,
    guard_frontier,
    ladder_shapes,
    pareto_mask,
    protect_weight,
    rank_shapes,
    refine,
    score_finalists,
    sensitivity_probe,
)
from vitprune.calibrate.shapes import (
    AtsShape,
    Geometry,
    Shape,
    ats_plan,
    auto_sizes,
    fit_to_budget,
    make_shapes,
    mutate,
    reference_plans,
    shape_plan,
)

__all__ = [
    "AUTO_OBJECTIVE", "EMBEDDING_OBJECTIVES", "GUARD_Z", "MIN_VALIDATION_IMAGES", "OBJECTIVES", "OBJECTIVE_TEXT", "PROTECT_WEIGHTS", "SEARCHES", "AtsShape", "Evaluator",
    "Evaluators", "Found", "Geometry", "HeldOut", "ImageSplit", "MacsCounter", "Rows", "RunInfo", "Score", "Search",
    "Setup", "Shape", "TokenCache", "ats_plan", "auto_sizes", "best_distinct", "calibration_report",
    "calibration_section", "check_objective", "choose", "distinct", "fit_to_budget", "frontier_ladder", "gradient_search", "guard_frontier", "ladder_shapes", "learn_rates", "learned_shape",
    "load_split", "make_evaluators", "make_shapes", "measure_held_out", "measured_figures", "mutate", "pareto_mask",
    "pareto_png", "plan_key", "prepare", "protect_weight", "rank_shapes", "reference_plans", "refine",
    "render_calibration_markdown", "resolve_objective", "score_finalists", "sensitivity_probe", "shape_plan", "sized", "split_images",
    "write_calibration", "written_plan",
]
