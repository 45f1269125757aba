"""EViT: keep the patch tokens the CLS token attends to most, fuse the rest into one token.

Liang et al., "Not All Patches are What You Need" (ICLR 2022); docs/methods.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens, keep_prefix_and


def evit_keep_count(num_patch_tokens: int, keep_rate: float) -> int:
    """k = ceil(keep_rate * (N - P)), at least one token."""
    return max(1, min(num_patch_tokens, math.ceil(keep_rate * num_patch_tokens)))


def evit_reduce(
    x: Tensor,
    cls_attn: Tensor,
    num_prefix: int,
    keep_count: int,
    fuse: bool = True,
    size: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Keep the `keep_count` most attentive patch tokens (spatial order kept).

    x: (B, N, C) tokens, prefix first; cls_attn: (B, N) CLS attention averaged over heads;
    size: optional (B, N, 1) token sizes (from ToMe), carried along.
    With `fuse`, the dropped tokens become one extra token sum_j a_j x_j (raw attention weights,
    as the official code) appended after the kept ones.
    Returns (tokens, sizes or None, kept token indices (B, P + k) into x).
    """
    patch_scores = cls_attn[:, num_prefix:]
    order = patch_scores.argsort(dim=1, descending=True)
    kept = order[:, :keep_count].sort(dim=1).values
    index = keep_prefix_and(kept, num_prefix)
    out = gather_tokens(x, index)
    out_size = gather_tokens(size, index) if size is not None else None
    dropped = order[:, keep_count:]
    if fuse and dropped.shape[1] > 0:
        weights = patch_scores.gather(1, dropped).unsqueeze(1).to(x.dtype)
        fused = weights @ gather_tokens(x, dropped + num_prefix)
        out = torch.cat([out, fused.to(x.dtype)], dim=1)
        if out_size is not None:
            # The fused token is a weighted sum, not an average of tokens: it counts as one.
            out_size = torch.cat([out_size, out_size.new_ones(out_size.shape[0], 1, 1)], dim=1)
    return out, out_size, index

