"""ToMe: merge the most similar tokens by bipartite soft matching, tracking token sizes.

Bolya et al., "Token Merging: Your ViT but Faster" (ICLR 2023); docs/methods.md. `protect`
weighs the class token's attention against merging a token (MCTF's informativeness, additive).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vitprune.methods.base import CLS_SCORE, BlockContext, Method, Param, TokenState, cls_row_macs
from vitprune.reducers import (
    SoftTokens,
    cls_attention,
    merge_holders,
    merge_tokens,
    protect_penalty,
    removal_weights,
    same_holders,
    soft_merge,
    tome_match,
)


class ToMe(Method):
    name = "tome"
    paper = "Bolya et al., Token Merging: Your ViT but Faster (ICLR 2023)"
    params = (
        Param("r", int, "token pairs merged in the block", counts_tokens=True),
        Param("protect", float, "weight of the class token's attention against merging a token (0: plain ToMe)",
              default=0.0, high=1000.0),
    )
    merges = True
    holds_patches = True
    soft_searchable = True

    def needs_class_token(self, settings: dict[str, Any]) -> bool:
        return bool(settings["protect"])

    def token_score(self, settings: dict[str, Any], class_token: bool) -> str | None:
        return CLS_SCORE if settings["protect"] else None

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        size = ctx.state.size if ctx.state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1,
                                                                             dtype=torch.float32)
        penalty = None
        if settings["protect"]:
            cls_attn = cls_attention(ctx.q[:, :, :1], ctx.k, ctx.scale, ctx.key_bias).mean(dim=1)
            penalty = protect_penalty(cls_attn[:, ctx.num_prefix:], settings["protect"])
        matching = tome_match(ctx.k.mean(dim=1), ctx.num_prefix, settings["r"], penalty)
        holders = None
        if ctx.state.grid is not None:
            holders = (same_holders(x.shape[1], x.shape[0], x.device) if matching is None
                       else merge_holders(matching, x.shape[1], ctx.num_prefix))
        if matching is not None:
            x, size = merge_tokens(x, size, matching, ctx.num_prefix)
        return x, replace(ctx.state, size=size, holders=holders)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        mergeable, merged = n_in - num_prefix, n_in - n_out
        similarity = torch.ceil(mergeable / 2) * torch.floor(mergeable / 2) * costs.head_dim
        merge = n_out * merged * (costs.width + 1)  # the merged rows added into each output, and their sizes
        macs = torch.where(merged > 0, similarity + merge, 0.0)  # ToMe skips matching when r = 0
        return macs + cls_row_macs(costs, n_in) if settings["protect"] else macs

    def soft_reduce(self, tokens: SoftTokens, num_prefix: int, settings: dict[str, Any] | None,
                    soft: Tensor) -> SoftTokens:
        mergeable = tokens.alive - num_prefix
        cap = mergeable // 2
        r = 0 if settings is None else min(settings["r"], cap)
        penalty = None
        if settings is not None and settings["protect"]:
            penalty = protect_penalty(tokens.cls_attn[:, num_prefix:tokens.alive], settings["protect"])
        return soft_merge(tokens, num_prefix, removal_weights(r, soft[:cap], mergeable - cap), r, penalty)
