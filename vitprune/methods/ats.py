"""ATS: adaptive token sampling, a different number of kept tokens per image.

Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers" (ECCV 2022); docs/methods.md.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from vitprune.methods.base import (
    MAX_TOKENS,
    BlockContext,
    Method,
    Param,
    TokenState,
    attention_score_macs,
    attention_score_name,
    attention_scores,
)
from vitprune.reducers import ats_cap, ats_sample, ats_scores, ats_select, gather_tokens, graph_capture


class ATS(Method):
    name = "ats"
    paper = "Fayyaz et al., Adaptive Token Sampling for Efficient Vision Transformers (ECCV 2022)"
    params = (
        Param("keep", float, "cap K: a ratio in (0, 1] of the tokens entering the model, or a whole count > 1",
              low_open=True, counts_tokens=True, check=lambda value: value <= 1 or value == int(value),
              rule=f"a ratio in (0, 1] or a whole token count in [2, {MAX_TOKENS}]"),
    )
    varies_per_image = True
    needs_token_pooling = True
    selects_queries = True
    holds_patches = True  # a selection: the adapter reads which tokens it kept

    def default_layers(self, depth: int) -> list[int]:
        """Every block from the 4th of 12 (the official DeiT-S setting)."""
        return list(range(round(depth / 4), depth))

    def token_score(self, settings: dict[str, Any], class_token: bool) -> str | None:
        return attention_score_name(class_token)

    def select(self, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        """Sample first, then attend with the kept queries only: the output projection and the
        MLP run on the kept tokens (ATS applies the selection to the attention rows)."""
        num_prefix = ctx.num_prefix
        cls_attn = attention_scores(ctx)  # the class token's attention, or the fallback
        scores = ats_scores(cls_attn, ctx.v, num_prefix, ctx.state.valid)
        samples = ats_cap(settings["keep"], ctx.num_input_tokens) - num_prefix
        valid_patch = None if ctx.state.valid is None else ctx.state.valid[:, num_prefix:]
        index, valid = ats_select(ats_sample(scores, max(samples, 1), valid_patch), num_prefix, pad_to=ctx.pad_to)
        if index.shape[0] == 1 and ctx.pad_to is None and not graph_capture():
            valid = None  # one image is never padded: no mask, and the next blocks run unpacked
        size = gather_tokens(ctx.state.size, index) if ctx.state.size is not None else None
        return index, TokenState(size=size, valid=valid)

    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        return attention_score_macs(costs, n_in, class_token)

    def static_width(self, settings: dict[str, Any], num_input_tokens: int) -> int:
        """The most tokens a block can keep: the width of static-shape padding."""
        return ats_cap(settings["keep"], num_input_tokens)
