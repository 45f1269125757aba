"""Pieces shared by the reducers: the class token's attention row, row gathers, float32 products,
shape-only tables."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from vitprune.reducers.position import query_rows

AUTOCAST_DEVICES = ("cpu", "cuda")


def float32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in float32, also under autocast (which would run it in bfloat16/float16).

    For the scores a reducer ranks or samples (attention rows, similarities, sizes): in half
    precision near-equal scores round to ties, and which token is kept or merged would then
    follow rounding instead of the scores. The products are small (one row, or N/2 x N/2).
    """
    off = (torch.autocast(a.device.type, enabled=False) if a.device.type in AUTOCAST_DEVICES
           else contextlib.nullcontext())
    with off:
        return a.float() @ b.float()


_TABLES: dict[tuple, Tensor] = {}
_MAX_TABLES = 1024  # distinct (shape, device) keys kept; a forward pass at one input size uses a few dozen


def graph_capture() -> bool:
    """Tracing (ONNX export) or compiling: tensors must come from the graph's own inputs and ops, not
    from a cache (a cached table would be frozen into the graph as a constant of the traced shapes)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def shape_table(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    """`make()`, a tensor that depends on shapes only (index ranges, one-hot tables), built once per
    `key` in eager mode: the reduced forward pass then runs only the operators that depend on the
    image. Built outside inference mode, so the cached tensor also serves autograd (finetuning);
    built afresh while a graph is captured (see `graph_capture`)."""
    if graph_capture():
        return make()
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.clear()
        with torch.inference_mode(False), torch.no_grad():
            table = _TABLES[key] = make()
    return table


def cls_attention(q_cls: Tensor, k: Tensor, scale: float, key_bias: Tensor | None = None) -> Tensor:
    """The CLS row of the softmax attention, per head: (B, H, N).

    q_cls: (B, H, 1, hd) query of the CLS token; k: (B, H, N, hd) all keys; key_bias: additive
    logits bias broadcastable to (B, H, 1, N) (log token sizes, -inf on padding), or one row per
    query (relative positions, vitprune.reducers.position), of which the class token's is used.
    Only this one row is computed (H x N values), so the full attention can keep using the fused
    scaled-dot-product kernel that never materialises N x N. float32 whatever the inputs' precision.
    """
    logits = float32_matmul(q_cls * scale, k.transpose(-2, -1))
    if key_bias is not None:  # a per-query bias (relative positions): the class token's row
        logits = logits + query_rows(key_bias, 0, 1).float()
    return logits.softmax(dim=-1).squeeze(2)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, i]] for every b, i: (B, N, C) and (B, K) -> (B, K, C).

    Whole rows are picked from the flattened tokens (an index_select, ONNX Gather): faster on
    every runtime than an element-wise gather, whose index must be expanded over the channels.
    """
    batch, tokens, channels = x.shape
    rows = index if batch == 1 and not graph_capture() else index + _row_offsets(batch, tokens, index.device)
    return x.reshape(batch * tokens, channels).index_select(0, rows.reshape(-1)).view(batch, index.shape[1], channels)


def _row_offsets(batch: int, tokens: int, device: torch.device) -> Tensor:
    """(B, 1): the first flat row of each image's tokens."""
    return shape_table(("row offsets", batch, tokens, device),
                       lambda: torch.arange(batch, device=device).unsqueeze(1) * tokens)


def keep_prefix_and(index: Tensor, num_prefix: int) -> Tensor:
    """Token indices of the prefix tokens followed by `index` (indices among the patch tokens)."""
    batch = index.shape[0]
    prefix = shape_table(("prefix", batch, num_prefix, index.device),
                         lambda: torch.arange(num_prefix, device=index.device).expand(batch, num_prefix))
    return torch.cat([prefix, index + num_prefix], dim=1)


def attention_probs(q: Tensor, k: Tensor, scale: float, key_bias: Tensor | None = None) -> Tensor:
    """The whole softmax attention (B, H, Nq, N), for the methods that read more than its CLS row
    (Zero-TPrune). The adapter computes it in place of the fused kernel, only in the blocks those
    methods reduce, and multiplies it with the values itself: no attention is computed twice."""
    logits = (q * scale) @ k.transpose(-2, -1)
    if key_bias is not None:
        logits = logits + key_bias
    return logits.softmax(dim=-1)
