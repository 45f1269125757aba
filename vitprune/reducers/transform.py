"""Token Transforming: every dropped token spreads over the kept ones it resembles (a many-to-many transformation).

Zeng, Yu, Kong and Tang, "Token Transforming: A Unified and Training-Free Token Compression
Framework for Vision Transformer Acceleration" (arXiv 2506.05709, 2025); docs/methods.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens


def transform_matrix(metric: Tensor, targets: Tensor, neighbours: int, temperature: float) -> Tensor:
    """W (B, M, K): how much of each of the M tokens goes to each of the K targets; rows sum to 1.

    A target stays wholly itself. Every other token is shared by its `neighbours` most similar
    targets (cosine of `metric`) by a softmax of their similarity over `temperature`; the other
    targets get nothing. metric: (B, M, C); targets: (B, K) indices among the M tokens.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric @ gather_tokens(metric, targets).transpose(1, 2)
    kth = similarity.topk(min(neighbours, targets.shape[1]), dim=2).values[..., -1:]
    logits = (similarity / temperature).masked_fill(similarity < kth, float("-inf"))
    is_target = targets.unsqueeze(1) == torch.arange(metric.shape[1], device=metric.device).view(1, -1, 1)
    return torch.where(is_target.any(dim=2, keepdim=True), is_target.to(logits.dtype), logits.softmax(dim=2))


def transform_reduce(x: Tensor, size: Tensor, cls_attn: Tensor, metric: Tensor, num_prefix: int, keep_count: int,
                     neighbours: int, temperature: float) -> tuple[Tensor, Tensor]:
    """Y = normalise(W^T diag(s)) X on the patch tokens: K = `keep_count` outputs, at the patch tokens
    the class token attends to most; each output is the size-weighted mean of what it receives,
    and its size the mass it receives (the sizes' total is kept, for proportional attention).

    x: (B, N, C) prefix first; size: (B, N, 1); cls_attn: (B, N) averaged over heads; metric: (B, N, Cm).
    Returns (tokens (B, P + K, C), sizes (B, P + K, 1)); the outputs follow the kept tokens' spatial order.
    """
    targets = cls_attn[:, num_prefix:].topk(keep_count, dim=1).indices.sort(dim=1).values
    weights = transform_matrix(metric[:, num_prefix:], targets, neighbours, temperature)
    mass = (weights * size[:, num_prefix:]).transpose(1, 2)  # (B, K, M)
    new_size = mass.sum(dim=2, keepdim=True)
    out = (mass @ x[:, num_prefix:]) / new_size
    return torch.cat([x[:, :num_prefix], out], dim=1), torch.cat([size[:, :num_prefix], new_size], dim=1)
