"""The exit rule every cascade runner shares: the confidence, and the one gather/scatter loop.

`run_exits` drives any sequence of stages given as callables on torch tensors: the PyTorch
`CascadeModel` passes its stage modules, `OnnxCascade` its ONNX Runtime sessions behind a small
tensor adapter, so both decide exits (and resize the batch per stage) with the same code.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.data import resize_images
from vitprune.errors import VitpruneError

CRITERIA = ("maxprob", "entropy")
# How `vitprune.data.resize_images` resizes the batch for a smaller stage (cascade.json records it).
RESIZE = {"mode": "bicubic", "antialias": True, "align_corners": False}

Stage = Callable[[Tensor], Tensor]  # a preprocessed batch at the stage's size -> logits
StageCost = Callable[[int, Tensor], Tensor]  # (stage index, its inputs) -> GMACs per image (float64, CPU)


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise VitpruneError(f"unknown confidence criterion '{criterion}'; choose {' or '.join(CRITERIA)}")


def confidence(logits: Tensor, criterion: str = "maxprob") -> Tensor:
    """Per-image confidence, higher = surer: max softmax probability, or minus the entropy (nats)."""
    check_criterion(criterion)
    probs = logits.float().softmax(dim=-1)
    if criterion == "maxprob":
        return probs.max(dim=-1).values
    return (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # entropy


@dataclass
class CascadeRun:
    logits: Tensor
    exit_stage: Tensor  # (B,) index of the stage each image answered at
    gmacs_per_image: Tensor | None = None  # (B,) GMACs of the stages each image ran


def run_exits(images: Tensor, stages: Sequence[Stage], sizes: Sequence[int], thresholds: Sequence[float],
              criterion: str, *, cost: StageCost | None = None) -> CascadeRun:
    """Every image runs stage 0; those whose confidence reaches the stage's threshold leave with
    its answer, the others (gathered by a boolean index) go on; the last stage always answers.
    Answers are scattered back in input order. With `cost`, the GMACs each image spent."""
    if images.ndim != 4:
        raise VitpruneError(f"images must be a (B, C, H, W) batch, got shape {list(images.shape)}")
    batch, device, last = images.shape[0], images.device, len(stages) - 1
    exit_stage = torch.full((batch,), last, dtype=torch.long, device=device)
    gmacs = torch.zeros(batch, dtype=torch.float64)
    remaining = torch.arange(batch, device=device)
    logits_out: Tensor | None = None
    pending = images
    for index, stage in enumerate(stages):
        inputs = resize_images(pending, sizes[index])
        logits = stage(inputs)
        if logits_out is None:
            logits_out = logits.new_empty((batch, logits.shape[-1]))
        if cost is not None:
            gmacs[remaining.cpu()] += cost(index, inputs)
        if index == last:
            leaving = torch.ones(len(remaining), dtype=torch.bool, device=logits.device)
        else:
            leaving = confidence(logits, criterion) >= thresholds[index]
        logits_out[remaining[leaving]] = logits[leaving]
        exit_stage[remaining[leaving]] = index
        staying = ~leaving
        remaining, pending = remaining[staying], pending[staying]
        if remaining.numel() == 0:
            break
    return CascadeRun(logits=logits_out, exit_stage=exit_stage, gmacs_per_image=gmacs if cost is not None else None)
