"""The block kinds of the timm adapter: how each kind of timm ViT block is cut into the pieces the
one reduced block forward (`vitprune.patch`) and the MAC rule (`vitprune.flops`) run.

A reduction sits between a block's attention and its MLP (or picks the queries before the
attention), so a kind says how to project queries, keys and values from the tokens, what follows
the attention product (output projection, gate, norm, layer scale: the attention residual) and
the MLP residual. A new kind of block is one new class here, registered in `KINDS`.
These follow timm 1.0's code (timm/models/vision_transformer.py, timm/layers/attention.py,
1.0.15 to 1.0.31): a change there is mirrored here once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.models import beit, vision_transformer_relpos
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, ResPostBlock
from torch import Tensor, nn


def split_heads(projected: Tensor, num_heads: int, head_dim: int) -> Tensor:
    """(B, N, heads * hd) -> (B, heads, N, hd), as timm's attention splits q, k and v (two views)."""
    return projected.reshape(*projected.shape[:2], num_heads, head_dim).transpose(1, 2)


class PreNormBlock:
    """timm's `Block`: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))), with timm's `Attention`
    (fused qkv, optional q/k norm, scale norm and gate)."""

    block_type: type = Block
    attention_type: type = Attention

    def matches(self, block: nn.Module) -> bool:
        return type(block) is self.block_type and type(block.attn) is self.attention_type

    # -- the pieces of the forward --------------------------------------------------------------
    def attention_input(self, block: nn.Module, x: Tensor) -> Tensor:
        """What the q, k, v projections read (and the gate: see `attention_residual`)."""
        return block.norm1(x)

    def project_qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The queries, keys and values of every token, (B, N, attn_dim) each: one fused projection."""
        return block.attn.qkv(normed).chunk(3, dim=-1)

    def project_q(self, block: nn.Module, normed: Tensor) -> Tensor:
        """The queries alone (the head-only last block queries the prefix tokens only)."""
        attn, width = block.attn, self.attn_dim(block)
        bias = None if attn.qkv.bias is None else attn.qkv.bias[:width]
        return F.linear(normed, attn.qkv.weight[:width], bias)

    def project_kv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor]:
        attn, width = block.attn, self.attn_dim(block)
        bias = None if attn.qkv.bias is None else attn.qkv.bias[width:]
        return F.linear(normed, attn.qkv.weight[width:], bias).chunk(2, dim=-1)

    def heads(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
              rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, attn_dim) each -> (B, H, N, hd) each, q and k normed as timm's Attention does;
        `rope`: per token rotations (B, N, 2 hd) on rotary blocks (`RotaryBlock`)."""
        attn = block.attn
        q, k, v = (split_heads(part, attn.num_heads, attn.head_dim) for part in (q, k, v))
        return attn.q_norm(q), attn.k_norm(k), v

    def plain(self, block: nn.Module, x: Tensor, given: Tensor | None) -> Tensor:
        """timm's own forward of the block (unreduced tokens); `given`: what the model gives every
        block besides the tokens (Eva's patch rotations, a shared relative position bias)."""
        return block(x)

    # -- relative position biases (`RelativePositionBlock`) -------------------------------------------
    relative_position = False  # the attention adds a bias per pair of token positions

    def position_bias(self, block: nn.Module, shared: Tensor | None) -> Tensor | None:
        """The block's bias over the unreduced tokens' pairs (H, N0, N0), with the model's `shared` one."""
        return None

    def attention_output(self, block: nn.Module, out: Tensor, normed: Tensor) -> Tensor:
        """timm's Attention after the attention product (B, N, attn_dim): its norm, the optional gate
        (read from the queries' `attention_input`), the projection."""
        attn = block.attn
        out = attn.norm(out)
        if attn.gate is not None:
            out = out * attn.gate(normed).sigmoid()
        return attn.proj_drop(attn.proj(out))

    def attention_residual(self, block: nn.Module, x: Tensor, out: Tensor, normed: Tensor) -> Tensor:
        return x + block.drop_path1(block.ls1(self.attention_output(block, out, normed)))

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    # -- sizes (the MAC rule) ---------------------------------------------------------------------
    def width(self, block: nn.Module) -> int:
        return block.attn.proj.out_features

    def attn_dim(self, block: nn.Module) -> int:
        return self.num_heads(block) * self.head_dim(block)  # EvaAttention, RelPosAttention keep no attn_dim

    def head_dim(self, block: nn.Module) -> int:
        return block.attn.head_dim

    def num_heads(self, block: nn.Module) -> int:
        return block.attn.num_heads

    def scale(self, block: nn.Module) -> float:
        return block.attn.scale

    def dropout(self, block: nn.Module) -> float:
        return block.attn.attn_drop.p

    def projection_macs(self, block: nn.Module) -> tuple[int, int]:
        """MACs per token of the query projection and of the key and value projections."""
        per_token = block.attn.qkv.weight.numel()
        return per_token // 3, per_token - per_token // 3


class PostNormBlock(PreNormBlock):
    """timm's `ResPostBlock` (Swin-v2 style, `vit_*_res_post_*`): the norms follow the attention and
    the MLP inside the residuals, x + norm1(attn(x)), then x + norm2(mlp(x))."""

    block_type = ResPostBlock

    def attention_input(self, block: nn.Module, x: Tensor) -> Tensor:
        return x

    def attention_residual(self, block: nn.Module, x: Tensor, out: Tensor, normed: Tensor) -> Tensor:
        return x + block.drop_path1(block.norm1(self.attention_output(block, out, normed)))

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        return x + block.drop_path2(block.norm2(block.mlp(x)))


class RotaryBlock(PreNormBlock):
    """timm's `EvaBlock` (the Eva class: EVA-02, DINOv3, Perception Encoder, RoPE ViTs) with
    `EvaAttention` or `AttentionRope`: fused or separate q, k, v projections (EVA's q and v biases,
    grouped key/value heads), rotary embeddings on the patch tokens, layer scale as gamma_1/gamma_2."""

    block_type = EvaBlock
    attention_types = (EvaAttention, AttentionRope)

    def matches(self, block: nn.Module) -> bool:
        return type(block) is self.block_type and type(block.attn) in self.attention_types

    def _qkv_bias(self, attn: nn.Module) -> Tensor | None:
        if getattr(attn, "q_bias", None) is not None:  # EVA: q and v biases, k none
            return torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        return attn.qkv.bias

    def project_qkv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.attn
        if attn.qkv is None:
            return attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        bias = self._qkv_bias(attn)
        if bias is not None and getattr(attn, "qkv_bias_separate", False):
            return (attn.qkv(normed) + bias).chunk(3, dim=-1)
        return F.linear(normed, attn.qkv.weight, bias).chunk(3, dim=-1)

    def project_q(self, block: nn.Module, normed: Tensor) -> Tensor:
        attn = block.attn
        if attn.qkv is None:
            return attn.q_proj(normed)
        bias, width = self._qkv_bias(attn), self.attn_dim(block)
        return F.linear(normed, attn.qkv.weight[:width], None if bias is None else bias[:width])

    def project_kv(self, block: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor]:
        attn = block.attn
        if attn.qkv is None:
            return attn.k_proj(normed), attn.v_proj(normed)
        bias, width = self._qkv_bias(attn), self.attn_dim(block)
        kv = F.linear(normed, attn.qkv.weight[width:], None if bias is None else bias[width:])
        return kv.chunk(2, dim=-1)

    def heads(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
              rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        attn = block.attn
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = split_heads(q, attn.num_heads, attn.head_dim)
        k, v = (split_heads(part, kv_heads, attn.head_dim) for part in (k, v))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if rope is not None:  # prefix rows hold the rotation by zero: rotating them changes nothing
            half = getattr(attn, "rotate_half", False)
            rope = rope[:, None]
            q = apply_rot_embed_cat(q, rope[:, :, :q.shape[2]], half=half).type_as(v)  # head-only: the prefix
            k = apply_rot_embed_cat(k, rope, half=half).type_as(v)
        if kv_heads != attn.num_heads:
            k, v = (part.repeat_interleave(attn.num_heads // kv_heads, dim=1) for part in (k, v))
        return q, k, v

    def plain(self, block: nn.Module, x: Tensor, given: Tensor | None) -> Tensor:
        return block(x, rope=given)

    def attention_residual(self, block: nn.Module, x: Tensor, out: Tensor, normed: Tensor) -> Tensor:
        out = self.attention_output(block, out, normed)
        return x + block.drop_path1(out if block.gamma_1 is None else block.gamma_1 * out)

    def mlp_residual(self, block: nn.Module, x: Tensor) -> Tensor:
        out = block.mlp(block.norm2(x))
        return x + block.drop_path2(out if block.gamma_2 is None else block.gamma_2 * out)

    def projection_macs(self, block: nn.Module) -> tuple[int, int]:
        attn = block.attn
        if attn.qkv is None:
            return attn.q_proj.weight.numel(), attn.k_proj.weight.numel() + attn.v_proj.weight.numel()
        return super().projection_macs(block)


class RelativePositionBlock(PreNormBlock):
    """timm's `RelPosBlock` (VisionTransformerRelPos, `vit_relpos_*`, `vit_srelpos_*`): timm's block
    with `RelPosAttention`, whose logits get a bias per pair of token positions, from its own
    `rel_pos` (a table, `RelPosBias`, or an MLP of log coordinates, `RelPosMlp`) or else the model's
    shared one; no output norm or gate."""

    block_type = vision_transformer_relpos.RelPosBlock
    attention_type = vision_transformer_relpos.RelPosAttention
    relative_position = True

    def attention_output(self, block: nn.Module, out: Tensor, normed: Tensor) -> Tensor:
        return block.attn.proj_drop(block.attn.proj(out))

    def plain(self, block: nn.Module, x: Tensor, given: Tensor | None) -> Tensor:
        return block(x, shared_rel_pos=given)

    def position_bias(self, block: nn.Module, shared: Tensor | None) -> Tensor | None:
        rel_pos = block.attn.rel_pos  # timm: the block's own bias replaces the shared one
        bias = shared if rel_pos is None else rel_pos.get_bias()
        return None if bias is None else bias.reshape(-1, *bias.shape[-2:])


class PostNormRelativePositionBlock(RelativePositionBlock, PostNormBlock):
    """timm's `ResPostRelPosBlock` (`vit_relpos_*_rpn_*`): post-norm residuals (`PostNormBlock`)
    around `RelPosAttention`."""

    block_type = vision_transformer_relpos.ResPostRelPosBlock


class BeitBlock(RotaryBlock):
    """BEiT's block (`beit_*`, `beitv2_*`): q and v biases (`RotaryBlock`'s projections), gamma
    layer scale, no q/k norm, no rotation, and a relative position bias per pair of token
    positions: the block's own table (`_get_rel_pos_bias`) plus the model's shared one."""

    block_type = beit.Block
    attention_types = (beit.Attention,)
    relative_position = True

    def heads(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
              rope: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        heads, head_dim = self.num_heads(block), self.head_dim(block)
        return tuple(split_heads(part, heads, head_dim) for part in (q, k, v))

    def head_dim(self, block: nn.Module) -> int:
        return block.attn.proj.in_features // block.attn.num_heads  # BEiT's Attention keeps no head_dim

    def attention_output(self, block: nn.Module, out: Tensor, normed: Tensor) -> Tensor:
        return block.attn.proj_drop(block.attn.proj(out))

    def plain(self, block: nn.Module, x: Tensor, given: Tensor | None) -> Tensor:
        return block(x, shared_rel_pos_bias=given)

    def position_bias(self, block: nn.Module, shared: Tensor | None) -> Tensor | None:
        attn = block.attn
        own = None if attn.relative_position_bias_table is None else attn._get_rel_pos_bias()[0]
        if own is None or shared is None:
            return own if shared is None else shared
        return own + shared  # as timm adds them


KINDS = (PreNormBlock(), PostNormBlock(), RotaryBlock(), RelativePositionBlock(), PostNormRelativePositionBlock(),
         BeitBlock())


def block_kind(block: nn.Module) -> PreNormBlock | None:
    """The kind of `block`, None for a block vitprune cannot cut."""
    return next((kind for kind in KINDS if kind.matches(block)), None)
