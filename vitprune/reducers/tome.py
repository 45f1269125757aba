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
    # Unmerged tokens keep their spatial order: the next split into A and B then does not hinge on
    # near-tied scores (which differ in the last bit between runtimes, e.g. PyTorch vs ONNX Runtime).
    return Matching(unmerged=ranked[:, r:].sort(dim=-1).values, src=src, dst=best_partner.gather(1, src))


def merge_tokens(x: Tensor, size: Tensor, matching: Matching, prefix: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Merge by size-weighted average; sizes add. x: (B, M, C), size: (B, M, 1).

    Output order: `prefix` tokens (x, size) if given, the unmerged A tokens, then all B tokens.
    """
    channels = x.shape[-1]
    weighted = x * size
    set_a, set_b = weighted[:, ::2], weighted[:, 1::2]
    size_a, size_b = size[:, ::2], size[:, 1::2]
    set_b = set_b.scatter_add(1, _expand(matching.dst, channels), set_a.gather(1, _expand(matching.src, channels)))
    size_b = size_b.scatter_add(1, _expand(matching.dst, 1), size_a.gather(1, _expand(matching.src, 1)))
    tokens = [set_a.gather(1, _expand(matching.unmerged, channels)), set_b]
    sizes = [size_a.gather(1, _expand(matching.unmerged, 1)), size_b]
    if prefix is not None:
        tokens.insert(0, prefix[0] * prefix[1])
        sizes.insert(0, prefix[1])
    new_size = torch.cat(sizes, dim=1)
    return torch.cat(tokens, dim=1) / new_size, new_size


def _expand(index: Tensor, channels: int) -> Tensor:
    return index.unsqueeze(-1).expand(-1, -1, channels)


def tome_reduce(x: Tensor, size: Tensor, metric: Tensor, num_prefix: int, r: int) -> tuple[Tensor, Tensor]:
    """Merge r pairs of non-prefix tokens; prefix tokens are never merged.

    x: (B, N, C), size: (B, N, 1), metric: (B, N, Cm) (keys averaged over heads).
    r is capped at half the mergeable tokens.
    """
    r = min(r, (x.shape[1] - num_prefix) // 2)
    if r <= 0:
        return x, size
    matching = bipartite_matching(metric[:, num_prefix:], r)
    return merge_tokens(x[:, num_prefix:], size[:, num_prefix:], matching,
                        prefix=(x[:, :num_prefix], size[:, :num_prefix]))
