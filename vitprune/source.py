"""Where a command's model and images come from: a timm name, an artifact or a transformers
folder; an image folder or a dataset timm reads."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from vitprune.artifact import TEACHER_KEY, identity_info, read_artifact
from vitprune.data import ImageSet, check_labels, load_images, transform_for
from vitprune.errors import VitpruneError
from vitprune.hf import is_transformers_folder, load_transformers
from vitprune.models import create_model, set_image_size, use_pre_logits
from vitprune.patch import model_img_size
from vitprune.plan import Plan
from vitprune.teacher import TEACHER_FILE, carry_teacher, teacher_of, teacher_record
from vitprune.timm_datasets import DatasetOptions, ImageStream, find_image_set, stream_batches


@dataclass
class BaseModel:
    """The unreduced model a command starts from, and the plan of the artifact it came from."""

    model: nn.Module
    info: dict
    artifact_plan: Plan | None = None
    teacher: nn.Module | None = None  # the model a fine-tuned artifact was trained from (vitprune.teacher)
    teacher_record: dict | None = None  # its record, also when its tensors are not with the artifact

    @property
    def reference(self) -> nn.Module:
        """What reports judge a reduced model against: the teacher of a fine-tuned artifact, else the base."""
        return self.teacher if self.teacher is not None else self.model

    def teacher_info(self) -> dict:
        """The info with a fine-tuned artifact's teacher named, without its tensors (the one-file
        .safetensors form, which holds no teacher file)."""
        if self.teacher_record is None:
            return self.info
        named = {key: value for key, value in self.teacher_record.items()
                 if key not in ("file", "file_sha256", "tensors")}
        return {**self.info, TEACHER_KEY: named}

    def distillation_teacher(self) -> nn.Module:
        """What fine-tuning this base distils from: `reference`, so a student of a fine-tuned artifact
        is trained towards, and judged against, the model the user started from."""
        if self.teacher_record is not None and self.teacher is None:
            raise VitpruneError(f"this artifact was fine-tuned from {self.teacher_record.get('model')}, whose "
                                f"tensors ({TEACHER_FILE}) are not with it (the one-file form); fine-tune the "
                                "artifact folder, which holds them", param="model")
        return self.reference

    def teacher_for(self, student: nn.Module) -> tuple[dict, bytes]:
        """(the teacher record, the teacher.safetensors bytes) of `student`, fine-tuned from this base by
        distillation from `distillation_teacher()`."""
        if self.teacher is not None:
            return carry_teacher(self.teacher, student, self.teacher_record)
        return teacher_record(self.model, student, self.info)

    def info_for(self, student: nn.Module) -> tuple[dict, dict[str, bytes]]:
        """(the info, the extra files) of an artifact made from this base: a fine-tuned artifact's teacher
        goes on with it (its record, and its tensors when they were with the artifact), so that reports
        on the new artifact still judge it against the model the user started from."""
        if self.teacher_record is None:
            return self.info, {}
        if self.teacher is None:
            return {**self.info, TEACHER_KEY: self.teacher_record}, {}
        record, data = carry_teacher(self.teacher, student, self.teacher_record)
        return {**self.info, TEACHER_KEY: record}, {TEACHER_FILE: data}


def is_artifact(source: str | Path) -> bool:
    path = Path(source)
    return (path.is_dir() and (path / "vitprune.json").is_file()) or (path.is_file() and path.suffix == ".safetensors")


def load_base(source: str, checkpoint: Path | None = None, no_pretrained: bool = False,
              img_size: int | None = None, features: bool = False) -> BaseModel:
    """A model name (with a checkpoint, or random weights) or an artifact (its base weights + plan);
    with `features`, its output is the pre-logits embedding (`use_pre_logits`)."""
    base = _load_base(source, checkpoint, no_pretrained, img_size)
    if features:
        for model in (base.model, base.teacher) if base.teacher is not None else (base.model,):
            use_pre_logits(model)
    return base


def _load_base(source: str, checkpoint: Path | None, no_pretrained: bool, img_size: int | None) -> BaseModel:
    if checkpoint is not None and no_pretrained:
        raise VitpruneError("checkpoint and no_pretrained contradict each other", param=("checkpoint", "no_pretrained"))
    if is_artifact(source):
        if checkpoint is not None:
            raise VitpruneError("checkpoint applies to model names only: an artifact carries its own weights",
                                param="checkpoint")
        artifact = read_artifact(source)  # the base and its plan: the plan is applied once, by the command
        teacher, record = teacher_of(source, artifact.model, artifact.metadata)
        if img_size is not None and img_size != artifact.metadata["model"]["img_size"]:
            set_image_size(artifact.model, img_size)  # the teacher stays as recorded: reports feed it its own size
        return BaseModel(model=artifact.model, info=identity_info(artifact.metadata), artifact_plan=artifact.plan,
                         teacher=teacher, teacher_record=record)
    if is_transformers_folder(source):
        if checkpoint is not None:
            raise VitpruneError("checkpoint applies to model names only: a transformers folder carries its own "
                                "weights", param="checkpoint")
        model, info = load_transformers(source, img_size=img_size)
        return BaseModel(model=model, info=info)
    if Path(source).exists():
        raise VitpruneError(f"{source} is not a vitprune artifact (no vitprune.json); give a timm model name and "
                            f"its checkpoint {source}")
    model, info = create_model(source, pretrained=not no_pretrained, checkpoint=checkpoint, img_size=img_size)
    return BaseModel(model=model, info=info)


def load_images_for(model: nn.Module, data: Path | str, *, limit: int | None, workers: int, img_size: int | None = None,
                    batch_size: int = 64, progress: bool = True,
                    options: DatasetOptions | None = None) -> tuple[Tensor, Tensor | None, ImageSet]:
    """(images, labels or None, ImageSet) preprocessed with timm's data config for `model`."""
    image_set = find_image_set(data, options or DatasetOptions(), limit=limit)
    check_labels(image_set, model.num_classes)
    images, labels = load_images(image_set, transform_for(model, img_size=img_size), num_workers=workers,
                                 batch_size=batch_size, progress=progress)
    return images, labels, image_set


def stream_eval_images(base: nn.Module, reduced: nn.Module, data: str | Path, options: DatasetOptions, *,
                       limit: int | None, workers: int, batch_size: int, shard: tuple[int, int] = (0, 1),
                       pin_memory: bool = False) -> ImageStream:
    """Batches of an image folder or a dataset (hfds/, wds/, .tar) for the reduced model, with the base
    model's input when its size differs, decoded while they are evaluated (every evaluation's path)."""
    transforms = [transform_for(reduced)]
    if model_img_size(base) != model_img_size(reduced):
        transforms.append(transform_for(base))
    return stream_batches(data, options, transforms, limit=limit, batch_size=batch_size, workers=workers,
                          num_classes=base.num_classes, shard=shard, pin_memory=pin_memory)
