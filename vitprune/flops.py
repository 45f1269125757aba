"""Exact multiply-accumulates (MACs, what papers call FLOPs) per image.

Each block is counted with the tokens it really processes, per image (ATS keeps a different
count per image), from the token counts the adapter records; the patch embedding and the head
are counted once by torch's own FlopCounterMode. `tests/test_flops.py` cross-checks the whole
against torch.utils.flop_counter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from vitprune.models import has_class_token
from vitprune.patch import HEAD_ONLY, model_img_size, record_tokens
from vitprune.plan import Reduction


@dataclass
class MacsReport:
    gmacs: float  # mean over images
    gmacs_per_image: Tensor  # (B,)
    tokens_per_block: list[float]  # mean tokens entering each block

    def to_dict(self) -> dict:
        return {"gmacs": self.gmacs, "tokens_per_block": [round(t, 2) for t in self.tokens_per_block]}


def block_macs(block: nn.Module, n_in: Tensor, n_query: Tensor, n_out: Tensor, reduction: Reduction | str | None,
               num_prefix: int, class_token: bool = True) -> Tensor:
    """MACs of one timm Block: qkv on the tokens in, attention of the queries over them, output
    projection on the queries, MLP on the tokens out, plus the reduction's own scoring
    (`Method.extra_macs`). reduction: the block's, or HEAD_ONLY for the head-only last block."""
    attn = block.attn
    dim, attn_dim = attn.qkv.in_features, attn.attn_dim
    hidden = block.mlp.fc1.out_features
    n_in, n_query, n_out = n_in.double(), n_query.double(), n_out.double()
    # qkv; the head-only last block computes queries for the prefix tokens alone
    macs = (2 * n_in + n_query if reduction == HEAD_ONLY else 3 * n_in) * dim * attn_dim
    macs = macs + 2 * n_query * n_in * attn_dim  # q k^T and attn v
    macs = macs + n_query * attn_dim * dim  # proj
    if getattr(attn, "gate", None) is not None:
        macs = macs + n_query * dim * attn_dim
    macs = macs + 2 * n_out * dim * hidden  # fc1, fc2
    if isinstance(reduction, Reduction):
        macs = macs + reduction.spec.extra_macs(attn, n_in, n_out, num_prefix, reduction.settings,
                                                  class_token=class_token)
    return macs


def _counted_macs(module: nn.Module, fn, *args) -> int:
    # FlopCounterMode's module tracker fails on parameters that require grad without autograd
    # (timm's attention pooling, SigLIP): they are counted with requires_grad off, then restored.
    flags = [param.requires_grad for param in module.parameters()]
    module.requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn(*args)
    finally:
        for param, flag in zip(module.parameters(), flags, strict=True):
            param.requires_grad_(flag)
    return counter.get_total_flops() // 2


@torch.inference_mode()
def count_macs(model: nn.Module, images: Tensor | None = None) -> MacsReport:
    """GMACs per image of `model` (reduced or not) on `images` (B, 3, H, W).

    Without images a random one of the model's input size is used: enough for EViT and ToMe,
    whose token counts do not depend on the image; ATS counts need the real images.
    """
    was_training = model.training
    model.eval()
    if images is None:
        size = model_img_size(model)
        images = torch.randn(1, model.patch_embed.proj.in_channels, size, size)
    param = next(model.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    with record_tokens(model) as trace:
        tokens = model.forward_features(images)
    embed = _counted_macs(model, model.patch_embed, images[:1])
    head = _counted_macs(model, model.forward_head, tokens[:1])
    num_prefix = model.num_prefix_tokens
    per_image = torch.full((images.shape[0],), float(embed + head), dtype=torch.float64)
    for entry in trace:
        per_image += block_macs(model.blocks[entry["layer"]], entry["n_in"], entry["n_query"],
                                entry["n_out"], entry["reduction"], num_prefix, has_class_token(model))
    model.train(was_training)
    return MacsReport(
        gmacs=float(per_image.mean()) / 1e9,
        gmacs_per_image=per_image / 1e9,
        tokens_per_block=[float(entry["n_in"].double().mean()) for entry in trace],
    )
