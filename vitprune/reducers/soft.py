"""Differentiable token reduction on dense batches, for learning how many tokens each block removes.

The tokens never leave the tensor: a token removed has mass 0 (mass = token size x alive), which
takes it out of every later attention (its weight is multiplied by the mass), while the gradient
with respect to its mass still says what keeping it would have been worth. The live tokens stay
first, in the order the real reducers (`evit_reduce`, `tome_reduce`) leave them, so with hard
(0/1) removal weights the forward pass computes what the reduced model computes.

Removal weights are straight-through: the forward pass uses the hard count, the backward pass the
gradient of a soft probability (per ranked token: the chance it is among those removed).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens
from vitprune.reducers.tome import bipartite_matching


class SoftTokens(NamedTuple):
    """Dense tokens with masses; the `alive` live ones first, then the removed ones."""

    x: Tensor  # (B, W, C)
    mass: Tensor  # (B, W): token size x alive; 0 (in the forward pass) for removed tokens
    alive: int  # tokens [0, alive) are live
    metric: Tensor  # (B, W, Cm): this block's keys averaged over heads (ToMe's similarity)
    cls_attn: Tensor  # (B, W): this block's class-token attention averaged over heads


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """`hard` in the forward pass (exactly), the gradient of `soft` in the backward pass."""
    return hard + (soft - soft.detach())


def removal_weights(hard_count: int, soft: Tensor, length: int) -> Tensor:
    """Per ranked token (the first ones are removed first): 1 for the first `hard_count`, else 0,
    with the gradient of `soft` (truncated or zero-padded to `length`)."""
    soft = soft[:length] if soft.shape[0] >= length else torch.cat([soft, soft.new_zeros(length - soft.shape[0])])
    hard = (torch.arange(length, device=soft.device) < hard_count).to(soft.dtype)
    return straight_through(hard, soft)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mass: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention with each key's weight multiplied by its mass and renormalised (ToMe's
    proportional attention for sizes, removal for mass 0). -> (output (B, H, N, hd), weights (B, H, N, W))."""
    weights = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) * mass[:, None, None, :]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v, weights


def _carried(tokens: SoftTokens) -> Tensor:
    """x, metric and class attention side by side: what a reduction moves together."""
    return torch.cat([tokens.x, tokens.metric, tokens.cls_attn.unsqueeze(-1)], dim=-1)


def _split(tokens: SoftTokens, carried: Tensor, mass: Tensor, alive: int) -> SoftTokens:
    width, metric_width = tokens.x.shape[-1], tokens.metric.shape[-1]
    return SoftTokens(x=carried[..., :width], mass=mass, alive=alive,
                      metric=carried[..., width:width + metric_width], cls_attn=carried[..., -1])


def soft_prune(tokens: SoftTokens, num_prefix: int, weights: Tensor, hard_count: int, fuse: bool = True) -> SoftTokens:
    """EViT on dense tokens: the live patch tokens the class token attends to least are removed
    first; `weights` (M,) per rank, M live patch tokens, straight-through with `hard_count` ones.

    With `fuse`, a fused token sum_j w_j a_j x_j of the removed ones (a: class attention) is added
    after the kept tokens (mass 1 when anything is removed). Kept tokens keep their order.
    """
    batch, alive = tokens.x.shape[0], tokens.alive
    device = tokens.x.device
    order = tokens.cls_attn[:, num_prefix:alive].argsort(dim=1)  # least attended first
    ranked_index = order + num_prefix
    carried = _carried(tokens)
    w = weights.unsqueeze(0).expand(batch, -1)  # (B, M) per rank
    attn = tokens.cls_attn.gather(1, ranked_index)
    fused = ((w * attn).unsqueeze(-1) * gather_tokens(carried, ranked_index)).sum(dim=1, keepdim=True)
    fused_mass = (weights[:1] if fuse else weights[:1] * 0).expand(batch, 1)
    mass = tokens.mass.scatter(1, ranked_index, tokens.mass.gather(1, ranked_index) * (1 - w))
    carried = torch.cat([carried, fused], dim=1)
    mass = torch.cat([mass, fused_mass], dim=1)
    width = tokens.x.shape[1]
    prefix = torch.arange(num_prefix, device=device).expand(batch, -1)
    kept = ranked_index[:, hard_count:].sort(dim=1).values
    fused_slot = torch.full((batch, 1), width, device=device)
    dead = torch.arange(alive, width, device=device).expand(batch, -1)
    index = torch.cat([prefix, kept, fused_slot, ranked_index[:, :hard_count], dead], dim=1)
    new_alive = num_prefix + kept.shape[1] + (1 if fuse and hard_count > 0 else 0)
    return _split(tokens, gather_tokens(carried, index), mass.gather(1, index), new_alive)


def soft_merge(tokens: SoftTokens, num_prefix: int, weights: Tensor, hard_r: int,
               penalty: Tensor | None = None) -> SoftTokens:
    """ToMe on dense tokens: bipartite matching of the live tokens (A even, B odd), the A tokens
    ranked by their best similarity (less `penalty`); `weights` (Na,) per rank, straight-through
    with `hard_r` ones, moves that share of each A token's mass (and mass-weighted content) into
    its B partner. With hard_r > 0 the live tokens end ordered as `merge_tokens` orders them."""
    batch, alive, width = tokens.x.shape[0], tokens.alive, tokens.x.shape[1]
    device = tokens.x.device
    mergeable = alive - num_prefix
    num_a, num_b = mergeable - mergeable // 2, mergeable // 2
    if num_b == 0:
        return tokens
    matching = bipartite_matching(tokens.metric[:, num_prefix:alive], num_a, penalty)
    src, dst = matching.src * 2 + num_prefix, matching.dst * 2 + num_prefix + 1  # (B, Na) in rank order
    w = weights[:num_a].unsqueeze(0).expand(batch, -1)
    moved = w * tokens.mass.gather(1, src)  # (B, Na)
    carried = _carried(tokens)
    total = carried * tokens.mass.unsqueeze(-1)
    total = total.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, carried.shape[-1]),
                              moved.unsqueeze(-1) * gather_tokens(carried, src))
    mass = tokens.mass.scatter_add(1, dst, moved)
    is_b = torch.zeros(width, dtype=torch.bool, device=device)
    is_b[num_prefix + 1:alive:2] = True
    safe = torch.where(is_b, mass, torch.ones_like(mass)).unsqueeze(-1)
    carried = torch.where(is_b[None, :, None], total / safe, carried)
    mass = mass.scatter(1, src, tokens.mass.gather(1, src) * (1 - w))
    if hard_r <= 0:
        return _split(tokens, carried, mass, alive)
    prefix = torch.arange(num_prefix, device=device).expand(batch, -1)
    b_rows = (torch.arange(num_b, device=device) * 2 + num_prefix + 1).expand(batch, -1)
    dead = torch.arange(alive, width, device=device).expand(batch, -1)
    index = torch.cat([prefix, src[:, hard_r:].sort(dim=1).values, b_rows, src[:, :hard_r], dead], dim=1)
    return _split(tokens, gather_tokens(carried, index), mass.gather(1, index), alive - hard_r)
