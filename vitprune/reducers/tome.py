"""ToMe: merge the most similar tokens by bipartite soft matching, tracking token sizes.

Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023); see METHODS.md.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Matching(NamedTuple):
    """Which tokens of set A merge into which of set B (indices within each set)."""

    unmerged: Tensor  # (B, Na - r) A tokens that stay
    src: Tensor  # (B, r) A tokens merged away
    dst: Tensor  # (B, r) their B partners


def bipartite_matching(metric: Tensor, r: int) -> Matching:
    """Split tokens alternately into A (even) and B (odd), pair each A with its most similar B
    (cosine similarity of `metric`), and choose the r most similar pairs to merge.

    metric: (B, M, C) of the mergeable (non-prefix) tokens.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a, set_b = metric[:, ::2], metric[:, 1::2]
    similarity = set_a @ set_b.transpose(-1, -2)
    best_score, best_partner = similarity.max(dim=-1)
    ranked = best_score.argsort(dim=-1, descending=True)
    src = ranked[:, :r]
    return Matching(unmerged=ranked[:, r:], src=src, dst=best_partner.gather(1, src))


def merge_tokens(x: Tensor, size: Tensor, matching: Matching) -> tuple[Tensor, Tensor]:
    """Merge by size-weighted average; sizes add. x: (B, M, C), size: (B, M, 1).

    Output order: the unmerged A tokens, then all B tokens.
    """
    weighted = torch.cat([x * size, size], dim=-1)
    set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
    channels = weighted.shape[-1]
    kept_a = set_a.gather(1, matching.unmerged.unsqueeze(-1).expand(-1, -1, channels))
    moved = set_a.gather(1, matching.src.unsqueeze(-1).expand(-1, -1, channels))
    set_b = set_b.scatter_add(1, matching.dst.unsqueeze(-1).expand(-1, -1, channels), moved)
    merged = torch.cat([kept_a, set_b], dim=1)
    new_size = merged[..., -1:]
    return merged[..., :-1] / new_size, new_size


def tome_reduce(x: Tensor, size: Tensor, metric: Tensor, num_prefix: int, r: int) -> tuple[Tensor, Tensor]:
    """Merge r pairs of non-prefix tokens; prefix tokens are never merged.

    x: (B, N, C), size: (B, N, 1), metric: (B, N, Cm) (keys averaged over heads).
    r is capped at half the mergeable tokens.
    """
    r = min(r, (x.shape[1] - num_prefix) // 2)
    if r <= 0:
        return x, size
    matching = bipartite_matching(metric[:, num_prefix:], r)
    merged, merged_size = merge_tokens(x[:, num_prefix:], size[:, num_prefix:], matching)
    return (
        torch.cat([x[:, :num_prefix], merged], dim=1),
        torch.cat([size[:, :num_prefix], merged_size], dim=1),
    )
