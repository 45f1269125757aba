"""Source tracking: which original patches each token stands for (ToMe's `source`, for any method).

A source matrix (B, N, M) has one row per token and one column per original patch token: row i
holds the weights with which token i is made of the patches. It starts as the identity (prefix
rows zero). Every reducer is linear in the token features once its decisions are made (EViT and
ATS gather rows, EViT's fused token is an attention-weighted sum, ToMe a size-weighted average),
and the decisions come from the attention and the keys, not from the features: so a reducer run
on the tokens with the source matrix appended as extra channels (`with_sources`) reduces the
sources exactly as it reduces the tokens. Gathers and ToMe's averages keep a row's sum at 1;
EViT's fused token weighs the dropped patches by their raw class attention, whose sum is below 1.
"""
from __future__ import annotations

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens


def initial_sources(tokens: Tensor, num_prefix: int) -> Tensor:
    """The identity source of unreduced tokens (B, P + M, C): (B, P + M, M), prefix rows zero."""
    batch, count, _ = tokens.shape
    num_patch = count - num_prefix
    eye = torch.eye(num_patch, dtype=tokens.dtype, device=tokens.device)
    source = torch.cat([eye.new_zeros(num_prefix, num_patch), eye], dim=0)
    return source.expand(batch, count, num_patch).contiguous()


def with_sources(x: Tensor, source: Tensor) -> Tensor:
    """Tokens (B, N, C) with their sources (B, N, M) appended as channels: (B, N, C + M)."""
    return torch.cat([x, source.to(x.dtype)], dim=-1)


def split_sources(x: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """The inverse of `with_sources`: (tokens (B, N, channels), sources (B, N, M))."""
    return x[..., :channels].contiguous(), x[..., channels:].contiguous()


def gather_sources(source: Tensor, index: Tensor, valid: Tensor | None = None) -> Tensor:
    """The sources of the tokens at `index` (B, K); padding rows (`valid` False) hold no patch."""
    out = gather_tokens(source, index)
    return out if valid is None else out * valid.unsqueeze(-1).to(out.dtype)


def patch_groups(source: Tensor) -> tuple[Tensor, Tensor]:
    """Per original patch: the token holding it (B, M) (-1: no token does, it was dropped) and its
    weight in that token (B, M). Tokens partition the patches, so a patch has at most one holder."""
    share, group = source.max(dim=1)
    held = share > 0
    return torch.where(held, group, torch.full_like(group, -1)), torch.where(held, share, torch.zeros_like(share))


def whole_tokens(source: Tensor) -> Tensor:
    """(B, N) True for tokens made of whole patches (a row summing to 1: a kept or merged token);
    False for prefix tokens, padding and fused tokens, whose weights sum below 1 - 1/M."""
    num_patch = source.shape[-1]
    return source.sum(dim=-1) > 1 - 0.5 / num_patch
