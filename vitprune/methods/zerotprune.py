"""Zero-TPrune: weighted PageRank importance on the attention graph, then similarity and importance pruning.

Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers" (CVPR 2024); docs/methods.md.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from vitprune.errors import VitpruneError
from vitprune.methods.base import BlockContext, Method, Param, TokenState, stage_layers
from vitprune.reducers import index_holders, zerotprune_counts, zerotprune_reduce


class ZeroTPrune(Method):
    name = "zerotprune"
    paper = "Wang, Dedhia and Jha, Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in Pre-Trained Transformers (CVPR 2024)"
    params = (
        Param("keep", float, "share of the patch tokens entering the block kept", default=0.7, high=1.0,
              low_open=True),
        Param("similar", float, "share of the removed tokens that the similarity stage removes", default=0.5,
              high=1.0),
        Param("iters", int, "weighted-PageRank votes of the ranking stage", default=30, low=1, high=1000),
    )
    needs_attention = True
    holds_patches = True

    def default_layers(self, depth: int) -> list[int]:
        """The 4th, 7th and 10th of 12 blocks (the stage blocks of EViT and ATS), scaled to the depth."""
        return stage_layers(depth)

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        if ctx.attn is None:
            raise VitpruneError("zerotprune needs the block's attention probabilities, and the adapter gave none")
        keep_count, similar_count = zerotprune_counts(x.shape[1] - ctx.num_prefix, settings["keep"], settings["similar"])
        tokens = x.shape[1]
        x, size, index = zerotprune_reduce(x, ctx.state.size, ctx.attn, ctx.k.mean(dim=1), ctx.num_prefix,
                                           keep_count, similar_count, settings["iters"])
        holders = None if ctx.state.grid is None else index_holders(index, tokens)
        return x, replace(ctx.state, size=size, holders=holders)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        """One vote on all tokens, the A x B key similarities, `iters` votes among the survivors
        (the attention itself is the block's own)."""
        patch = n_in - num_prefix
        similar = torch.tensor([zerotprune_counts(int(m), settings["keep"], settings["similar"])[1] for m in patch],
                               dtype=torch.float64)
        half = torch.floor(patch / 2)
        survivors = n_in - similar
        return (costs.num_heads * (n_in ** 2 + settings["iters"] * survivors ** 2)
                + half * (patch - half) * costs.head_dim)
