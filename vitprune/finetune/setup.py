"""Setup: the input checked against the model (labels, every image decodes), the student, its
optimiser, schedule, EMA and batches, a resumed checkpoint, the validation images. Nothing is
written here: the work folder is made afterwards (`run.fit`)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from vitprune.finetune.checkpoint import Checkpoint
from vitprune.finetune.data import TrainingImages, check_images, train_loader, train_transform, verify_images
from vitprune.finetune.distributed import Distributed
from vitprune.finetune.report import History
from vitprune.finetune.state import FinetuneConfig, RunState
from vitprune.finetune.supervit import Variant, make_student
from vitprune.finetune.train import (
    Trainer,
    Training,
    make_ema,
    make_scaler,
    optimizer_and_schedule,
    select_trainable,
)
from vitprune.finetune.validate import Validation, prepare_validation
from vitprune.source import BaseModel


def setup(config: FinetuneConfig, base: BaseModel, variants: list[Variant], images: TrainingImages,
          job: Distributed, work: Path | None) -> RunState:
    """Everything a run trains with, resumed from the checkpoint in `work` when asked."""
    teacher = base.distillation_teacher()
    check_images(images, teacher.num_classes, job.world_size)
    verify_images(images, config.data.workers)
    student = make_student(base.model, variants[0].plan, config.supervit)
    params = select_trainable(student, config.train.trainable)
    checkpoint = Checkpoint.resume(work, config.settings) if config.output.resume else None
    job.barrier()  # every rank has checked the input before rank 0 touches the disk (`run.fit`)
    teacher.eval().requires_grad_(False).to(job.device)
    student.to(job.device).train()
    training, history = _training(config, teacher, student, params, variants, images, job, checkpoint)
    return RunState(config=config, base=base, job=job, variants=variants, images=images, training=training,
                    validation=_validation(config, teacher, variants, images, job), history=history,
                    start_epoch=checkpoint.epoch if checkpoint is not None else 0, work=work)


def _training(config: FinetuneConfig, teacher: nn.Module, student: nn.Module, params: list[nn.Parameter],
              variants: list[Variant], images: TrainingImages, job: Distributed,
              checkpoint: Checkpoint | None) -> tuple[Training, History]:
    """The loader, optimiser, schedule, EMA and loss scaler (restored from `checkpoint`), the trainer."""
    options, data = config.train, config.data
    transform = train_transform(teacher, data.crop_scale, data.augment, data.auto_augment)
    loader, sampler = train_loader(images.train, transform, data, job)
    optimizer, scheduler = optimizer_and_schedule(student, options, len(loader))
    ema, scaler = make_ema(student, options.ema), make_scaler(options.dtype)
    history = checkpoint.restore(student, optimizer, ema, scaler) if checkpoint is not None else History()
    trainer = Trainer(teacher=teacher, student=student, runner=job.wrap(student), variants=variants,
                      optimizer=optimizer, losses=config.losses, clip_grad=options.clip_grad, dtype=options.dtype,
                      supervit=config.supervit, labelled=images.labelled, scaler=scaler, device=job.device,
                      train_params=params)
    training = Training(trainer=trainer, loader=loader, sampler=sampler, scheduler=scheduler, ema=ema,
                        epochs=options.epochs, seed=data.seed, job=job, progress=config.output.progress)
    return training, history


def _validation(config: FinetuneConfig, teacher: nn.Module, variants: list[Variant], images: TrainingImages,
                job: Distributed) -> Validation | None:
    """Rank 0 validates: the images at every variant's size and the teacher's answers."""
    if not job.is_main or images.val is None:
        return None
    return prepare_validation(teacher, images.val, {v.img_size for v in variants}, images.val_path,
                              workers=config.data.workers, batch_size=config.data.eval_batch_size,
                              progress=config.output.progress)
