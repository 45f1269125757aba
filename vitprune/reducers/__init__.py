"""Token reducers: pure functions on tensors, independent of any model code.

Each reducer takes token tensors (batch-first, prefix tokens first) and scores, and returns the
reduced tokens. The timm adapter (`vitprune.patch`) decides where they run.
"""
from vitprune.reducers.ats import ats_cap, ats_sample, ats_scores, ats_select
from vitprune.reducers.common import cls_attention, gather_tokens
from vitprune.reducers.evit import evit_keep_count, evit_reduce
from vitprune.reducers.soft import (
    SoftTokens,
    masked_attention,
    removal_weights,
    soft_merge,
    soft_prune,
    straight_through,
)
from vitprune.reducers.tome import bipartite_matching, merge_tokens, protect_penalty, tome_reduce

__all__ = [
    "cls_attention", "gather_tokens",
    "evit_keep_count", "evit_reduce",
    "ats_cap", "ats_scores", "ats_sample", "ats_select",
    "bipartite_matching", "merge_tokens", "protect_penalty", "tome_reduce",
    "SoftTokens", "masked_attention", "removal_weights", "soft_merge", "soft_prune", "straight_through",
]
