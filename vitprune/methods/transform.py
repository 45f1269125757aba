"""Token Transforming: the kept tokens are a many-to-many transformation of all tokens.

Zeng, Yu, Kong and Tang, "Token Transforming: A Unified and Training-Free Token Compression
Framework for Vision Transformer Acceleration" (arXiv 2506.05709, 2025); docs/methods.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import Tensor

from vitprune.methods.base import BlockContext, Method, Param, TokenState, cls_row_macs, stage_layers
from vitprune.reducers import cls_attention, evit_keep_count, transform_reduce


class TokenTransforming(Method):
    name = "transform"
    paper = "Zeng, Yu, Kong and Tang, Token Transforming: A Unified and Training-Free Token Compression Framework for Vision Transformer Acceleration (arXiv 2506.05709)"
    no_patch_grid = ("each of its tokens blends several patches and each patch is spread over several tokens: "
                     "no token holds a patch")
    params = (
        Param("keep", float, "share of the patch tokens entering the block kept as outputs", default=0.63,
              high=1.0, low_open=True),
        Param("neighbours", int, "kept tokens each token is spread over", default=4, low=1, counts_tokens=True),
        Param("temperature", float, "softmax temperature of the cosine similarities", default=0.03, high=1000.0,
              low_open=True),
    )

    def default_layers(self, depth: int) -> list[int]:
        """The 4th, 7th and 10th of 12 blocks, scaled to the depth."""
        return stage_layers(depth)

    def needs_class_token(self, settings: dict[str, Any]) -> bool:
        return True

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        size = ctx.state.size if ctx.state.size is not None else x.new_ones(x.shape[0], x.shape[1], 1)
        cls_attn = cls_attention(ctx.q[:, :, :1], ctx.k, ctx.scale, ctx.key_bias).mean(dim=1)
        keep_count = evit_keep_count(x.shape[1] - ctx.num_prefix, settings["keep"])
        x, size = transform_reduce(x, size, cls_attn, ctx.k.mean(dim=1), ctx.num_prefix, keep_count,
                                   settings["neighbours"], settings["temperature"])
        return x, replace(ctx.state, size=size)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        """The class-token row, the M x K key similarities and the K x M transformation of the tokens."""
        patch, kept = n_in - num_prefix, n_out - num_prefix
        return cls_row_macs(costs, n_in) + patch * kept * (costs.head_dim + costs.width)
