"""A run in the shape of timm's train script: setup -> (train_one_epoch -> validate -> checkpoint)
per epoch -> finish (report, artifact).

Runs as one process or unchanged under `torchrun` (DDP, one process per GPU): every rank trains,
rank 0 validates and writes while the others wait. A run that fails before its first checkpoint
removes the work folder it made; after one, the error says how to resume (`WorkFolder`).
"""
from __future__ import annotations

from pathlib import Path

from vitprune.finetune.checkpoint import CHECKPOINT_FILE, Checkpoint, WorkFolder
from vitprune.finetune.data import TrainingImages
from vitprune.finetune.distributed import Distributed
from vitprune.finetune.finish import finish
from vitprune.finetune.report import METRICS_FILE, PLOT_FILE, log_epoch, plot_training, write_metrics_csv
from vitprune.finetune.setup import setup
from vitprune.finetune.state import FinetuneConfig, FinetuneResult, RunState
from vitprune.finetune.supervit import Variant
from vitprune.finetune.train import EpochStats, train_one_epoch
from vitprune.finetune.validate import validate
from vitprune.source import BaseModel


def fit(config: FinetuneConfig, base: BaseModel, variants: list[Variant], images: TrainingImages,
        job: Distributed, work: Path | None) -> FinetuneResult:
    """Train the student running `variants` by distillation from `base.model`; report and write on rank 0."""
    run = setup(config, base, variants, images, job, work)
    folder = WorkFolder(work if job.is_main else None, config.train.epochs, saved=run.start_epoch)
    with folder.guard():
        if not config.output.resume:
            folder.start()  # force: a fresh start
            folder.write(config.attachment.work_files)
        else:
            folder.resume()
        if run.start_epoch == 0 and job.is_main:
            _record(run, {"epoch": 0})
        job.barrier()
        for epoch in range(run.start_epoch, config.train.epochs):
            stats = train_one_epoch(run.training, epoch, run.history.steps)
            if job.is_main:
                _end_epoch(run, epoch, stats, folder)
            job.barrier()
        return finish(run)


def _end_epoch(run: RunState, epoch: int, stats: EpochStats, folder: WorkFolder) -> None:
    """Rank 0: the epoch's row (training figures, validation), the checkpoint, metrics.csv and training.png."""
    run.student.eval()
    lr = run.training.trainer.optimizer.param_groups[0]["lr"]
    _record(run, stats.row(epoch, lr, run.job.world_size, run.config.losses, run.images.labelled))
    if run.work is not None:
        Checkpoint.capture(run.training, epoch + 1, run.config.settings, run.history).save(run.work / CHECKPOINT_FILE)
        folder.saved = epoch + 1
        write_metrics_csv(run.history.rows, run.work / METRICS_FILE)
        plot_training(run.history, run.variants, run.work / PLOT_FILE)


def _record(run: RunState, row: dict) -> None:
    """`row` with the shipped weights' validation figures, appended to the history and logged."""
    row.update(validate(run.training.shipped, run.variants, run.validation, run.config.data.eval_batch_size))
    run.history.rows.append(row)
    log_epoch(row, run.variants, run.config.output.progress)
