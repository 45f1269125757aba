"""PPT: per image, prune or pool (merge) r tokens, by the variance of the significance scores.

Wu, Zeng, Wang, Wang and Chen, "PPT: Token Pruning and Pooling for Efficient Vision Transformers"
(arXiv 2310.01812, 2023); docs/methods.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vitprune.methods.base import BlockContext, Method, Param, TokenState, cls_row_macs, stage_layers
from vitprune.reducers import ats_scores, cls_attention, ppt_reduce


class PPT(Method):
    name = "ppt"
    paper = "Wu et al., PPT: Token Pruning and Pooling for Efficient Vision Transformers (arXiv 2310.01812)"
    holds_patches = True
    params = (
        Param("r", int, "patch tokens each reducing block removes, pruned or pooled", default=50, counts_tokens=True),
        # the significance scores sum to 1 over the tokens: their variance is below 1
        Param("threshold", float, "variance of the significance scores from which an image prunes instead of pooling",
              default=7e-5, high=1.0),
    )

    def default_layers(self, depth: int) -> list[int]:
        """The 4th, 7th and 10th of 12 blocks (the official DeiT setting), scaled to the depth."""
        return stage_layers(depth)

    def needs_class_token(self, settings: dict[str, Any]) -> bool:
        return True

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        size = ctx.state.size if ctx.state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        cls_attn = cls_attention(ctx.q[:, :, :1], ctx.k, ctx.scale, ctx.key_bias)
        scores = ats_scores(cls_attn, ctx.v, ctx.num_prefix)
        x, size, _, holders = ppt_reduce(x, size, scores, ctx.k.mean(dim=1), ctx.num_prefix, settings["r"],
                                         settings["threshold"], holders=ctx.state.grid is not None)
        return x, replace(ctx.state, size=size, holders=holders)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        """The class-token row; for every image both policies run: ToMe's similarities and merge
        (the rows gathered into each output, r per image) beside the pruning's sort."""
        mergeable, removed = n_in - num_prefix, n_in - n_out
        similarity = torch.ceil(mergeable / 2) * torch.floor(mergeable / 2) * costs.head_dim
        merge = n_out * removed * (costs.width + 1)
        return cls_row_macs(costs, n_in) + torch.where(removed > 0, similarity + merge, 0.0)
