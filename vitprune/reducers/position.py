"""Relative position biases through token pruning: each token's place in the unreduced sequence.

timm's BEiT and relative-position ViTs add a learned bias to every attention logit, one per head
and per pair of token positions: a (H, N0, N0) table over the N0 tokens entering block 0, prefix
tokens included. A pruned sequence keeps some of those tokens, so its bias is that table's rows
and columns at the kept tokens' original positions (`pair_bias`). The positions ride through a
reduction as extra token channels, as the rotary embeddings do (vitprune.reducers.rope): a gather
moves them with their token. Pruning only: a token merged from several has no one position.
"""
from __future__ import annotations

import torch
from torch import Tensor

DIGIT = 256  # positions ride as two base-256 digits: whole numbers that bfloat16 holds exactly (up to 65536 tokens)


def initial_positions(batch: int, tokens: int, device: torch.device) -> Tensor:
    """The positions of the unreduced tokens: (B, N0) 0..N0-1."""
    return torch.arange(tokens, device=device).expand(batch, tokens)


def position_channels(position: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, N) positions -> (B, N, 2) channels (high digit, low digit) that ride with the tokens."""
    return torch.stack([position // DIGIT, position % DIGIT], dim=-1).to(dtype)


def channel_positions(channels: Tensor) -> Tensor:
    """The inverse of `position_channels`: (B, N, 2) -> (B, N) positions (int64)."""
    digits = channels.float().round().long()
    return digits[..., 0] * DIGIT + digits[..., 1]


def pair_bias(bias: Tensor, query_position: Tensor, key_position: Tensor) -> Tensor:
    """The bias of each (query, key) pair of reduced tokens, from the unreduced table.

    bias: (H, N0, N0) over the unreduced tokens; query_position (B, Nq) and key_position (B, N):
    each token's place in the unreduced sequence. -> (B, H, Nq, N). One flat gather (ONNX Gather).
    """
    heads, width = bias.shape[0], bias.shape[-1]
    pairs = query_position[:, :, None] * width + key_position[:, None, :]  # (B, Nq, N) flat indices
    picked = bias.reshape(heads, -1).index_select(1, pairs.reshape(-1))
    return picked.view(heads, *pairs.shape).transpose(0, 1)


def query_rows(bias: Tensor | None, start: int, stop: int) -> Tensor | None:
    """Rows start..stop of a logit bias: one per query (B, H, Nq, N), or the same for all (B, 1, 1, N)."""
    if bias is None or bias.shape[-2] == 1:
        return bias
    return bias[..., start:stop, :]
