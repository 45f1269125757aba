"""The distillation objective: KL to the teacher's softened predictions, hard and feature distillation, labels."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LossWeights:
    """How the loss terms add up (the request's temperature and weights)."""

    temperature: float
    distill_weight: float  # KL(teacher || student)
    label_weight: float  # cross-entropy with the labels (labelled images only)
    hard_distill: float  # cross-entropy with the teacher's top-1 (DeiT's hard distillation)
    feature_distill: float  # relative MSE to the teacher's pre-logits features

    def distillation(self, logits: Tensor, target_logits: Tensor) -> tuple[Tensor, float]:
        """Soft (KL) plus hard (teacher's top-1) distillation towards `target_logits`, and the KL."""
        distill = distill_loss(logits, target_logits, self.temperature)
        loss = self.distill_weight * distill
        if self.hard_distill > 0:
            loss = loss + self.hard_distill * hard_distill_loss(logits, target_logits)
        return loss, distill.item()

    def objective(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor | None) -> tuple[Tensor, float, float]:
        """Distillation towards the teacher plus, with labels, their cross-entropy: (loss, KL, label loss)."""
        loss, distill = self.distillation(logits, teacher_logits)
        label = 0.0
        if labels is not None and self.label_weight > 0:
            label_loss = F.cross_entropy(logits.float(), labels)
            loss = loss + self.label_weight * label_loss
            label = label_loss.item()
        return loss, distill, label

    def add_features(self, loss: Tensor, features: Tensor, teacher_features: Tensor) -> tuple[Tensor, float]:
        """`loss` plus the weighted feature term (when it has a weight), and the feature term."""
        if self.feature_distill <= 0:
            return loss, 0.0
        feature_loss = feature_distill_loss(features, teacher_features)
        return loss + self.feature_distill * feature_loss, feature_loss.item()


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened predictions, times T^2 so that the
    gradient scale does not depend on T (Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


def hard_distill_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cross-entropy with the teacher's top-1 class as the label (DeiT's hard distillation).
    Agreement with the teacher is exactly top-1 match, so this term aims at it directly."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def feature_distill_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Squared error to the teacher's pre-logits features (the classifier's input), relative to
    their mean square. Unlike the logits it asks nothing about classes, so what it teaches carries
    over to classes the training images do not show."""
    teacher = teacher_features.float()
    return F.mse_loss(student_features.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def forward_with_features(model: nn.Module, runner: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """runner(images) (the model, or its DDP wrapper) and the input of `model.head` during that call."""
    captured: list[Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits = runner(images)
    finally:
        handle.remove()
    return logits, captured[-1]
