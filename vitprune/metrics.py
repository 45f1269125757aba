"""The one set of fidelity metrics: top-1/top-5 against labels, agreement and KL against a reference;
cosine and retrieval agreement of embeddings against reference embeddings; 95% intervals of the
figures from their per-image terms."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vitprune.errors import VitpruneError

TOP5 = 5
Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile: two-sided 95% intervals


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


def prediction_terms(logits: Tensor, reference_logits: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
    """Per image, what every classification figure is a mean of: `pred` and `reference_pred` (top-1
    classes), `kl` (KL(reference || model), float64) and, with labels, `hit1`/`hit5` and
    `reference_hit1`/`reference_hit5` (bool). Held per image, they are all an evaluation keeps."""
    _check_metric_inputs(logits, labels, reference_logits)
    terms = {"pred": logits.argmax(dim=1), "reference_pred": reference_logits.argmax(dim=1),
             "kl": kl_per_image(logits, reference_logits)}
    if labels is not None:
        for prefix, output in (("", logits), ("reference_", reference_logits)):
            top_k = output.topk(min(TOP5, output.shape[1]), dim=1).indices == labels.unsqueeze(1)
            terms[f"{prefix}hit1"], terms[f"{prefix}hit5"] = top_k[:, 0], top_k.any(dim=1)
    return terms


def mean_interval(values: Tensor, within: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float] | None:
    """Two-sided 95% interval of the mean of per-image values, by the normal approximation (for a
    drop: the per-image differences of two models on the same images, a paired interval), cut to
    the range the values can take (`within`: a KL is never negative, a cosine at most 1); None
    with fewer than 2 images."""
    if len(values) < 2:
        return None
    values = values.double()
    mean, half = float(values.mean()), Z_95 * float(values.std()) / math.sqrt(len(values))
    return max(within[0], mean - half), min(within[1], mean + half)


def proportion_interval(hits: Tensor) -> tuple[float, float] | None:
    """Two-sided 95% Wilson score interval of the share of true values (it stays inside [0, 1] and
    has width when every image agrees); None without images."""
    count = len(hits)
    if count == 0:
        return None
    share, z2 = float(hits.double().mean()), Z_95 ** 2
    centre = (share + z2 / (2 * count)) / (1 + z2 / count)
    half = Z_95 * math.sqrt(share * (1 - share) / count + z2 / (4 * count ** 2)) / (1 + z2 / count)
    return max(centre - half, 0.0), min(centre + half, 1.0)


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


# -- embeddings ----------------------------------------------------------------------------------
# An embedding model (no classifier head, or a classifier's pre-logits) is compared with its
# reference by the cosine of each image's two embeddings and by retrieval over the evaluated images:
# each image's nearest neighbours (cosine, itself excluded) under the model against the reference's.

RECALL_KS = (1, 5)
COSINE_PERCENTILE = 0.05
NEIGHBOUR_CHUNK = 1024  # query rows per similarity block: memory grows with chunk x N, never N x N at once


def cosine_per_image(embeddings: Tensor, reference: Tensor) -> Tensor:
    """Cosine similarity of each image's embedding with its reference embedding: (N,) float64."""
    return F.cosine_similarity(embeddings.double(), reference.double(), dim=1)


def nearest_neighbours(embeddings: Tensor, k: int) -> Tensor:
    """Indices (N, k) of each image's k nearest other images by cosine similarity, nearest first
    (itself excluded), computed in blocks of NEIGHBOUR_CHUNK query rows."""
    if not 0 < k < len(embeddings):
        raise VitpruneError(f"{k} neighbours need more than {k} images, got {len(embeddings)}")
    unit = F.normalize(embeddings.double(), dim=1)
    parts = []
    for start in range(0, len(unit), NEIGHBOUR_CHUNK):
        similarity = unit[start:start + NEIGHBOUR_CHUNK] @ unit.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -torch.inf  # not its own neighbour
        parts.append(similarity.topk(k, dim=1).indices)
    return torch.cat(parts)


def neighbour_recall(neighbours: Tensor, reference_neighbours: Tensor, k: int) -> Tensor:
    """Per image, the share of the reference's k nearest neighbours among the model's k nearest: (N,) float64."""
    mine, theirs = neighbours[:, :k], reference_neighbours[:, :k]
    return (mine.unsqueeze(2) == theirs.unsqueeze(1)).any(dim=2).double().mean(dim=1)


def embedding_terms(embeddings: Tensor, reference: Tensor) -> dict[str, Tensor]:
    """Per image, lower is better (float64): `cosine_loss` (1 - cosine with the reference) and, with
    two images or more, `nn_miss` (0/1: another nearest neighbour than the reference's)."""
    _check_embedding_inputs(embeddings, reference)
    terms = {"cosine_loss": 1.0 - cosine_per_image(embeddings, reference)}
    if len(embeddings) > 1:
        terms["nn_miss"] = 1.0 - neighbour_recall(nearest_neighbours(embeddings, 1), nearest_neighbours(reference, 1), 1)
    return terms


def embedding_metrics(embeddings: Tensor, reference: Tensor) -> dict[str, float | int]:
    """Fidelity of embeddings to reference embeddings of the same images.

    cosine_mean, cosine_p5: mean and 5th percentile of the per-image cosine similarity;
    retrieval_agreement (percent): images whose nearest neighbour (cosine, itself excluded) is the
    reference's; recall_at_K (percent): the share of the reference's K nearest neighbours among the
    model's K nearest, averaged over images (recall_at_1 is retrieval_agreement). Retrieval needs
    more than K images; K is capped at N - 1.
    """
    _check_embedding_inputs(embeddings, reference)
    cosine = cosine_per_image(embeddings, reference)
    metrics: dict[str, float | int] = {"n_images": len(embeddings), "cosine_mean": cosine.mean().item(),
                                       "cosine_p5": torch.quantile(cosine, COSINE_PERCENTILE).item()}
    if len(embeddings) > 1:
        most = min(max(RECALL_KS), len(embeddings) - 1)
        mine, theirs = nearest_neighbours(embeddings, most), nearest_neighbours(reference, most)
        for k in RECALL_KS:
            metrics[f"recall_at_{k}"] = neighbour_recall(mine, theirs, min(k, most)).mean().item() * 100.0
        metrics["retrieval_agreement"] = metrics["recall_at_1"]
    return metrics


def _check_embedding_inputs(embeddings: Tensor, reference: Tensor) -> None:
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise VitpruneError(f"embeddings must be a non-empty [N, dim] tensor, got shape {list(embeddings.shape)}")
    if reference.shape != embeddings.shape:
        raise VitpruneError(f"reference embeddings shape {list(reference.shape)} does not match "
                            f"embeddings shape {list(embeddings.shape)}")
