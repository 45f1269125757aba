"""EViT: keep the patch tokens the class token attends to most, fuse the rest into one token.

Liang et al., "Not All Patches are What You Need" (ICLR 2022); docs/methods.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vitprune.methods.base import (
    BlockContext,
    Method,
    Param,
    TokenState,
    attention_score_macs,
    attention_score_name,
    attention_scores,
    stage_layers,
)
from vitprune.reducers import SoftTokens, evit_keep_count, evit_reduce, index_holders, removal_weights, soft_prune


class EViT(Method):
    name = "evit"
    paper = "Liang et al., Not All Patches are What You Need (ICLR 2022)"
    params = (
        Param("keep", float, "keep rate of the patch tokens entering the block", high=1.0, low_open=True),
        Param("fuse", bool, "fuse the dropped tokens into one token (False: drop them)", default=True),
    )
    soft_searchable = True
    holds_patches = True  # the fused token stands for no patch: the dropped ones keep their own features

    def default_layers(self, depth: int) -> list[int]:
        """The 4th, 7th and 10th of 12 blocks, scaled to the depth."""
        return stage_layers(depth)

    def token_score(self, settings: dict[str, Any], class_token: bool) -> str | None:
        return attention_score_name(class_token)

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        cls_attn = attention_scores(ctx).mean(dim=1)  # the class token's attention, or the fallback
        keep_count = evit_keep_count(x.shape[1] - ctx.num_prefix, settings["keep"])
        tokens = x.shape[1]
        x, size, index = evit_reduce(x, cls_attn, ctx.num_prefix, keep_count, settings["fuse"], ctx.state.size)
        holders = None if ctx.state.grid is None else index_holders(index, tokens)
        return x, replace(ctx.state, size=size, holders=holders)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        macs = attention_score_macs(costs, n_in, class_token)
        if not settings["fuse"]:
            return macs
        patch = n_in - num_prefix
        kept = torch.clamp(torch.ceil(settings["keep"] * patch), min=1).minimum(patch)  # evit_keep_count
        return macs + (patch - kept) * costs.width  # the dropped tokens' weighted sum

    def soft_reduce(self, tokens: SoftTokens, num_prefix: int, settings: dict[str, Any] | None,
                    soft: Tensor) -> SoftTokens:
        patch = tokens.alive - num_prefix
        dropped = 0 if settings is None else patch - evit_keep_count(patch, settings["keep"])
        fuse = True if settings is None else settings["fuse"]
        return soft_prune(tokens, num_prefix, removal_weights(dropped, soft, patch), dropped, fuse)
