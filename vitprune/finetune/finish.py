"""Finish: every variant's GMACs and before/after figures, the report, and (rank 0) the artifact."""
from __future__ import annotations

import shutil
from dataclasses import replace

from torch import nn

from vitprune.artifact import TEACHER_KEY, model_identity, versions, write_artifact
from vitprune.evaluation import Evidence, compare
from vitprune.finetune.checkpoint import CHECKPOINT_FILE
from vitprune.finetune.report import (
    METRICS_FILE,
    PLOT_FILE,
    finetune_markdown,
    metrics_csv,
    supervit_notes,
    teacher_entry,
    training_figure,
    variant_entry,
)
from vitprune.finetune.state import FinetuneResult, RunState
from vitprune.finetune.supervit import served_model
from vitprune.patch import apply_plan, set_dynamic_img_size
from vitprune.plan import Plan
from vitprune.plots import png_bytes
from vitprune.report import make_report, render_markdown
from vitprune.teacher import TEACHER_FILE

UNREPORTED_SETTINGS = ("model", "data", "val", "checkpoint", "plan_file")  # the report names them elsewhere


def finish(run: RunState) -> FinetuneResult:
    """The trained weights served at the default variant; rank 0 reports and writes the artifact."""
    final = run.training.shipped
    served = served_model(final, run.variants[0].plan).cpu()
    report = _publish(run, final, served) if run.job.is_main else None
    run.job.barrier()
    set_dynamic_img_size(run.student, False)
    return FinetuneResult(model=served, report=report, metrics=run.history.rows, output=run.config.output.output,
                          rank=run.job.rank)


def _publish(run: RunState, final: nn.Module, served: nn.Module) -> dict:
    """Rank 0: measure `served` against the teacher, give it the annotated plan, write the artifact."""
    entries = [variant_entry(final, variant, run.validation, run.history) for variant in run.variants]
    teacher = teacher_entry(run.teacher, run.validation)
    section = _finetune_section(run, entries, teacher)
    plan = _annotated_plan(run, entries, teacher)
    apply_plan(served, plan)
    measured = compare(run.teacher, served.to(run.job.device), _evidence(run))
    served.cpu()
    report = make_report(model_identity(served, run.base.info), plan, measured, versions())
    report["finetune"] = section
    record, teacher_tensors = run.base.teacher_for(served)
    report["reference"] = {"compared_with": "teacher", "teacher": record}
    report.update(run.config.attachment.report)
    if run.config.output.output is not None:
        _write(run, served, report, record, teacher_tensors)
    return report


def _finetune_section(run: RunState, entries: list[dict], teacher: dict) -> dict:
    """report.json's "finetune": what was trained on, how long, every variant before and after."""
    validation = run.validation
    return {
        "supervit": run.config.supervit, "epochs": run.config.train.epochs, "train_images": len(run.images.train),
        "train_labelled": run.images.labelled,
        "val_images": validation.n_images if validation is not None else 0,
        "val_data": validation.path if validation is not None else None,
        "world_size": run.job.world_size, "train_seconds": round(run.history.train_seconds(), 1),
        "teacher": teacher, "variants": entries,
        "settings": {key: value for key, value in run.config.settings.items() if key not in UNREPORTED_SETTINGS},
    }


def _annotated_plan(run: RunState, entries: list[dict], teacher: dict) -> Plan:
    """The default variant's plan with the fine-tuning (and SuperViT's configurations) in its notes."""
    plan = run.variants[0].plan
    notes = dict(plan.notes)
    notes["finetune"] = {"epochs": run.config.train.epochs, "teacher": teacher, "train_images": len(run.images.train)}
    if run.config.supervit:
        notes["supervit"] = supervit_notes(run.variants, entries)
    return replace(plan, notes=notes)


def _evidence(run: RunState) -> Evidence:
    """What `compare` measures the served model on: the validation images at its and the teacher's size."""
    evidence = Evidence(device=str(run.job.device), batch_size=run.config.data.eval_batch_size,
                        progress=run.config.output.progress)
    validation = run.validation
    if validation is not None:
        evidence.images = validation.images[run.variants[0].img_size]
        evidence.labels = validation.labels
        evidence.base_images = validation.images[validation.teacher_size]
        evidence.data_path = validation.path
    return evidence


def _write(run: RunState, served: nn.Module, report: dict, teacher: dict, teacher_tensors: bytes) -> None:
    """The artifact (with metrics.csv, training.png, the teacher's tensors and, if asked, the checkpoint);
    the work folder goes."""
    output, work = run.config.output, run.work
    extra = {METRICS_FILE: metrics_csv(run.history.rows).encode(),
             PLOT_FILE: png_bytes(training_figure(run.history, run.variants)), TEACHER_FILE: teacher_tensors,
             **run.config.attachment.files}
    if output.keep_checkpoint and work is not None and (work / CHECKPOINT_FILE).is_file():
        extra[CHECKPOINT_FILE] = (work / CHECKPOINT_FILE).read_bytes()
    report_md = (render_markdown(report, "vitprune finetune report") + finetune_markdown(report["finetune"])
                 + run.config.attachment.markdown)
    write_artifact(output.output, served, {**run.base.info, TEACHER_KEY: teacher}, report=report,
                   report_md=report_md, force=output.force, extra_files=extra)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
