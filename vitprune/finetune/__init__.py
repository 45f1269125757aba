"""Recover the accuracy token reduction loses: distil the reduced model from its unreduced self.

The teacher is the base model without reduction; the student is a copy running the plan. The
loss is KL(teacher || student) on temperature-softened predictions, plus cross-entropy when the
images are labelled. SuperViT mode trains one set of weights for several input sizes x EViT keep
rates at once: the largest variant learns from the teacher, the others from the largest.

Runs as one process (CPU by default) or unchanged under `torchrun` (DDP, one process per GPU).
Checkpoints go to `<output>.partial/` every epoch; at the end the artifact is written to
`<output>` in one rename and the work folder is removed, so a resumed run continues from the
partial folder and `<output>` never holds a half-trained model. A run that fails before its first
checkpoint removes the work folder it made; after one, its error says how to resume. Every image is
verified to decode before the first step, and a non-finite loss stops the run ("training diverged").

The modules, in the order a run uses them: distributed (the torchrun job), data (images,
augmentation, loader), supervit (the variants), setup, train (Trainer, train_one_epoch),
validate, checkpoint, report, finish; run.fit ties them together. The request and its checks
are `vitprune.commands.finetune`.
"""
from __future__ import annotations

from vitprune.finetune.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    RESUMABLE_FIELDS,
    Checkpoint,
    WorkFolder,
    bound_settings,
    check_work_dir,
    work_dir_for,
)
from vitprune.finetune.data import (
    DataOptions,
    TrainingImages,
    check_auto_augment,
    find_training_images,
    train_loader,
    train_transform,
    verify_images,
)
from vitprune.finetune.distributed import Distributed, distributed_job, init_distributed
from vitprune.finetune.losses import (
    LossWeights,
    distill_loss,
    feature_distill_loss,
    forward_with_features,
    hard_distill_loss,
)
from vitprune.finetune.report import (
    METRICS_FILE,
    PLOT_FILE,
    History,
    before_after_table,
    finetune_markdown,
    plot_training,
    write_metrics_csv,
)
from vitprune.finetune.run import fit
from vitprune.finetune.state import Attachment, FinetuneConfig, FinetuneResult, OutputOptions, RunState
from vitprune.finetune.supervit import (
    Variant,
    grid_variants,
    list_variants,
    load_variant,
    served_model,
    single_variant,
    supervit_variants,
)
from vitprune.finetune.train import AMP_DTYPES, Trainer, TrainOptions, seed_everything, train_one_epoch
from vitprune.finetune.validate import Validation, prepare_validation

__all__ = [
    "AMP_DTYPES", "CHECKPOINT_FILE", "Attachment", "CHECKPOINT_FORMAT", "METRICS_FILE", "PLOT_FILE", "RESUMABLE_FIELDS",
    "Checkpoint", "DataOptions", "Distributed", "FinetuneConfig", "FinetuneResult", "History", "LossWeights",
    "OutputOptions", "RunState", "TrainOptions", "Trainer", "TrainingImages", "Validation", "Variant", "WorkFolder",
    "before_after_table", "bound_settings", "check_auto_augment", "check_work_dir", "distill_loss", "distributed_job",
    "feature_distill_loss", "find_training_images", "finetune_markdown", "fit", "forward_with_features",
    "grid_variants", "hard_distill_loss", "init_distributed", "list_variants", "load_variant", "plot_training",
    "prepare_validation", "seed_everything", "served_model", "single_variant", "supervit_variants", "train_loader",
    "train_one_epoch", "train_transform", "verify_images", "work_dir_for", "write_metrics_csv",
]
