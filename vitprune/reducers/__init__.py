"""Token reducers: pure functions on tensors, independent of any model code.

Each reducer takes token tensors (batch-first, prefix tokens first) and scores, and returns the
reduced tokens. The timm adapter (`vitprune.patch`) decides where they run.
"""
from vitprune.reducers.ats import ats_cap, ats_sample, ats_scores, ats_select
from vitprune.reducers.attention import received_attention
from vitprune.reducers.common import attention_probs, cls_attention, gather_tokens, graph_capture
from vitprune.reducers.evit import evit_keep_count, evit_reduce
from vitprune.reducers.patch_grid import PatchGrid, index_holders, merge_holders, same_holders
from vitprune.reducers.ppt import ppt_prunes, ppt_reduce
from vitprune.reducers.rope import token_rotations, unit_rotations
from vitprune.reducers.soft import (
    SoftTokens,
    masked_attention,
    removal_weights,
    soft_merge,
    soft_prune,
    straight_through,
)
from vitprune.reducers.tome import bipartite_matching, merge_tokens, protect_penalty, tome_match, tome_reduce
from vitprune.reducers.transform import transform_matrix, transform_reduce
from vitprune.reducers.zerotprune import weighted_pagerank, zerotprune_counts, zerotprune_reduce

__all__ = [
    "attention_probs", "cls_attention", "gather_tokens", "graph_capture", "received_attention",
    "evit_keep_count", "evit_reduce",
    "ats_cap", "ats_scores", "ats_sample", "ats_select",
    "bipartite_matching", "merge_tokens", "protect_penalty", "tome_match", "tome_reduce",
    "ppt_prunes", "ppt_reduce",
    "PatchGrid", "index_holders", "merge_holders", "same_holders",
    "transform_matrix", "transform_reduce",
    "weighted_pagerank", "zerotprune_counts", "zerotprune_reduce",
    "token_rotations", "unit_rotations",
    "SoftTokens", "masked_attention", "removal_weights", "soft_merge", "soft_prune", "straight_through",
]
