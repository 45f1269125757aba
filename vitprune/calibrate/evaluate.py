"""Scoring plans on one image set against the base model's logits, with caches.

Model outputs are cached: images are preprocessed once per input size, base logits computed once,
and the unreduced tokens entering block L are kept, so a plan whose first reduction is at block L
only runs the blocks from L on. GMACs are exact (vitprune.flops.count_macs) and memoised.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.metrics import embedding_metrics, embedding_terms, per_image_terms
from vitprune.patch import advance_tokens, apply_plan, logits_from, tokens_before
from vitprune.plan import Plan

CLASSIFIER_OBJECTIVES = ("kl", "agreement", "top1")
EMBEDDING_OBJECTIVES = ("cosine", "retrieval")  # an embedding model's (num_classes=0, or a classifier's pre-logits)
OBJECTIVES = CLASSIFIER_OBJECTIVES + EMBEDDING_OBJECTIVES
AUTO_OBJECTIVE = "auto"  # kl for a classifier, cosine for an embedding model
OBJECTIVE_TEXT = {
    "kl": "mean KL divergence from the unreduced model's predictions (lower is better)",
    "agreement": "top-1 agreement with the unreduced model (higher is better; KL breaks ties)",
    "top1": "top-1 accuracy against the labels (higher is better; KL breaks ties)",
    "cosine": "mean cosine similarity with the unreduced model's embeddings (higher is better)",
    "retrieval": "retrieval agreement with the unreduced model: images whose nearest neighbour (cosine) is the "
                 "same (higher is better; cosine breaks ties)",
}
# Each objective's per-image term (lower is better), which the guard pairs between two plans.
PER_IMAGE_TERM = {"kl": "kl", "agreement": "disagree", "cosine": "cosine_loss", "retrieval": "nn_miss"}
EVAL_BATCH = 50
COUNT_IMAGES = 32  # per-image methods' GMACs depend on the image: counted on this many images


@dataclass
class Score:
    """A plan measured on one image set: a classifier's KL / agreement / top-1, or an embedding
    model's cosine and retrieval figures (`embedding`, vitprune.metrics.embedding_metrics)."""

    gmacs: float
    kl: float | None
    agreement: float | None
    top1: float | None
    n_images: int
    # per image, lower is better: KL, and 0/1 misses (against the base model, against the labels);
    # embeddings: 1 - cosine, and 0/1 nearest-neighbour misses
    per_image: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)
    embedding: dict[str, float] = field(default_factory=dict)  # cosine_mean, cosine_p5, retrieval_agreement, ...

    @property
    def divergence(self) -> float:
        """How far from the base, lower is better: KL, or 1 - mean cosine for embeddings (sensitivity)."""
        return self.kl if self.kl is not None else 1.0 - self.embedding["cosine_mean"]

    @property
    def agreement_points(self) -> float:
        """Agreement with the base in percent: top-1, or nearest-neighbour (retrieval) for embeddings."""
        if self.agreement is not None:
            return self.agreement
        return self.embedding.get("retrieval_agreement", 100.0 * self.embedding["cosine_mean"])

    def loss(self, objective: str) -> tuple[float, ...]:
        if objective in ("kl", "cosine"):
            return (self.divergence,)
        if objective in ("agreement", "retrieval"):
            return (-self.agreement_points, self.divergence)
        return (-(self.top1 if self.top1 is not None else self.agreement), self.kl)

    def paired_gain(self, other: Score, objective: str) -> tuple[float, float]:
        """How much better this plan is than `other` on the same images: (mean, standard error) of
        the per-image difference in the objective's term (KL, 1 - cosine, or a miss), positive when better."""
        term = PER_IMAGE_TERM.get(objective, "miss" if "miss" in self.per_image else "disagree")
        diff = other.per_image[term] - self.per_image[term]
        return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.inf

    def figures(self) -> dict:
        """The fidelity figures a report shows, rounded: agreement and KL, or the embedding figures."""
        if self.kl is None:
            return {key: round(value, 5 if key.startswith("cosine") else 2) for key, value in self.embedding.items()
                    if key != "n_images"}
        return {"agreement": round(self.agreement, 2), "kl": round(self.kl, 5)}

    def to_dict(self) -> dict:
        out = {"gmacs": round(self.gmacs, 4), **self.figures(), "n_images": self.n_images}
        if self.top1 is not None:
            out["top1"] = round(self.top1, 2)
        return out


def resolve_objective(objective: str, embedding: bool) -> str:
    """`auto` -> kl (classifier) or cosine (embedding model); an objective of the other kind is refused."""
    if objective == AUTO_OBJECTIVE:
        return EMBEDDING_OBJECTIVES[0] if embedding else CLASSIFIER_OBJECTIVES[0]
    if embedding and objective in CLASSIFIER_OBJECTIVES:
        raise VitpruneError(f"objective {objective} needs class predictions, and this model outputs an embedding; "
                            f"use {' or '.join(EMBEDDING_OBJECTIVES)}", param="objective")
    if not embedding and objective in EMBEDDING_OBJECTIVES:
        raise VitpruneError(f"objective {objective} compares embeddings, and this model outputs class logits; "
                            "use the features option to calibrate its pre-logits embedding", param="objective")
    return objective

def plan_key(plan: Plan) -> Plan:
    """The plan without its notes: plans that reduce alike are one key."""
    return replace(plan, notes={}) if plan.notes else plan


def distinct(plans: list[Plan]) -> list[Plan]:
    """`plans` without repeats, in order."""
    seen: set[Plan] = set()
    out = []
    for plan in plans:
        key = plan_key(plan)
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out


def batched(fn, tensor: Tensor) -> Tensor:
    return torch.cat([fn(tensor[i:i + EVAL_BATCH]) for i in range(0, len(tensor), EVAL_BATCH)])


class TokenCache:
    """The unreduced tokens entering each block, for one input size and one image set, filled on
    demand from the nearest block below that is already cached."""

    def __init__(self, model: nn.Module, images: Tensor) -> None:
        self.model, self.images = model, images
        self.tokens: dict[int, Tensor] = {}

    def get(self, layer: int) -> Tensor:
        if layer not in self.tokens:
            if 0 not in self.tokens:
                self.tokens[0] = batched(lambda part: tokens_before(self.model, part, 0), self.images)
            start = max(cached for cached in self.tokens if cached <= layer)
            self.tokens[layer] = batched(lambda part: advance_tokens(self.model, part, start, layer),
                                         self.tokens[start])
        return self.tokens[layer]


class MacsCounter:
    """Exact GMACs per image of plans (vitprune.flops.count_macs), memoised. Counts of plans that
    keep the same tokens for every image do not depend on the image; the others are averaged over
    the first images of the set given."""

    def __init__(self, models: dict[int, nn.Module]) -> None:
        self.models = models
        self.known: dict[tuple[Plan, int | None], float] = {}

    def gmacs(self, plan: Plan, images: Tensor | None = None) -> float:
        per_image = plan.varies_per_image
        key = (plan_key(plan), id(images) if per_image else None)
        if key not in self.known:
            model = apply_plan(self.models[plan.img_size], plan)
            sample = images[:COUNT_IMAGES] if per_image and images is not None else None
            self.known[key] = count_macs(model, sample).gmacs
        return self.known[key]


class Evaluator:
    """Scores plans on one image set against the base model's logits, with caches."""

    def __init__(self, models: dict[int, nn.Module], images: dict[int, Tensor], labels: Tensor | None,
                 base_logits: Tensor, macs: MacsCounter, keep_all_sizes: bool = True, embedding: bool = False) -> None:
        self.models, self.images, self.labels, self.base_logits, self.macs = models, images, labels, base_logits, macs
        self.embedding = embedding  # the outputs are embeddings (base_logits: the base's embeddings)
        self.keep_all_sizes = keep_all_sizes  # False: cache one input size at a time (large image sets)
        self.caches: dict[int, TokenCache] = {}
        self.scores: dict[Plan, Score] = {}
        self.evaluations = 0

    def cache(self, size: int) -> TokenCache:
        if size not in self.caches:
            if not self.keep_all_sizes:
                self.caches.clear()
            self.caches[size] = TokenCache(self.models[size], self.images[size])
        return self.caches[size]

    def logits(self, plan: Plan) -> Tensor:
        model = apply_plan(self.models[plan.img_size], plan)
        depth = len(model.blocks)
        start = min(plan.first_reduced_layer(depth), depth - 1)
        tokens = self.cache(plan.img_size).get(start)
        num_input = self.cache(plan.img_size).get(0).shape[1]
        with torch.inference_mode():
            return batched(lambda part: logits_from(model, part, start, num_input).float(), tokens)

    def score(self, plan: Plan) -> Score:
        key = plan_key(plan)
        if key not in self.scores:
            logits = self.logits(plan)
            gmacs = self.macs.gmacs(plan, self.images[plan.img_size])
            scored = self.embedding_score if self.embedding else self.classifier_score
            self.scores[key] = scored(logits, gmacs)
            self.evaluations += 1
        return self.scores[key]

    def classifier_score(self, logits: Tensor, gmacs: float) -> Score:
        # The means are taken from the per-image terms the guard pairs, so each is computed once.
        per_image = per_image_terms(logits, self.base_logits, self.labels)
        top1 = None if "miss" not in per_image else (1.0 - per_image["miss"]).mean().item() * 100.0
        agreement = (1.0 - per_image["disagree"]).mean().item() * 100.0
        return Score(gmacs=gmacs, kl=per_image["kl"].mean().item(), agreement=agreement,
                     top1=top1, n_images=len(self.base_logits), per_image=per_image)

    def embedding_score(self, embeddings: Tensor, gmacs: float) -> Score:
        return Score(gmacs=gmacs, kl=None, agreement=None, top1=None, n_images=len(self.base_logits),
                     per_image=embedding_terms(embeddings, self.base_logits),
                     embedding=embedding_metrics(embeddings, self.base_logits))

    def known(self, plan: Plan) -> Score | None:
        """The score of a plan already scored here, else None."""
        return self.scores.get(plan_key(plan))
