"""Zero-TPrune: rank tokens by a weighted PageRank on the attention graph, prune by similarity, then by rank.

Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers" (CVPR 2024); docs/methods.md.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens, keep_prefix_and


def zerotprune_counts(num_patch: int, keep: float, similar: float) -> tuple[int, int]:
    """(patch tokens kept, of the removed ones those the similarity stage removes).

    keep: share of the M patch tokens kept (ceil, at least 1); similar: share of the removed
    tokens the similarity stage takes (rounded half up), at most the less important half, floor(M / 2).
    """
    kept = max(1, min(num_patch, math.ceil(keep * num_patch)))
    return kept, min(math.floor(similar * (num_patch - kept) + 0.5), num_patch // 2)


def pagerank_init(batch: int, tokens: int, num_prefix: int, like: Tensor) -> Tensor:
    """The starting importance (B, 1, 1, N): uniform, the prefix tokens sqrt(N) times the others; sums to 1."""
    init = like.new_ones(batch, 1, 1, tokens)
    init[..., :num_prefix] = math.sqrt(tokens)
    return init / init.sum(dim=-1, keepdim=True)


def weighted_pagerank(attn: Tensor, init: Tensor, iterations: int) -> Tensor:
    """Importance per head (B, H, N): `iterations` votes s <- A^T s from `init` (B, 1, 1, N).

    A[i, j] is query i's attention to key j (rows sum to 1), so token j collects the votes of the
    tokens attending to it, weighted by their own importance; the total stays 1.
    """
    scores = init.expand(attn.shape[0], attn.shape[1], 1, attn.shape[-1])
    for _ in range(iterations):
        scores = scores @ attn
    return scores.squeeze(2)


def emphasize_heads(scores: Tensor) -> Tensor:
    """Heads combined by their root mean square (B, H, N) -> (B, N): a token very important in a few
    heads outranks one that is middling in all (the paper's "emphasizing informative region")."""
    return scores.square().mean(dim=1).sqrt()


def similarity_survivors(importance: Tensor, metric: Tensor, remove: int) -> Tensor:
    """The similarity stage: patch tokens (indices, spatial order) left after removing `remove`.

    The less important half (floor(M / 2) lowest `importance`) forms set A, the rest set B; each A
    token finds its most similar B token (cosine of `metric`), and the `remove` A tokens with the
    most similar partners go. importance: (B, M); metric: (B, M, C).
    """
    num_patch = importance.shape[1]
    order = importance.argsort(dim=1)
    set_a, set_b = order[:, : num_patch // 2], order[:, num_patch // 2:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    best = (gather_tokens(metric, set_a) @ gather_tokens(metric, set_b).transpose(1, 2)).max(dim=-1).values
    stay_a = set_a.gather(1, best.argsort(dim=1)[:, : set_a.shape[1] - remove])
    return torch.cat([stay_a, set_b], dim=1).sort(dim=1).values


def sub_attention(attn: Tensor, index: Tensor) -> Tensor:
    """The attention among the tokens at `index` (B, K), rows renormalised to sum 1: (B, H, K, K)."""
    heads, tokens = attn.shape[1], attn.shape[-1]
    rows = attn.gather(2, index[:, None, :, None].expand(-1, heads, -1, tokens))
    sub = rows.gather(3, index[:, None, None, :].expand(-1, heads, index.shape[1], -1))
    return sub / sub.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sub.dtype).tiny)


def zerotprune_reduce(x: Tensor, size: Tensor | None, attn: Tensor, metric: Tensor, num_prefix: int,
                      keep_count: int, similar_count: int, iterations: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """One Zero-TPrune layer: a one-vote ranking (I'), the similarity stage (S), then the full
    ranking (I) on the attention among the survivors, keeping its `keep_count` top patch tokens.

    x: (B, N, C), prefix first; attn: (B, H, N, N) softmax attention of this block; metric:
    (B, N, Cm) keys averaged over heads; size: (B, N, 1) ToMe sizes or None, carried along.
    Returns (tokens (B, P + keep_count, C), sizes, kept indices into x), kept tokens in spatial order.
    """
    batch, tokens = x.shape[:2]
    first = emphasize_heads(weighted_pagerank(attn, pagerank_init(batch, tokens, num_prefix, attn), 1))
    survivors = similarity_survivors(first[:, num_prefix:], metric[:, num_prefix:], similar_count)
    index = keep_prefix_and(survivors, num_prefix)
    init = pagerank_init(batch, index.shape[1], num_prefix, attn)
    importance = emphasize_heads(weighted_pagerank(sub_attention(attn, index), init, iterations))
    best = importance[:, num_prefix:].topk(keep_count, dim=1).indices
    index = keep_prefix_and(survivors.gather(1, best).sort(dim=1).values, num_prefix)
    return gather_tokens(x, index), None if size is None else gather_tokens(size, index), index
