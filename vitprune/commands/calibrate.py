"""`calibrate` as a library call: search the plan for a budget, measure it and its frontier on
held-out images, write the artifact."""
from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from vitprune import calibrate
from vitprune.artifact import model_identity, report_json
from vitprune.budget import Budget
from vitprune.checks import check_finite, check_whole
from vitprune.commands.common import check_device, check_memory, reference_section
from vitprune.commands.finetune import FinetuneRecipe, FinetuneRequest, before_after_table
from vitprune.data import check_labels, load_images, transform_for
from vitprune.errors import VitpruneError
from vitprune.evaluation import Evidence, compare
from vitprune.finetune import (
    CHECKPOINT_FILE,
    Attachment,
    FinetuneResult,
    TrainingImages,
    bound_settings,
    check_work_dir,
    distributed_job,
    fit,
    seed_everything,
    single_variant,
)
from vitprune.io import check_output_dir
from vitprune.patch import apply_plan, model_img_size, plan_of
from vitprune.plan import Plan
from vitprune.progress import progress_bar
from vitprune.runtime import Runtime
from vitprune.source import BaseModel, load_base
from vitprune.timm_datasets import DatasetOptions

__all__ = ["Budget", "CalibrateRequest", "FinetuneRecipe", "before_after_table", "CalibrateResult", "run_calibrate"]


@dataclass
class CalibrateRequest(DatasetOptions):
    """Everything `vitprune calibrate` takes; the same fields as its options."""

    model: str
    data: Path | str  # an image folder or a dataset timm reads (hfds/..., wds/..., .tar; bound it with limit)
    budget: Budget
    checkpoint: Path | None = None
    no_pretrained: bool = False
    img_size: int | None = None
    features: bool = False  # the classifier's pre-logits embedding (head removed): an embedding model
    img_sizes: list[int] | None = None  # None: the model's size and up to 3 smaller (calibrate.auto_sizes)
    limit: int | None = None
    holdout: float = 0.5
    seed: int = 0
    swap_split: bool = False  # calibrate on the held-out part and hold out the rest (2-fold cross-checks)
    objective: str = "auto"  # kl for a classifier, cosine for an embedding model (calibrate.resolve_objective)
    head_only: bool = True  # the head-only last block, where the model pools by class token
    protect: float | None = None  # tome protect weight; None: chosen among calibrate.PROTECT_WEIGHTS
    search_images: int = 128
    search: str = "evolutionary"  # calibrate.SEARCHES: evolutionary shapes, or counts learned by gradient
    refine_steps: int = 16
    gradient_steps: int = 60  # the gradient search's optimiser steps
    bench_repeats: int = 5
    workers: int = 2
    dtype: str = "float32"  # autocast precision of every evaluation and timing (vitprune.runtime)
    output: Path | None = None
    force: bool = False
    progress: bool = True
    # then fine-tune the chosen plan on the calibration images (None: training-free); resume an interrupted run
    finetune: FinetuneRecipe | None = None
    device: str = "cpu"  # where the fine-tuning stage runs (cpu, cuda, cuda:N); the search runs on the CPU
    resume: bool = False

    def check(self) -> None:
        """Every setting, before any model is built or image read."""
        Runtime(dtype=self.dtype).check()
        self._check_finetune()
        if not isinstance(self.budget, Budget):
            raise VitpruneError(f"budget must be a vitprune.budget.Budget, got {self.budget!r}", param="budget")
        self.check_data_options(self.data)
        if self.objective not in (*calibrate.OBJECTIVES, calibrate.AUTO_OBJECTIVE):
            raise VitpruneError(f"objective must be one of {', '.join(calibrate.OBJECTIVES)} or "
                                f"{calibrate.AUTO_OBJECTIVE}, got {self.objective!r}", param="objective")
        check_finite(self.holdout, "holdout", low=0, high=1, low_open=True, high_open=True, rule="a fraction in (0, 1)")
        check_whole(self.search_images, "search_images", 1)
        check_whole(self.refine_steps, "refine_steps", 0)
        check_whole(self.gradient_steps, "gradient_steps", 1)
        if self.search not in calibrate.SEARCHES:
            raise VitpruneError(f"search must be one of {', '.join(calibrate.SEARCHES)}, got {self.search!r}",
                                param="search")
        check_whole(self.bench_repeats, "bench_repeats", 1)
        check_whole(self.workers, "workers", 0)
        if self.limit is not None:
            check_whole(self.limit, "limit", 1)
        if self.protect is not None:
            check_finite(self.protect, "protect", low=0, rule="a finite weight >= 0")
        if self.img_sizes is not None:
            for size in self.img_sizes:
                check_whole(size, "img_sizes", 1)
        if self.output is not None and self.finetune is None:
            check_output_dir(self.output, self.force)

    def _check_finetune(self) -> None:
        if self.finetune is None:
            if self.resume:
                raise VitpruneError("resume continues an interrupted fine-tuning stage: give finetune", param="resume")
            if self.device != "cpu":
                raise VitpruneError(f"device {self.device} is where the fine-tuning stage runs (the search runs on the "
                                    "CPU): give finetune", param=("device", "finetune"))
            return
        check_device(self.device)
        if not isinstance(self.finetune, FinetuneRecipe):
            raise VitpruneError(f"finetune must be a vitprune.commands.finetune.FinetuneRecipe, got {self.finetune!r}",
                                param="finetune")
        self.finetune.check_recipe()
        if self.finetune.dtype != "float32" and not self.device.startswith("cuda"):
            raise VitpruneError(f"the fine-tuning dtype {self.finetune.dtype} (mixed precision) is for CUDA GPUs; "
                                "give device cuda, or fine-tune on the CPU in float32", param=("finetune", "device"))
        if self.features:
            raise VitpruneError("finetune distils a classifier's logits; features (an embedding model) cannot be "
                                "fine-tuned", param="features")
        if self.resume and self.output is None:
            raise VitpruneError("resume continues the run writing to output: give an output", param="resume")


@dataclass
class CalibrateResult:
    plan: Plan
    reduced: nn.Module
    report: dict
    calibration_files: list[Path] = field(default_factory=list)
    holdout_files: list[Path] = field(default_factory=list)
    frontier: list[Plan] = field(default_factory=list)  # the frontier's plans (as scored, input size named)


def run_calibrate(request: CalibrateRequest) -> CalibrateResult:
    """Search the plan for the budget, measure it and its frontier on held-out images, write the artifact."""
    request.check()
    if request.finetune is not None:
        return _calibrate_and_finetune(request)
    with Runtime(dtype=request.dtype).autocast():
        return _calibrate(request)


def _calibrate(request: CalibrateRequest) -> CalibrateResult:
    base = load_base(request.model, request.checkpoint, request.no_pretrained, request.img_size, request.features)
    check_memory(base.model, "cpu", batch=request.budget.batch)  # the batch latencies are timed at
    started = time.perf_counter()
    setup = calibrate.prepare(base.model.eval(), request.img_sizes, request.head_only, request.budget)
    objective = calibrate.resolve_objective(request.objective, setup.embedding)
    sets = calibrate.split_images(request.data, limit=request.limit, holdout=request.holdout, seed=request.seed,
                                  swap_split=request.swap_split, options=request)
    for part in sets:
        check_labels(part, setup.base_model.num_classes)
    calibrate.check_objective(objective, sets[0], request.data)
    images = calibrate.load_split(setup, sets, workers=request.workers, progress=request.progress)
    evals = calibrate.make_evaluators(setup, images, request.search_images, request.seed)
    rng = random.Random(request.seed)
    with progress_bar(request.progress) as bar:
        search = calibrate.Search(setup, evals, objective, request.budget, bar)
        protect_trials = calibrate.protect_weight(search, request.protect)
        sensitivity, shapes, ranked, trace = _searched_shapes(search, request, rng)
        top = calibrate.best_distinct(ranked)
        ladder = calibrate.frontier_ladder(search, *calibrate.ladder_shapes(search, top, ranked, shapes), top)
        calibrate.score_finalists(search, ladder, top)
        frontier, chosen = calibrate.guard_frontier(search, ladder, top)
        found = calibrate.Found(protect_trials, sensitivity, frontier, chosen, time.perf_counter() - started,
                                request.search, trace)
        held = calibrate.measure_held_out(search, frontier, chosen, request.bench_repeats)
    info = calibrate.RunInfo(data=request.data, seed=request.seed, swap_split=request.swap_split,
                             holdout=request.holdout, protect_given=request.protect is not None)
    written = calibrate.written_plan(calibrate.choose(search, frontier, chosen, held.ms), search, images, info)
    reduced = apply_plan(copy.deepcopy(setup.base_model), written)
    report = calibrate.calibration_report(model_identity(reduced, base.info), written, search, found, held, images,
                                          info)
    report["runtime"] = Runtime(dtype=request.dtype).to_dict()
    if base.teacher_record is not None:
        _judge_against_teacher(report, base, reduced, images, setup.base_size)
    if request.output is not None:
        calibrate.write_calibration(request.output, reduced, *base.info_for(reduced), report, request.force)
    return CalibrateResult(plan=written, reduced=reduced, report=report, calibration_files=images.calibration_set.files,
                           holdout_files=images.holdout_set.files, frontier=found.frontier)


TEACHER_FIGURES = ("top1_base", "top5_base", "top1", "top5", "top1_drop", "top1_drop_ci95", "top5_drop",
                   "top5_drop_ci95", "agreement", "agreement_ci95", "kl", "kl_ci95")


def _judge_against_teacher(report: dict, base: BaseModel, reduced: nn.Module, images: calibrate.ImageSplit,
                           base_size: int) -> None:
    """A fine-tuned artifact calibrated: the chosen plan's held-out figures against the teacher it was
    fine-tuned from, the fine-tuned weights unreduced as a second baseline (`reference_section`). The
    search and the frontier stay relative to the weights being reduced, and the report says so."""
    teacher_images = images.holdout_images[base_size]
    if base.teacher is not None and model_img_size(base.teacher) != base_size:  # a teacher at its own size
        teacher_images = load_images(images.holdout_set, transform_for(base.teacher), progress=False)[0]
    unreduced = Evidence(images=images.holdout_images[base_size], labels=images.holdout_labels,
                         base_images=teacher_images, progress=False)
    section = reference_section(base, unreduced)
    if base.teacher is not None:
        measured = compare(base.teacher, reduced, replace(unreduced, images=images.holdout_images[model_img_size(reduced)]))
        report.update({key: measured[key] for key in TEACHER_FIGURES if key in measured})
    section["frontier_against"] = "the fine-tuned weights unreduced (the model the search reduces)"
    report["reference"] = section


def _searched_shapes(search: calibrate.Search, request: CalibrateRequest, rng: random.Random) -> tuple:
    """(sensitivity, the shapes, the shapes ranked at the budget, the gradient trace), by the search asked for."""
    if request.search == "gradient":
        shapes, trace = calibrate.gradient_search(search, request.gradient_steps, request.seed)
        return [], shapes, calibrate.rank_shapes(search, shapes), trace
    setup = search.setup
    sensitivity = calibrate.sensitivity_probe(search)
    shapes = calibrate.make_shapes(sensitivity, setup.geometry, setup.block_methods, setup.sizes, setup.per_image)
    return sensitivity, shapes, calibrate.refine(search, calibrate.rank_shapes(search, shapes), request.refine_steps,
                                                 rng), []


# -- calibrate, then fine-tune the chosen plan: one run, one artifact ---------------------------------

SEARCH_FILE = "calibration.json"  # the search's result in the work folder, read back by a resumed run
SEARCH_SETTINGS = ("budget", "img_sizes", "limit", "holdout", "seed", "swap_split", "objective", "head_only",
                   "protect", "search_images", "search", "refine_steps", "gradient_steps")


def _calibrate_and_finetune(request: CalibrateRequest) -> CalibrateResult:
    """Search the plan (or read it back when resuming), distil it from the unreduced model on the
    calibration images, and judge it on the held-out ones against that model: one artifact."""
    work = _work_dir(request)
    settings = _search_settings(request)
    searched = _searched_again(work, settings) if request.resume else _search_only(request)
    calibration_set, holdout_set = calibrate.split_images(request.data, limit=request.limit, holdout=request.holdout,
                                                          seed=request.seed, swap_split=request.swap_split,
                                                          options=request)[1:]
    images = TrainingImages(calibration_set, holdout_set, f"{request.data} (held-out part)")
    tuned = _finetune_plan(request, searched, settings, images, work)
    return CalibrateResult(plan=plan_of(tuned.model), reduced=tuned.model, report=tuned.report,
                           calibration_files=calibration_set.files, holdout_files=holdout_set.files,
                           frontier=searched.frontier)


@dataclass
class Searched:
    """What the fine-tuning stage takes from the search: the chosen plan, calibrate's report, the frontier."""

    plan: Plan
    report: dict
    frontier: list[Plan] = field(default_factory=list)  # not kept for a resumed run


def _work_dir(request: CalibrateRequest) -> Path | None:
    """The run's work folder, checked: a resumed run needs the search's result there (and a checkpoint
    once an epoch is done)."""
    return check_work_dir(request.output, force=request.force, resume=request.resume, kept=(SEARCH_FILE,))


def _search_settings(request: CalibrateRequest) -> dict:
    """The settings the search's result is bound to (a resumed run must give the same)."""
    return bound_settings({name: getattr(request, name) for name in SEARCH_SETTINGS} | {
        "budget": asdict(request.budget), "model": request.model, "checkpoint": request.checkpoint,
        "data": request.data})


def _search_only(request: CalibrateRequest) -> Searched:
    with Runtime(dtype=request.dtype).autocast():
        result = _calibrate(replace(request, output=None, finetune=None, resume=False))
    return Searched(result.plan, result.report, result.frontier)


def _searched_again(work: Path, settings: dict) -> Searched:
    """The search's result that the interrupted run kept in its work folder, made with `settings`."""
    try:
        saved = json.loads((work / SEARCH_FILE).read_text())
        searched = Searched(Plan.from_dict(saved["plan"], source=str(work / SEARCH_FILE)), saved["report"])
        kept = saved["settings"]
    except (OSError, ValueError, KeyError) as error:
        raise VitpruneError(f"resume: cannot read the search's result in {work / SEARCH_FILE} "
                            f"({str(error).splitlines()[0]}); start over with force", param="resume") from None
    changed = sorted(key for key in kept.keys() | settings.keys() if kept.get(key) != settings.get(key))
    if changed:
        raise VitpruneError(f"other settings ({', '.join(changed)}) than the search in {work} was made with; run "
                            "with those, or start over (force without resume)", param=(*changed, "force", "resume"))
    return searched


def _finetune_plan(request: CalibrateRequest, searched: Searched, settings: dict, images: TrainingImages,
                   work: Path | None) -> FinetuneResult:
    """The chosen plan distilled on the calibration images and validated on the held-out ones; the
    artifact (with the calibration's report and pareto.png) is written once, at the end."""
    finetuning = FinetuneRequest(
        model=request.model, checkpoint=request.checkpoint, no_pretrained=request.no_pretrained,
        img_size=request.img_size, data=request.data, split=request.split, label_field=request.label_field,
        image_field=request.image_field, limit=request.limit, seed=request.seed, workers=request.workers,
        output=request.output, force=request.force, progress=request.progress, device=request.device,
        **request.finetune.recipe(),
        resume=request.resume and work is not None and (work / CHECKPOINT_FILE).is_file())  # else: epoch 1
    config = finetuning.config()
    kept = {"plan": searched.plan.to_dict(), "report": searched.report, "settings": settings}
    attachment = Attachment(work_files={SEARCH_FILE: report_json(kept).encode()},
                            report={"calibration": searched.report["calibration"]},
                            markdown=_search_markdown(searched.report),
                            files={"pareto.png": calibrate.pareto_png(searched.report)})
    config = replace(config, settings={**config.settings, "calibrate": settings}, attachment=attachment)
    with distributed_job(request.device) as job:
        seed_everything(request.seed)
        base = load_base(request.model, request.checkpoint, request.no_pretrained, request.img_size)
        return fit(config, base, [single_variant(searched.plan, base.model)], images, job, work)


def _search_markdown(report: dict) -> str:
    """The calibration's report.md, as the part of the fine-tuned artifact's report before fine-tuning."""
    text = calibrate.render_calibration_markdown(report)
    return "\n" + text.replace("# vitprune calibrate", "# Before fine-tuning: the search (vitprune calibrate)", 1)
