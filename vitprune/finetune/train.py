"""One optimisation step (`Trainer.step`) and one epoch of them (`train_one_epoch`).

A step runs the teacher, then every configuration the student serves, largest first: the
largest learns from the teacher (and the labels), the smaller SuperViT ones from the largest.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from vitprune.data import resize_images
from vitprune.errors import VitpruneError
from vitprune.finetune.distributed import Distributed
from vitprune.finetune.losses import LossWeights, forward_with_features
from vitprune.finetune.supervit import Variant
from vitprune.patch import apply_plan
from vitprune.progress import progress_bar

AMP_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOSS_PARTS = ("loss", "distill", "label", "feature")


@dataclass(frozen=True)
class TrainOptions:
    """The optimiser, its schedule and what it trains (the request's fields of the same names)."""

    epochs: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: float
    warmup_lr: float
    clip_grad: float  # max gradient norm; 0 turns clipping off
    dtype: str  # float32, or bfloat16 / float16 autocast (CUDA only)
    ema: float | None  # EMA decay; the EMA weights are validated and saved
    trainable: tuple[str, ...]  # parameter-name patterns to train (fnmatch)


@dataclass(kw_only=True)
class Trainer:
    """One optimisation step: teacher forward, student forward(s) and backward, clip, step."""

    teacher: nn.Module
    student: nn.Module  # the module itself (DDP wraps it in `runner`)
    runner: nn.Module
    variants: list[Variant]
    optimizer: torch.optim.Optimizer
    losses: LossWeights
    clip_grad: float
    dtype: str
    supervit: bool = False  # the student takes every variant's input size (one set of weights)
    labelled: bool = True  # the label term applies
    scaler: torch.amp.GradScaler | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    train_params: list[nn.Parameter] = field(default_factory=list)

    def autocast(self):
        dtype = AMP_DTYPES[self.dtype]
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()

    def backward(self, loss: Tensor, sync: bool) -> None:
        # Gradients of all SuperViT variants add up; DDP averages them across ranks on the last one.
        ddp = isinstance(self.runner, nn.parallel.DistributedDataParallel)
        with self.runner.no_sync() if (ddp and not sync) else nullcontext():
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, images: Tensor, labels: Tensor) -> dict:
        """Train on one batch; the loss and its terms, summed over the variants."""
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            teacher_logits, teacher_features = forward_with_features(self.teacher, self.teacher, images)
        teacher_logits = teacher_logits.float()
        total, parts = 0.0, {"distill": 0.0, "label": 0.0, "feature": 0.0}
        soft_targets = teacher_logits
        for index, variant in enumerate(self.variants):
            logits, features = self.forward(variant, images)
            if index == 0:
                loss, distill, label = self.losses.objective(logits, teacher_logits, labels if self.labelled else None)
                loss, feature = self.losses.add_features(loss, features, teacher_features)
                parts["label"] += label
                parts["feature"] += feature
                soft_targets = logits.detach()
            else:  # in-place distillation: the smaller variants learn the largest one's predictions
                loss, distill = self.losses.distillation(logits, soft_targets)
            parts["distill"] += distill
            self.backward(loss, sync=index == len(self.variants) - 1)
            total += loss.item()
        self.update()
        return {"loss": total, **parts}

    def forward(self, variant: Variant, images: Tensor) -> tuple[Tensor, Tensor]:
        """The student's logits and pre-logits features as `variant`, on the batch at its size."""
        if self.supervit:
            apply_plan(self.student, replace(variant.plan, img_size=None))  # the size comes from the input
        with self.autocast():
            return forward_with_features(self.student, self.runner, resize_images(images, variant.img_size))

    def update(self) -> None:
        """Unscale (fp16), clip, step the optimiser, clear the gradients."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.train_params, self.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class Training:
    """The optimisation side of a run: the trainer, its batches, schedule and EMA."""

    trainer: Trainer
    loader: DataLoader
    sampler: DistributedSampler
    scheduler: Scheduler
    ema: ModelEmaV3 | None
    epochs: int
    seed: int
    job: Distributed
    progress: bool = True

    @property
    def shipped(self) -> nn.Module:
        """The weights validated and saved: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.trainer.student

    def after_update(self, update: int) -> None:
        self.scheduler.step_update(num_updates=update)
        if self.ema is not None:
            self.ema.update(self.trainer.student, step=update)


@dataclass
class EpochStats:
    """Image-weighted loss sums of one epoch, its image count and duration."""

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_PARTS, 0.0))
    seen: int = 0
    seconds: float = 0.0

    def add(self, losses: dict, count: int) -> None:
        for key in self.totals:
            self.totals[key] += losses[key] * count
        self.seen += count

    def mean(self, key: str) -> float:
        return self.totals[key] / self.seen

    def row(self, epoch: int, lr: float, world_size: int, losses: LossWeights, labelled: bool) -> dict:
        """The epoch's metrics.csv columns before the validation ones."""
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": self.mean("loss"), "train_distill": self.mean("distill")}
        if labelled and losses.label_weight > 0:
            row["train_label"] = self.mean("label")
        if losses.feature_distill > 0:
            row["train_feature"] = self.mean("feature")
        row.update({"images_per_s": self.seen * world_size / self.seconds, "epoch_seconds": self.seconds})
        return row


def train_one_epoch(training: Training, epoch: int, steps: list[tuple[float, float]]) -> EpochStats:
    """One pass over this process's training images; each step's loss is appended to `steps`."""
    job, trainer, loader = training.job, training.trainer, training.loader
    seed_everything(training.seed + 1000 * (epoch + 1) + job.rank)  # other crops per rank, reproducible on resume
    training.sampler.set_epoch(epoch)
    trainer.student.train()
    stats, updates = EpochStats(), len(loader)
    started = time.perf_counter()
    with progress_bar(training.progress and job.is_main,
                      fields="loss {task.fields[loss]:.4f}  {task.fields[speed]:.1f} img/s") as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{training.epochs}", total=updates, loss=0.0, speed=0.0)
        for index, (images, labels, error) in enumerate(loader):
            if error is not None:
                raise VitpruneError(error)
            losses = trainer.step(images, labels)
            check_loss(losses["loss"], job, epoch, index)
            training.after_update(epoch * updates + index + 1)
            stats.add(losses, len(images))
            steps.append((epoch + (index + 1) / updates, losses["loss"]))
            speed = stats.seen * job.world_size / (time.perf_counter() - started)
            bar.update(task, advance=1, loss=stats.mean("loss"), speed=speed)
    stats.seconds = time.perf_counter() - started
    return stats


def check_loss(loss: float, job: Distributed, epoch: int, index: int) -> None:
    """Stop the run (every process at the same step) when the loss is no longer a finite number."""
    if job.all_finite(loss):
        return
    found = f"{loss}" if not math.isfinite(loss) else "not finite on another process"
    raise VitpruneError(f"training diverged: the loss is {found} at epoch {epoch + 1} step {index + 1}; lower lr",
                        param="lr")


def optimizer_and_schedule(student: nn.Module, options: TrainOptions,
                           updates_per_epoch: int) -> tuple[torch.optim.Optimizer, Scheduler]:
    """AdamW (no weight decay on biases and norms) and a per-update cosine schedule with linear warm-up."""
    optimizer = create_optimizer_v2(student, opt="adamw", lr=options.lr, weight_decay=options.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=options.epochs,
                                       warmup_epochs=options.warmup_epochs, warmup_lr=options.warmup_lr,
                                       min_lr=options.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    return optimizer, scheduler


def make_ema(student: nn.Module, decay: float | None) -> ModelEmaV3 | None:
    return ModelEmaV3(student, decay=decay) if decay is not None else None


def make_scaler(dtype: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and float32 do not."""
    return torch.amp.GradScaler("cuda") if dtype == "float16" else None


def select_trainable(student: nn.Module, patterns: tuple[str, ...]) -> list[nn.Parameter]:
    """Train the parameters whose names match a pattern, freeze the rest."""
    chosen = []
    for name, param in student.named_parameters():
        param.requires_grad_(any(fnmatch(name, pattern) for pattern in patterns))
        if param.requires_grad:
            chosen.append(param)
    if not chosen:
        example = next(name for name, _ in student.named_parameters())
        raise VitpruneError(f"trainable {','.join(patterns)} matches no parameter (names look like '{example}')",
                            param="trainable")
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
