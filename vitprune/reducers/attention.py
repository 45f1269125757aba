"""Token importance without a class token: the attention each token receives from all queries."""
from __future__ import annotations

from torch import Tensor

from vitprune.reducers.position import query_rows

QUERY_CHUNK = 256  # queries per block: H x QUERY_CHUNK x N attention values at a time, never N x N at once


def received_attention(q: Tensor, k: Tensor, scale: float, key_bias: Tensor | None = None,
                       query_weight: Tensor | None = None, chunk: int = QUERY_CHUNK) -> Tensor:
    """The mean, over queries, of the softmax attention each token receives, per head: (B, H, N).

    The column mean of softmax(q k^T * scale + key_bias) over the queries (the importance score
    of LTMP and Zero-TPrune, for models whose class token is missing). Like the class-token row
    it is a distribution over the N keys (each row of the attention sums to 1).
    q: (B, H, Nq, hd); k: (B, H, N, hd); key_bias: broadcastable to (B, H, 1, N) (log token sizes,
    -inf on padding) or (B, H, Nq, N) (relative positions); query_weight: (B, Nq) how many tokens each query stands for (0 on padding,
    the merged size after ToMe), None: 1 each. Computed over blocks of `chunk` queries.
    """
    total = None
    for start in range(0, q.shape[2], chunk):
        logits = (q[:, :, start:start + chunk] * scale) @ k.transpose(-2, -1)
        if key_bias is not None:
            logits = logits + query_rows(key_bias, start, start + chunk)
        attn = logits.softmax(dim=-1)
        if query_weight is not None:
            attn = attn * query_weight[:, None, start:start + chunk, None].to(attn.dtype)
        part = attn.sum(dim=2)
        total = part if total is None else total + part
    count = q.shape[2] if query_weight is None else query_weight.sum(dim=1).to(total.dtype)[:, None, None]
    return total / count
