"""Rotary position embeddings (RoPE) through token reduction: which rotation a reduced token has.

timm's rotary ViTs (the Eva class: EVA-02, DINOv3, Perception Encoder, RoPE ViTs) rotate each
patch token's queries and keys by angles set by its grid position, one angle per frequency, held
as the concatenation [sin | cos] of those angles (timm.layers.apply_rot_embed_cat). The rotations
ride through a reduction as extra channels of the tokens (as the sources do, vitprune.reducers.
sources), so a kept token keeps its own rotation exactly; a token made of several (ToMe's
size-weighted average, EViT's attention-weighted fused token, Token Transforming's mixtures) gets
the weighted sum of its members' (sin, cos) pairs, which `unit_rotations` turns back into a
rotation: the weighted circular mean of their angles, per frequency (docs/methods.md argues it).
"""
from __future__ import annotations

import torch
from torch import Tensor

MERGED = 1e-4  # a (sin, cos) pair this far from unit length is a weighted sum, not one token's rotation


def identity_rotations(count: int, like: Tensor) -> Tensor:
    """`count` rows of the rotation by zero ([sin | cos] = [0 | 1]): the prefix tokens, which timm
    does not rotate. like: (N, 2D) rotations."""
    half = like.shape[-1] // 2
    return torch.cat([like.new_zeros(count, half), like.new_ones(count, half)], dim=-1)


def token_rotations(rope: Tensor, num_prefix: int, batch: int) -> Tensor:
    """Per token rotations (B, P + N, 2D) from timm's patch rotations (N, 2D): prefix rows identity."""
    rows = torch.cat([identity_rotations(num_prefix, rope), rope], dim=0)
    return rows.unsqueeze(0).expand(batch, -1, -1)


def unit_rotations(rope: Tensor) -> Tensor:
    """Weighted sums of (sin, cos) pairs (B, N, 2D) back to rotations: each pair scaled to unit
    length, the circular mean of the angles summed (none: no rotation). Pairs already of unit
    length (kept tokens) are returned as they are, bit for bit."""
    sin, cos = rope.chunk(2, dim=-1)
    length = torch.sqrt(sin * sin + cos * cos)
    merged = (length - 1).abs() > MERGED
    empty = length < 1e-12
    scale = length.clamp_min(1e-12)
    sin = torch.where(merged, torch.where(empty, torch.zeros_like(sin), sin / scale), sin)
    cos = torch.where(merged, torch.where(empty, torch.ones_like(cos), cos / scale), cos)
    return torch.cat([sin, cos], dim=-1)
