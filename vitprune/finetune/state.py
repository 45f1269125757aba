"""What a run is given (FinetuneConfig), what it carries from step to step (RunState), what it returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from vitprune.finetune.data import DataOptions, TrainingImages
from vitprune.finetune.distributed import Distributed
from vitprune.finetune.losses import LossWeights
from vitprune.finetune.report import History
from vitprune.finetune.supervit import Variant
from vitprune.finetune.train import Training, TrainOptions
from vitprune.finetune.validate import Validation
from vitprune.source import BaseModel


@dataclass(frozen=True)
class OutputOptions:
    """Where the artifact goes and what the run shows (the request's fields of the same names)."""

    output: Path | None  # None: train and report, write nothing
    force: bool
    resume: bool  # continue from the checkpoint in `<output>.partial/`
    keep_checkpoint: bool  # also put the last checkpoint into the artifact
    progress: bool


@dataclass(frozen=True)
class Attachment:
    """What a run fine-tuning another step's result (calibrate's chosen plan) carries: files for the
    work folder (written at a fresh start, read back on resume), report.json sections, report.md text
    and files for the artifact."""

    work_files: dict[str, bytes] = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    markdown: str = ""
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a run needs besides the model and its variants."""

    data: DataOptions
    train: TrainOptions
    losses: LossWeights
    output: OutputOptions
    supervit: bool
    settings: dict = field(default_factory=dict)  # what checkpoints are bound to (checkpoint.bound_settings)
    attachment: Attachment = field(default_factory=Attachment)


@dataclass
class RunState:
    """A run between setup and finish."""

    config: FinetuneConfig
    base: BaseModel  # the weights trained (base.model), the teacher (base.distillation_teacher()), their identity
    job: Distributed
    variants: list[Variant]  # the default (served) one first
    images: TrainingImages
    training: Training
    validation: Validation | None  # rank 0 with validation images only
    history: History
    start_epoch: int  # > 0 when resumed
    work: Path | None  # the checkpoint folder (None: no output)

    @property
    def teacher(self) -> nn.Module:
        return self.base.distillation_teacher()

    @property
    def student(self) -> nn.Module:
        return self.training.trainer.student


@dataclass
class FinetuneResult:
    model: nn.Module  # the trained student running its (default) plan, on the CPU
    report: dict | None  # None on ranks other than 0
    metrics: list[dict]
    output: Path | None
    rank: int = 0
