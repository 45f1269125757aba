"""Exact multiply-accumulates (MACs, what papers call FLOPs) per image: the one rule.

"Exact" means what torch's FlopCounterMode counts (halved) on the same input with the math
attention kernel: every matrix product, nothing else (norms, activations, gathers are free).

A block's MACs are affine in the tokens it processes, so each block kind is measured once per
token (`BlockCosts`, from FlopCounterMode on its own layers: any MLP timm builds, GLU or not) and
multiplied by the tokens each image really sends through it, which the adapter records (ATS
keeps a different count per image); the attention products and the reductions' own scoring
(`Method.extra_macs`) are counted from the token counts. The stem (patch embedding, hybrid
backbones), the head (attention pooling included) and the relative position biases (an MLP on
the grid in RelPosMlp: per block, or once when shared) are counted by FlopCounterMode directly.
`tests/test_flops.py` holds the whole to FlopCounterMode at 1e-6 on every family the adapter runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vitprune.blocks import block_kind
from vitprune.errors import VitpruneError
from vitprune.models import has_class_token, input_shape, is_supported_vit, stem_of
from vitprune.patch import HEAD_ONLY, carried_channels, record_tokens, shared_position_bias
from vitprune.plan import Reduction


@dataclass
class MacsReport:
    gmacs: float  # mean over images
    gmacs_per_image: Tensor  # (B,)
    tokens_per_block: list[float]  # mean tokens entering each block

    def to_dict(self) -> dict:
        return {"gmacs": self.gmacs, "tokens_per_block": [round(t, 2) for t in self.tokens_per_block]}


@dataclass(frozen=True)
class BlockCosts:
    """MACs per token of one block's token-wise layers, and its attention width."""

    query: int  # the query projection, per query
    key_value: int  # the key and value projections, per token attended to
    out: int  # what follows the attention product (output projection, gate), per query
    mlp: int  # the MLP, per token after the reduction
    attn_dim: int  # q k^T and attn v each cost attn_dim per query-key pair
    head_dim: int  # the width of one head's keys (ToMe's similarity metric)
    num_heads: int
    width: int  # the tokens' width and what rides with them (rotary embeddings): what a merge sums
    fixed: int = 0  # once per block whatever its tokens: its relative position bias (RelPosMlp's MLP on the grid)


def block_costs(block: nn.Module, carried: int = 0) -> BlockCosts:
    """`block`'s per-token costs, counted by FlopCounterMode on one token through each of its layers;
    `carried`: channels riding with the tokens through reductions (`carried_channels`)."""
    kind = block_kind(block)
    param = next(block.parameters())
    token = torch.zeros(1, 1, kind.width(block), device=param.device, dtype=param.dtype)
    query, key_value = kind.projection_macs(block)
    out = _counted_macs(block, kind.attention_output, block, token.new_zeros(1, 1, kind.attn_dim(block)), token)
    return BlockCosts(query=query, key_value=key_value, out=out,
                      mlp=_counted_macs(block, block.mlp, token), attn_dim=kind.attn_dim(block),
                      head_dim=kind.head_dim(block), num_heads=kind.num_heads(block),
                      width=token.shape[-1] + carried, fixed=_counted_macs(block, kind.position_bias, block, None))


def block_macs(costs: BlockCosts, n_in: Tensor, n_query: Tensor, n_out: Tensor, head_only: bool = False) -> Tensor:
    """MACs of one block without its reduction's own scoring: the projections on the tokens in
    (the queries too: they are projected before a method selects among them, but for the head-only
    last block's), both attention products of the queries over the tokens in, what follows the
    attention on the queries, the MLP on the tokens out. Float64, per image, differentiable in the
    counts (the gradient search)."""
    n_in, n_query, n_out = n_in.double(), n_query.double(), n_out.double()
    projected = n_query if head_only else n_in
    return (costs.fixed + n_in * costs.key_value + projected * costs.query + n_query * costs.out
            + 2 * n_query * n_in * costs.attn_dim + n_out * costs.mlp)


def reduction_macs(costs: BlockCosts, reduction: Reduction, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   class_token: bool) -> Tensor:
    """The reduction's own scoring and merging inside a block (`Method.extra_macs`)."""
    return reduction.spec.extra_macs(costs, n_in.double(), n_out.double(), num_prefix, reduction.settings,
                                     class_token=class_token)


def _counted_macs(module: nn.Module, fn, *args) -> int:
    # FlopCounterMode's module tracker fails on parameters that require grad without autograd
    # (timm's attention pooling, SigLIP): they are counted with requires_grad off, then restored.
    # The math attention kernel decomposes into the matrix products it counts (CPU's fused one is not).
    flags = [param.requires_grad for param in module.parameters()]
    module.requires_grad_(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            fn(*args)
    finally:
        for param, flag in zip(module.parameters(), flags, strict=True):
            param.requires_grad_(flag)
    return counter.get_total_flops() // 2


@dataclass(frozen=True)
class OutsideBlocks:
    """MACs outside the blocks: the stem (per input size) and the head, affine in the tokens it reads
    (attention pooling attends over them; class-token and average pooling cost the same at any count)."""

    stem: int
    head_fixed: int
    head_per_token: int

    def macs(self, tokens_at_head: Tensor) -> Tensor:
        return self.stem + self.head_fixed + self.head_per_token * tokens_at_head.double()


def outside_blocks(model: nn.Module, image: Tensor | None = None) -> OutsideBlocks:
    """Counted by FlopCounterMode on one image (a zero image of the model's input size if none)."""
    if image is None:
        image = model_input(model)
    image = image[:1]
    # the stem, and the relative position bias a model shares among its blocks (made once per forward pass)
    stem = _counted_macs(model, stem_of(model), image) + _counted_macs(model, shared_position_bias, model)
    prefix = model.num_prefix_tokens
    at_two = _counted_macs(model, model.forward_head, image.new_zeros(1, prefix + 2, model.embed_dim))
    at_one = _counted_macs(model, model.forward_head, image.new_zeros(1, prefix + 1, model.embed_dim))
    per_token = at_two - at_one
    return OutsideBlocks(stem=stem, head_fixed=at_one - per_token * (prefix + 1), head_per_token=per_token)


@dataclass(frozen=True)
class ModelCosts:
    """A model's costs for counting many token schedules: its blocks' and what lies outside them."""

    blocks: list[BlockCosts]
    outside: OutsideBlocks


def model_costs(model: nn.Module) -> ModelCosts:
    carried = carried_channels(model)
    return ModelCosts([block_costs(block, carried) for block in model.blocks], outside_blocks(model))


def model_input(model: nn.Module, batch: int = 1) -> Tensor:
    """A zero batch of the model's own input size (channels, height, width: non-square sizes too)."""
    param = next(model.parameters())
    return torch.zeros(batch, *input_shape(model), device=param.device, dtype=param.dtype)


@torch.inference_mode()
def count_macs(model: nn.Module, images: Tensor | None = None) -> MacsReport:
    """GMACs per image of `model` (reduced or not) on `images` (B, C, H, W).

    Without images a zero image of the model's input size is used: enough for every method whose
    token counts do not depend on the image (all but ATS, whose counts need the real images).
    """
    if not isinstance(model, nn.Module) or is_supported_vit(model) is not None:
        found = is_supported_vit(model) if isinstance(model, nn.Module) else f"found {type(model).__name__}"
        raise VitpruneError(f"model must be a supported timm ViT ({found})", param="model")
    was_training = model.training
    model.eval()
    param = next(model.parameters())
    images = model_input(model) if images is None else images.to(device=param.device, dtype=param.dtype)
    try:
        with record_tokens(model) as trace:
            model.forward_features(images)
        num_prefix, class_token = model.num_prefix_tokens, has_class_token(model)
        per_image = outside_blocks(model, images[:1]).macs(trace[-1]["n_out"]).expand(images.shape[0]).clone()
        costs: dict[int, BlockCosts] = {}
        carried = carried_channels(model)
        for entry in trace:
            block = model.blocks[entry["layer"]]
            cost = costs.setdefault(id(block), block_costs(block, carried))
            per_image += block_macs(cost, entry["n_in"], entry["n_query"], entry["n_out"],
                                    head_only=entry["reduction"] == HEAD_ONLY)
            if isinstance(entry["reduction"], Reduction):
                per_image += reduction_macs(cost, entry["reduction"], entry["n_in"], entry["n_out"], num_prefix,
                                            class_token)
    finally:
        model.train(was_training)
    return MacsReport(
        gmacs=float(per_image.mean()) / 1e9,
        gmacs_per_image=per_image / 1e9,
        tokens_per_block=[float(entry["n_in"].double().mean()) for entry in trace],
    )


__all__ = ["HEAD_ONLY", "BlockCosts", "MacsReport", "ModelCosts", "OutsideBlocks", "block_costs", "block_macs", "count_macs",
           "model_costs", "model_input", "outside_blocks", "reduction_macs"]
