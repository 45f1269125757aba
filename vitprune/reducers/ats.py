"""ATS: adaptive token sampling, a per-image number of kept tokens.

Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers" (ECCV 2022); docs/methods.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitprune.reducers.common import keep_prefix_and, shape_table


def ats_cap(keep: float, num_input_tokens: int) -> int:
    """The cap K: a ratio in (0, 1] of the tokens entering the model, or an absolute count (> 1)."""
    if keep <= 1:
        return max(2, math.ceil(keep * num_input_tokens))
    return int(keep)


def ats_scores(cls_attn: Tensor, v: Tensor, num_prefix: int, valid: Tensor | None = None) -> Tensor:
    """Significance of each patch token, normalised to sum 1: (B, N - P).

    s_j = sum_h A[h, 0, j] * ||v_j||, with ||v_j|| the norm of token j's value over all heads.
    cls_attn: (B, H, N); v: (B, H, N, hd); valid: (B, N) False on padding.
    """
    value_norm = v.float().transpose(1, 2).flatten(2).norm(dim=-1)  # float32: the CDF is sampled
    scores = (cls_attn.sum(dim=1) * value_norm)[:, num_prefix:]
    if valid is not None:
        scores = scores * valid[:, num_prefix:]
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def ats_sample(scores: Tensor, num_samples: int, valid: Tensor | None = None) -> Tensor:
    """Inverse transform sampling of the score CDF at `num_samples` evenly spaced points on [0, 1].

    Each point picks the token whose CDF value is nearest; picks repeat on peaked distributions,
    so the number of distinct kept tokens adapts to the image. scores: (B, M) summing to 1;
    valid: (B, M) False on padding (never kept). Returns a keep mask (B, M).
    """
    sorted_scores, order = scores.sort(dim=1)
    cdf = sorted_scores.cumsum(dim=1)
    if valid is not None:  # padding (score 0, sorted first) is never the nearest: the batch picks what one image would
        cdf = cdf.masked_fill(~valid.gather(1, order), torch.inf)
    device, dtype = scores.device, scores.dtype
    points = shape_table(("ats points", num_samples, device, dtype),
                         lambda: torch.linspace(0, 1, num_samples, device=device, dtype=dtype).view(1, -1, 1))
    nearest = (cdf.unsqueeze(1) - points).abs().argmin(dim=2)
    picked = order.gather(1, nearest)
    # scatter with a tensor source (not a Python bool): the ONNX exporter needs it
    picks = shape_table(("ats picks", picked.shape, device), lambda: torch.ones_like(picked, dtype=torch.bool))
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(1, picked, picks)
    if valid is not None:
        keep = keep & valid
    return keep


def ats_select(keep: Tensor, num_prefix: int, pad_to: int | None = None) -> tuple[Tensor, Tensor]:
    """Token indices for a batch with a different kept count per image.

    The batch is padded only to its largest kept count (or to `pad_to`, for static shapes);
    padding repeats some token and is marked invalid, so attention masks it out.
    keep: (B, M) mask over the patch tokens. Returns (index (B, P + K), valid (B, P + K)).
    """
    num_patch = keep.shape[1]
    # While tracing for ONNX the width stays a tensor, so the exported graph pads each batch to its
    # own largest count (a TopK with a computed K) instead of freezing the traced batch's count.
    width = keep.sum(dim=1).max() if pad_to is None else pad_to
    if pad_to is None and not torch.jit.is_tracing():
        width = int(width)
    # The kept patch tokens first, in their spatial order: the smallest `width` of unique keys
    # (a TopK, which ONNX has; a stable sort has no ONNX form).
    spatial = shape_table(("arange", num_patch, keep.device), lambda: torch.arange(num_patch, device=keep.device))
    order_key = (~keep).to(torch.int64) * num_patch + spatial
    kept_first = order_key.topk(width, dim=1, largest=False, sorted=True).indices
    valid_patch = keep.gather(1, kept_first)
    valid_prefix = valid_patch.new_ones(keep.shape[0], num_prefix)
    return keep_prefix_and(kept_first, num_prefix), torch.cat([valid_prefix, valid_patch], dim=1)
