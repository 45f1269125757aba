"""The one set of fidelity metrics: top-1/top-5 against labels, agreement and KL against a reference."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from vitprune.errors import VitpruneError

TOP5 = 5


def classification_metrics(logits: Tensor, labels: Tensor | None, reference_logits: Tensor | None) -> dict[str, float | int]:
    """top1/top5 (percent) against labels; agreement (percent) and mean KL(reference || model) against a reference."""
    _check_metric_inputs(logits, labels, reference_logits)
    metrics: dict[str, float | int] = {"n_images": len(logits)}
    if labels is not None:
        top_k = logits.topk(min(TOP5, logits.shape[1]), dim=1).indices
        hits = top_k == labels.unsqueeze(1)
        metrics["top1"] = hits[:, 0].double().mean().item() * 100.0
        metrics["top5"] = hits.any(dim=1).double().mean().item() * 100.0
    if reference_logits is not None:
        terms = per_image_terms(logits, reference_logits, None)
        metrics["agreement"] = match_percent(logits.argmax(dim=1), reference_logits.argmax(dim=1))
        metrics["kl"] = terms["kl"].mean().item()
    return metrics


def match_percent(predicted: Tensor, target: Tensor) -> float:
    """Percent of images whose predicted class index is the target's: top-1 against labels, or
    agreement against a reference's predictions (for callers that keep classes, not logits)."""
    return float((predicted == target).double().mean()) * 100.0


def per_image_terms(logits: Tensor, reference_logits: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
    """Per image, lower is better (float64): `kl` to the reference, `disagree` (0/1: another top-1
    class than the reference's) and, with labels, `miss` (0/1: top-1 is not the label)."""
    predicted = logits.argmax(dim=1)
    terms = {"kl": kl_per_image(logits, reference_logits),
             "disagree": (predicted != reference_logits.argmax(dim=1)).double()}
    if labels is not None:
        terms["miss"] = (predicted != labels).double()
    return terms


def kl_per_image(logits: Tensor, reference_logits: Tensor) -> Tensor:
    """KL(reference || model) of each image's predicted distribution: (N,) float64."""
    model_log_probs = F.log_softmax(logits.double(), dim=1)
    reference_log_probs = F.log_softmax(reference_logits.double(), dim=1)
    return F.kl_div(model_log_probs, reference_log_probs, log_target=True, reduction="none").sum(dim=1)


def _check_metric_inputs(logits: Tensor, labels: Tensor | None, reference_logits: Tensor | None) -> None:
    if logits.ndim != 2 or len(logits) == 0:
        raise VitpruneError(f"logits must be a non-empty [N, classes] tensor, got shape {list(logits.shape)}")
    if labels is not None:
        if labels.shape != (len(logits),):
            raise VitpruneError(f"labels shape {list(labels.shape)} does not match {len(logits)} logits")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise VitpruneError(
                f"labels range {int(labels.min())}..{int(labels.max())} "
                f"is outside the model's {logits.shape[1]} classes"
            )
    if reference_logits is not None and reference_logits.shape != logits.shape:
        raise VitpruneError(
            f"reference logits shape {list(reference_logits.shape)} does not match logits shape {list(logits.shape)}"
        )
