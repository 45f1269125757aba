"""PPT: per image, prune the least significant tokens or pool (merge) similar ones, by how peaked the scores are.

Wu, Zeng, Wang, Wang and Chen, "PPT: Token Pruning and Pooling for Efficient Vision Transformers"
(arXiv 2310.01812, 2023); docs/methods.md.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens, keep_prefix_and
from vitprune.reducers.patch_grid import index_holders, merge_holders, same_holders
from vitprune.reducers.tome import merge_tokens, tome_match


def ppt_prunes(scores: Tensor, threshold: float) -> Tensor:
    """Which images prune (B,) bool: the variance (unbiased) of their normalised significance scores
    (B, M) reaches `threshold`; the others pool. Peaked scores mean inattentive tokens to drop,
    flat ones mean duplicates to merge."""
    return scores.var(dim=1) >= threshold


def ppt_reduce(x: Tensor, size: Tensor, scores: Tensor, metric: Tensor, num_prefix: int, r: int,
               threshold: float, holders: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Remove r patch tokens from every image, each image by its own policy (so the batch stays dense).

    Pruning keeps the M - r most significant patch tokens (spatial order); pooling is ToMe's
    bipartite merge of r pairs on `metric`. x: (B, N, C); size: (B, N, 1); scores: (B, M)
    significance of the patch tokens; metric: (B, N, Cm). r is capped at floor(M / 2).
    Returns (tokens, sizes, the images that pruned (B,), with `holders` the output row holding
    each input token (B, N) (vitprune.reducers.patch_grid) else None).
    """
    batch, tokens = x.shape[:2]
    num_patch = tokens - num_prefix
    r = min(r, num_patch // 2)
    prunes = ppt_prunes(scores, threshold)
    if r <= 0:
        return x, size, prunes, same_holders(tokens, batch, x.device) if holders else None
    kept = scores.topk(num_patch - r, dim=1).indices.sort(dim=1).values
    index = keep_prefix_and(kept, num_prefix)
    matching = tome_match(metric, num_prefix, r)
    pooled, pooled_size = merge_tokens(x, size, matching, num_prefix)
    choose = prunes[:, None, None]
    held_by = None
    if holders:
        held_by = torch.where(prunes[:, None], index_holders(index, tokens), merge_holders(matching, tokens, num_prefix))
    return (torch.where(choose, gather_tokens(x, index), pooled),
            torch.where(choose, gather_tokens(size, index), pooled_size), prunes, held_by)
