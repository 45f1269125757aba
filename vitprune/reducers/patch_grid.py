"""Reduced tokens back on the patch grid (ToMe's "unmerge"), for dense outputs.

A reduction sends each token entering it to one output row (kept, or merged into that row) or
drops it (pruned, or fused into EViT's summary token, which stands for no patch). `holders`
(B, N_in) says which: the output row, or -1. Followed block after block, the patch map (B, M)
gives, for each original patch, the row of the token that holds it now: O(N) integers instead of
the N x M source matrix. A patch that is dropped keeps the features its token had when it entered
the block that dropped it (stored once, (B, M, C)), so every patch has features in every block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitprune.reducers.common import gather_tokens
from vitprune.reducers.tome import Matching


def index_holders(index: Tensor, num_in: int, valid: Tensor | None = None) -> Tensor:
    """Holders of a gather: input row index[b, i] goes to output row i; rows not gathered, or
    gathered only as padding (`valid` False), are dropped. index: (B, K) -> (B, num_in)."""
    batch, width = index.shape
    rows = torch.arange(width, device=index.device).expand(batch, width)
    target = index if valid is None else torch.where(valid, index, num_in)  # padding writes a spare column
    holders = torch.full((batch, num_in + 1), -1, dtype=torch.int64, device=index.device)
    return holders.scatter(1, target, rows)[:, :num_in]


def merge_holders(matching: Matching, num_in: int, num_prefix: int) -> Tensor:
    """Holders of `merge_tokens` (its output order: prefix, unmerged A, all B): an A token merged
    away is held by its B partner's row. -> (B, num_in)."""
    batch, r = matching.src.shape
    device = matching.src.device
    num_b = (num_in - num_prefix) // 2
    num_a = num_in - num_prefix - num_b
    first_b = num_prefix + num_a - r  # the output row of B token 0
    holders = torch.empty(batch, num_in, dtype=torch.int64, device=device)
    holders[:, :num_prefix] = torch.arange(num_prefix, device=device)
    a_rows = torch.empty(batch, num_a, dtype=torch.int64, device=device)
    a_rows.scatter_(1, matching.unmerged, (num_prefix + torch.arange(num_a - r, device=device)).expand(batch, -1))
    a_rows.scatter_(1, matching.src, first_b + matching.dst)
    holders[:, num_prefix::2] = a_rows
    holders[:, num_prefix + 1::2] = first_b + torch.arange(num_b, device=device)
    return holders


def same_holders(num_in: int, batch: int, device: torch.device) -> Tensor:
    """Holders of a reduction that left every token in its row."""
    return torch.arange(num_in, device=device).expand(batch, num_in)


@dataclass(frozen=True)
class PatchGrid:
    """Where each original patch is among the current tokens."""

    holder: Tensor  # (B, M) int64: the row of the token holding each patch; -1 once it was dropped
    dropped: Tensor | None = None  # (B, M, C) the features of dropped patches when they were dropped

    @classmethod
    def start(cls, x: Tensor, num_prefix: int) -> PatchGrid:
        """Unreduced tokens (B, P + M, C): patch i is row P + i."""
        batch, count, _ = x.shape
        return cls(torch.arange(num_prefix, count, device=x.device).expand(batch, count - num_prefix))

    def follow(self, holders: Tensor, x_in: Tensor) -> PatchGrid:
        """After a reduction with `holders` of the tokens `x_in` that entered its block."""
        held = self.holder >= 0
        where = self.holder.clamp_min(0)
        holder = torch.where(held, holders.gather(1, where), -1)
        at_entry = gather_tokens(x_in, where)
        if self.dropped is None:  # nothing dropped before: rows of patches still held are never read
            return PatchGrid(holder, at_entry)
        return PatchGrid(holder, torch.where((held & (holder < 0)).unsqueeze(-1), at_entry, self.dropped))

    def dense(self, x: Tensor) -> Tensor:
        """The patch tokens on the grid (B, M, C): each patch its holder's features, or those it
        had when dropped."""
        out = gather_tokens(x, self.holder.clamp_min(0))
        return out if self.dropped is None else torch.where((self.holder < 0).unsqueeze(-1), self.dropped, out)
