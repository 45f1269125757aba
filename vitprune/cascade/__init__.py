"""DVT-style dynamic inference: a cascade of cheap-to-expensive stages on the same pretrained ViT.

Every stage is the same weights at some input size and reduction plan. An image runs the first
stage; when the stage's confidence (max softmax probability, or minus the entropy) reaches the
stage's threshold it exits with that answer, otherwise it goes on to the next stage; the last
stage always answers. Thresholds are calibrated so that the mean GMACs per image on calibration
images meets a budget with the best accuracy (DVT, NeurIPS 2021; training-free here).

    stages = parse_stages("112,160,224", depth=12, base_size=224, patch_size=16)
    cascade = build_cascade(base, stages, thresholds=[0.6, 0.5])
    logits = cascade(images)               # images preprocessed at cascade.input_size

Batched: the whole batch runs stage 1, the undecided images are gathered (boolean index) and
only they run stage 2, and so on; answers are scattered back in input order. A stage at another
input size than the batch gets the batch resized inside the cascade (bicubic, antialiased), so one
preprocessed tensor feeds every stage.

Modules: grammar (the stage list), exits (confidence and the one exit loop), model (CascadeModel),
thresholds (cached stage outputs, calibration to a budget), evaluation (held-out figures, single
models), artifact (the cascade folder), schema (cascade.json and the ONNX manifest checked field by
field when read), onnx_cascade (one graph per stage with their sha256, OnnxCascade), report.
"""
from __future__ import annotations

from vitprune.cascade.artifact import (
    CASCADE_FILE,
    CASCADE_FORMAT,
    cascade_metadata,
    load_cascade,
    read_cascade_metadata,
    save_cascade,
)
from vitprune.cascade.evaluation import (
    FRONTIER,
    CascadeImages,
    EvalOptions,
    Schedule,
    evaluate_cascade,
    frontier_plans,
)
from vitprune.cascade.exits import CRITERIA, CascadeRun, confidence, run_exits
from vitprune.cascade.grammar import STAGES_HELP, describe_stage, parse_stages
from vitprune.cascade.model import CascadeModel, Resized, build_cascade, build_stages
from vitprune.cascade.onnx_cascade import ONNX_MANIFEST, OnnxCascade, export_cascade_onnx
from vitprune.cascade.report import cascade_report, console_table, plot_curve, render_cascade_markdown
from vitprune.cascade.thresholds import (
    Calibration,
    StageTable,
    calibrate_thresholds,
    curve,
    evaluate,
    exit_histogram,
    simulate,
    stage_table,
)

__all__ = [
    "CascadeModel", "CascadeRun", "Calibration", "StageTable", "parse_stages", "describe_stage", "build_stages",
    "build_cascade", "confidence", "run_exits", "stage_table", "simulate", "calibrate_thresholds", "evaluate",
    "curve", "exit_histogram", "cascade_metadata", "save_cascade", "load_cascade", "read_cascade_metadata",
    "CASCADE_FILE", "CASCADE_FORMAT", "CRITERIA", "STAGES_HELP", "FRONTIER", "Schedule", "CascadeImages",
    "EvalOptions", "Resized", "evaluate_cascade", "frontier_plans", "cascade_report", "console_table", "plot_curve",
    "render_cascade_markdown", "export_cascade_onnx", "OnnxCascade", "ONNX_MANIFEST",
]
