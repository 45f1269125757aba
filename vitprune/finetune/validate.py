"""Validation: the held-out images at every size the variants use, the teacher's answers, and
each variant's top-1, agreement and KL to the teacher."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vitprune.data import ImageSet, load_images, predict, transform_for
from vitprune.evaluation import classification_figures
from vitprune.finetune.supervit import Variant, served_model
from vitprune.metrics import classification_metrics, prediction_terms
from vitprune.patch import model_img_size

VARIANT_METRICS = ("top1", "agreement", "kl")
INTERVALS = ("top1_drop_ci95", "agreement_ci95", "kl_ci95")  # vitprune.evaluation's paired 95% intervals


@dataclass
class Validation:
    """Held-out images preprocessed at every size the variants use, and the teacher's answers."""

    images: dict[int, Tensor]
    labels: Tensor | None
    teacher_size: int
    teacher_logits: Tensor
    teacher_metrics: dict
    path: str

    @property
    def n_images(self) -> int:
        return int(self.teacher_logits.shape[0])

    def metrics(self, model: nn.Module, variant: Variant, batch_size: int) -> dict:
        logits = predict(model, self.images[variant.img_size], batch_size=batch_size, progress=False)
        found = classification_metrics(logits, self.labels, self.teacher_logits)
        return {key: found[key] for key in VARIANT_METRICS if key in found}

    def intervals(self, model: nn.Module, variant: Variant, batch_size: int = 64) -> dict:
        """The 95% intervals of the variant's figures against the teacher (top-1 drop, paired;
        agreement; KL), as every evaluation reports them (vitprune.evaluation)."""
        logits = predict(model, self.images[variant.img_size], batch_size=batch_size, progress=False)
        found = classification_figures(prediction_terms(logits, self.teacher_logits, self.labels))
        return {key: found[key] for key in INTERVALS if found.get(key) is not None}


def prepare_validation(teacher: nn.Module, image_set: ImageSet, sizes: set[int], path: str, *,
                       workers: int, batch_size: int, progress: bool) -> Validation:
    """Load the images at each size (and the teacher's) and run the teacher on them once."""
    teacher_size = model_img_size(teacher)
    images: dict[int, Tensor] = {}
    labels = None
    for size in sorted(sizes | {teacher_size}, reverse=True):
        images[size], labels = load_images(image_set, transform_for(teacher, img_size=size), num_workers=workers,
                                           batch_size=batch_size, progress=progress)
    teacher_logits = predict(teacher, images[teacher_size], batch_size=batch_size, progress=progress,
                             description="Teacher")
    teacher_metrics = classification_metrics(teacher_logits, labels, None)
    return Validation(images, labels, teacher_size, teacher_logits,
                      {key: teacher_metrics[key] for key in ("top1",) if key in teacher_metrics}, path)


def validate(trained: nn.Module, variants: list[Variant], validation: Validation | None, batch_size: int) -> dict:
    """The trained weights served at each variant, scored: {"<key>_<metric>": value} (metrics.csv columns)."""
    if validation is None:
        return {}
    row = {}
    for variant in variants:
        found = validation.metrics(served_model(trained, variant.plan), variant, batch_size)
        row.update({f"{variant.key}_{metric}": value for metric, value in found.items()})
    return row
