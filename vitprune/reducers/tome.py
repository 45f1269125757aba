"""ToMe: merge the most similar tokens by bipartite soft matching, tracking token sizes.

Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023); docs/methods.md.
Optionally the class token's attention protects informative tokens from being merged away
(MCTF's informativeness criterion, Lee et al., CVPR 2024, in an additive form): see `protect_penalty`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vitprune.reducers.common import float32_matmul, gather_tokens, shape_table


class Matching(NamedTuple):
    """Which tokens of set A merge into which of set B (indices within each set)."""

    unmerged: Tensor  # (B, Na - r) A tokens that stay
    src: Tensor  # (B, r) A tokens merged away
    dst: Tensor  # (B, r) their B partners


def protect_penalty(cls_attn: Tensor, weight: float) -> Tensor:
    """`weight` times each token's share of the class token's attention relative to an even share
    (1 = average): subtracted from a token's merge score, it keeps the tokens the class token reads
    from being averaged away, at no cost in tokens.

    cls_attn: (B, M) class-token attention over the mergeable tokens (averaged over heads).
    """
    return weight * cls_attn * cls_attn.shape[1]


def bipartite_matching(metric: Tensor, r: int, penalty: Tensor | None = None) -> Matching:
    """Split tokens alternately into A (even) and B (odd), pair each A with its most similar B
    (cosine similarity of `metric`), and choose the r best pairs to merge: the most similar, less
    the A token's `penalty` when given.

    metric: (B, M, C) of the mergeable (non-prefix) tokens; penalty: (B, M) or None. The
    similarities are float32 in any precision (`float32_matmul`).
    """
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    set_a, set_b = metric[:, ::2], metric[:, 1::2]
    similarity = float32_matmul(set_a, set_b.transpose(-1, -2))
    best_score, best_partner = similarity.max(dim=-1)
    if penalty is not None:
        best_score = best_score - penalty[:, ::2]
    ranked = best_score.argsort(dim=-1, descending=True)
    src = ranked[:, :r]
    # Unmerged tokens keep their spatial order: the next split into A and B then does not hinge on
    # near-tied scores (which differ in the last bit between runtimes, e.g. PyTorch vs ONNX Runtime).
    return Matching(unmerged=ranked[:, r:].sort(dim=-1).values, src=src, dst=best_partner.gather(1, src))


def merge_tokens(x: Tensor, size: Tensor, matching: Matching, num_prefix: int = 0) -> tuple[Tensor, Tensor]:
    """Merge by size-weighted average; sizes add. x: (B, N, C), size: (B, N, 1) float32 (sizes and
    weights stay float32 in any precision: bfloat16 counts exactly only up to 256), with `num_prefix`
    tokens first that `matching` (made on the tokens after them) leaves alone.

    Output order: the prefix tokens, the unmerged A tokens, then all B tokens.
    Every output row is one gathered input row, rescaled, plus (B rows only) a small matmul that
    adds the A tokens merged into it: gathers and a matmul run fast on every runtime, where a
    scatter-add does not (ONNX Runtime's ScatterElements) and strided A/B slices cost copies.
    One gather of x (and one of the sizes) takes a permutation of the tokens, the kept rows first
    and the merged-away A tokens last; what depends on shapes only comes from `_merge_tables`.
    """
    batch, tokens, _ = x.shape
    r = matching.src.shape[1]
    a_rows, prefix_rows, b_rows, into_b = _merge_tables(batch, tokens, num_prefix, r, x.device)
    order = torch.cat([prefix_rows, a_rows.take(matching.unmerged), b_rows, a_rows.take(matching.src)], dim=1)
    kept, merged = gather_tokens(x, order).split([tokens - r, r], dim=1)
    kept_size, merged_size = gather_tokens(size, order).split([tokens - r, r], dim=1)  # (B, N - r, 1), (B, r, 1)
    # into[b, i, j]: A token j merges into output row i (its B partner's row); float32, as the sizes
    into = F.embedding(matching.dst, into_b).transpose(1, 2)
    new_size = kept_size + float32_matmul(into, merged_size)
    weights = (into * (merged_size.transpose(1, 2) / new_size)).to(x.dtype)
    out = torch.baddbmm(kept * (kept_size / new_size).to(x.dtype), weights, merged)
    return out.to(x.dtype), new_size


def _merge_tables(batch: int, tokens: int, num_prefix: int, r: int,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The token row of each A token (num_a,); the prefix rows (B, P) and B rows (B, num_b); and
    `into_b` (num_b, N - r), float32: row j one-hot at the output row of B token j."""
    num_b = (tokens - num_prefix) // 2
    num_a = tokens - num_prefix - num_b
    a_rows = shape_table(("tome a", num_a, num_prefix, device),
                         lambda: torch.arange(num_a, device=device) * 2 + num_prefix)
    prefix_rows = shape_table(("prefix", batch, num_prefix, device),
                              lambda: torch.arange(num_prefix, device=device).expand(batch, num_prefix))
    b_rows = shape_table(("tome b", batch, num_b, num_prefix, device),
                         lambda: (torch.arange(num_b, device=device) * 2 + (num_prefix + 1)).expand(batch, num_b))
    into_b = shape_table(("tome into", tokens, num_prefix, r, device),
                         lambda: torch.eye(tokens - r, device=device)[num_prefix + num_a - r:])
    return a_rows, prefix_rows, b_rows, into_b


def tome_reduce(x: Tensor, size: Tensor, metric: Tensor, num_prefix: int, r: int,
                penalty: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Merge r pairs of non-prefix tokens; prefix tokens are never merged.

    x: (B, N, C), size: (B, N, 1), metric: (B, N, Cm) (keys averaged over heads),
    penalty: (B, N - num_prefix) per mergeable token (see `protect_penalty`) or None.
    r is capped at half the mergeable tokens.
    """
    matching = tome_match(metric, num_prefix, r, penalty)
    return (x, size) if matching is None else merge_tokens(x, size, matching, num_prefix)


def tome_match(metric: Tensor, num_prefix: int, r: int, penalty: Tensor | None = None) -> Matching | None:
    """`tome_reduce`'s matching of the tokens after the `num_prefix` first (r capped at half of
    them); None when nothing merges."""
    r = min(r, (metric.shape[1] - num_prefix) // 2)
    return None if r <= 0 else bipartite_matching(metric[:, num_prefix:], r, penalty)
