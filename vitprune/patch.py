"""The timm adapter: the only module that knows timm's VisionTransformer / Block / Attention.

`apply_plan` swaps the model's class for a subclass whose `forward_features` threads a token
state (ToMe sizes, ATS padding mask) through the blocks and runs the reducers of the plan; the
weights and every other method (heads, distillation tokens, registers) stay timm's own.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.plan import Plan, Reduction
from vitprune.reducers import (
    ats_cap, ats_sample, ats_scores, ats_select, cls_attention, evit_keep_count, evit_reduce,
    gather_tokens, protect_penalty, tome_reduce,
)


@dataclass
class TokenState:
    """What the reducers carry from block to block."""

    size: Tensor | None = None  # (B, N, 1) tokens each token stands for (ToMe); None: all 1
    valid: Tensor | None = None  # (B, N) False on ATS padding; None: all valid

    def key_bias(self) -> Tensor | None:
        """Additive attention-logit bias (B, 1, 1, N): proportional attention and padding."""
        bias = None
        if self.size is not None:
            bias = self.size.squeeze(-1).log()
        if self.valid is not None:
            pad = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
            pad = pad.masked_fill(~self.valid, float("-inf"))
            bias = pad if bias is None else bias + pad.to(bias.dtype)
        return None if bias is None else bias[:, None, None, :]

    def counts(self, num_tokens: int, batch: int, device: torch.device) -> Tensor:
        """Real tokens per image (B,)."""
        if self.valid is not None:
            return self.valid.sum(dim=1)
        return torch.full((batch,), num_tokens, device=device)

    @property
    def is_plain(self) -> bool:
        return self.size is None and self.valid is None


class ReducedVisionTransformer:
    """Mixin placed in front of the model's own timm class (see `apply_plan`)."""

    vitprune_plan: Plan
    _vitprune_trace: list | None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VitpruneError("a token-reduced ViT does not take an attention mask")
        return self.vitprune_blocks(self.vitprune_embed(x))

    def vitprune_embed(self, x: Tensor) -> Tensor:
        """Images -> the tokens entering block 0."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def vitprune_blocks(self, x: Tensor, start: int = 0, num_input_tokens: int | None = None) -> Tensor:
        """Run blocks `start`.. on plain tokens (no reduction may happen before `start`), then the
        final norm. `num_input_tokens`: the tokens that entered the model (ATS caps are ratios of it)."""
        num_input_tokens = x.shape[1] if num_input_tokens is None else num_input_tokens
        state = TokenState()
        last = len(self.blocks) - 1
        for layer in range(start, len(self.blocks)):
            block = self.blocks[layer]
            reduction = self.vitprune_plan.at(layer)
            if layer == last and self.vitprune_plan.head_only:
                x = self._head_only_block(block, x, state, layer)
            elif reduction is None and state.is_plain:
                x = block(x)
                self._record(layer, None, x.shape[1], state, state, x.shape[1], x)
            else:
                x, state = self._reduced_block(block, x, state, reduction, num_input_tokens, layer)
        return self.norm(x)

    def _reduced_block(
        self, block: nn.Module, x: Tensor, state: TokenState, reduction: Reduction | None,
        num_input_tokens: int, layer: int,
    ) -> tuple[Tensor, TokenState]:
        method = reduction.method if reduction is not None else None
        if (method == "ats" or state.valid is not None) and _packing_allowed(self):
            return self._packed_block(block, x, state, reduction, num_input_tokens, layer)
        attn = block.attn
        num_prefix = self.num_prefix_tokens
        batch, tokens_in, _ = x.shape
        normed = block.norm1(x)
        qkv = attn.qkv(normed).reshape(batch, tokens_in, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        key_bias = state.key_bias()
        state_in = state

        if method == "ats":
            # Sample first, then attend with the kept queries only: the output projection and
            # the MLP run on the kept tokens (ATS applies the selection to the attention rows).
            index, q, state = self._ats_selection(attn, q, k, v, state, key_bias, reduction, num_input_tokens,
                                                  pad_to=getattr(self, "_vitprune_ats_pad_to", None))
            x, normed = gather_tokens(x, index), gather_tokens(normed, index)

        out = self._attend(attn, q, k, v, key_bias)
        out = attn.norm(out.transpose(1, 2).reshape(batch, q.shape[2], attn.attn_dim))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(normed).sigmoid()
        out = attn.proj_drop(attn.proj(out))
        x = x + block.drop_path1(block.ls1(out))

        if method == "evit":
            cls_attn = cls_attention(q[:, :, :1], k, attn.scale, key_bias).mean(dim=1)
            keep_count = evit_keep_count(x.shape[1] - num_prefix, reduction.keep)
            x, size, _ = evit_reduce(x, cls_attn, num_prefix, keep_count, reduction.fuse, state.size)
            state = replace(state, size=size)
        elif method == "tome":
            size = state.size if state.size is not None else x.new_ones(batch, tokens_in, 1)
            penalty = None
            if reduction.protect:
                cls_attn = cls_attention(q[:, :, :1], k, attn.scale, key_bias).mean(dim=1)
                penalty = protect_penalty(cls_attn[:, num_prefix:], reduction.protect)
            x, size = tome_reduce(x, size, k.mean(dim=1), num_prefix, reduction.r, penalty)
            state = replace(state, size=size)

        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        self._record(layer, method, tokens_in, state_in, state, q.shape[2], x,
                     scores_cls=method == "tome" and bool(reduction.protect))
        return x, state

    def _head_only_block(self, block: nn.Module, x: Tensor, state: TokenState, layer: int) -> Tensor:
        """The last block, computed for the prefix tokens only (class, distillation, registers).

        With class-token pooling the head reads nothing else, so the patch tokens' queries,
        projection and MLP are wasted there: only their keys and values are needed. Exact.
        """
        attn = block.attn
        num_prefix = self.num_prefix_tokens
        batch, tokens_in, _ = x.shape
        normed = block.norm1(x)
        # keys and values for every token, queries for the prefix tokens only
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q_weight, kv_weight = weight[: attn.attn_dim], weight[attn.attn_dim:]
        q_bias, kv_bias = (None, None) if bias is None else (bias[: attn.attn_dim], bias[attn.attn_dim:])
        q = F.linear(normed[:, :num_prefix], q_weight, q_bias)
        q = q.reshape(batch, num_prefix, attn.num_heads, attn.head_dim).transpose(1, 2)
        kv = F.linear(normed, kv_weight, kv_bias).reshape(batch, tokens_in, 2, attn.num_heads, attn.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = self._attend(attn, q, k, v, state.key_bias())
        out = attn.norm(out.transpose(1, 2).reshape(batch, num_prefix, attn.attn_dim))
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(normed[:, :num_prefix]).sigmoid()
        x_prefix = x[:, :num_prefix] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
        x_prefix = x_prefix + block.drop_path2(block.ls2(block.mlp(block.norm2(x_prefix))))
        head_state = TokenState(size=None if state.size is None else state.size[:, :num_prefix])
        self._record(layer, "head", tokens_in, state, head_state, num_prefix, x_prefix)
        return x_prefix

    def _packed_block(
        self, block: nn.Module, x: Tensor, state: TokenState, reduction: Reduction | None,
        num_input_tokens: int, layer: int,
    ) -> tuple[Tensor, TokenState]:
        """A block once ATS has made the token count differ per image.

        The batch is padded to its largest count only where tokens meet (attention, masked); the
        per-token layers (norms, qkv, projection, MLP: most of the compute) run on the real
        tokens alone, packed, so fewer tokens per image are real speed-up in a batch.
        """
        attn = block.attn
        batch, width, channels = x.shape
        rows = _real_rows(state.valid)
        flat = x.reshape(batch * width, channels)
        qkv = attn.qkv(block.norm1(flat if rows is None else flat.index_select(0, rows)))
        if rows is not None:
            qkv = qkv.new_zeros(batch * width, qkv.shape[-1]).index_copy_(0, rows, qkv)
        q, k, v = qkv.reshape(batch, width, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        key_bias = state.key_bias()
        state_in = state
        if reduction is not None and reduction.method == "ats":
            index, q, state = self._ats_selection(attn, q, k, v, state, key_bias, reduction, num_input_tokens)
            x = gather_tokens(x, index)
        out = self._attend(attn, q, k, v, key_bias)
        queries = q.shape[2]
        out_rows = _real_rows(state.valid)
        out = out.transpose(1, 2).reshape(batch * queries, attn.attn_dim).index_select(0, out_rows)
        residual = x.reshape(batch * queries, channels).index_select(0, out_rows)
        out = attn.norm(out)
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(block.norm1(residual)).sigmoid()
        packed = residual + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
        packed = packed + block.drop_path2(block.ls2(block.mlp(block.norm2(packed))))
        x = packed.new_zeros(batch * queries, channels).index_copy_(0, out_rows, packed).view(batch, queries, channels)
        self._record(layer, reduction.method if reduction is not None else None, width, state_in, state, queries, x)
        return x, state

    def _ats_selection(
        self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: TokenState, key_bias: Tensor | None,
        reduction: Reduction, num_input_tokens: int, pad_to: int | None = None,
    ) -> tuple[Tensor, Tensor, TokenState]:
        """ATS sampling: (kept token indices, the kept queries, the state of the kept tokens)."""
        num_prefix = self.num_prefix_tokens
        cls_attn = cls_attention(q[:, :, :1], k, attn.scale, key_bias)
        scores = ats_scores(cls_attn, v, num_prefix, state.valid)
        samples = ats_cap(reduction.keep, num_input_tokens) - num_prefix
        valid_patch = None if state.valid is None else state.valid[:, num_prefix:]
        index, valid = ats_select(ats_sample(scores, max(samples, 1), valid_patch), num_prefix, pad_to=pad_to)
        q = q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
        size = gather_tokens(state.size, index) if state.size is not None else None
        return index, q, TokenState(size=size, valid=valid)

    def _attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None) -> Tensor:
        """timm's fused scaled-dot-product attention, with the token state's logit bias."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if key_bias is None else key_bias.to(q.dtype),
            dropout_p=attn.attn_drop.p if self.training else 0.0,
        )

    def _record(self, layer: int, method: str | None, tokens_in: int, state_in: TokenState,
                state_out: TokenState, queries: int, x: Tensor, scores_cls: bool = False) -> None:
        """Per-image token counts of this block, for exact FLOPs (only inside `record_tokens`)."""
        if self._vitprune_trace is None:
            return
        batch, device = x.shape[0], x.device
        n_in = state_in.counts(tokens_in, batch, device)
        n_out = state_out.counts(x.shape[1], batch, device)
        n_query = n_out if method in ("ats", "head") else state_in.counts(queries, batch, device)
        self._vitprune_trace.append(
            {"layer": layer, "method": method, "n_in": n_in.cpu(), "n_query": n_query.cpu(), "n_out": n_out.cpu(),
             "scores_cls": scores_cls}
        )


def _packing_allowed(model: nn.Module) -> bool:
    """Eager ATS packs real tokens; graph capture (ONNX export) and the static-width mode use the
    padded form, whose shapes a graph can hold."""
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    return not tracing and getattr(model, "_vitprune_ats_pad_to", None) is None


def _real_rows(valid: Tensor | None) -> Tensor | None:
    """Flat indices of the real (non-padding) tokens of a (B, W) mask."""
    return None if valid is None else valid.flatten().nonzero().squeeze(1)


_REDUCED_CLASSES: dict[type, type] = {}


def _reduced_class(base: type) -> type:
    """One subclass per timm class, created once, so isinstance(model, base) still holds."""
    if base not in _REDUCED_CLASSES:
        _REDUCED_CLASSES[base] = type(f"Reduced{base.__name__}", (ReducedVisionTransformer, base), {})
    return _REDUCED_CLASSES[base]


def original_class(model: nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[1] if issubclass(cls, ReducedVisionTransformer) else cls


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Refuse plans the model cannot run, with the reason in one line."""
    from vitprune.models import is_supported_vit

    problem = is_supported_vit(model)
    if problem:
        raise VitpruneError(problem)
    plan.validate(len(model.blocks))
    methods = {red.method for red in plan.reductions}
    if any(red.protect for red in plan.reductions) and getattr(model, "cls_token", None) is None:
        raise VitpruneError(
            "tome protect weighs the class token's attention, and this model has no class token; use protect 0"
        )
    if methods & {"evit", "ats"} and getattr(model, "cls_token", None) is None:
        raise VitpruneError(
            "evit and ats score tokens by the CLS token's attention, and this model has no class token "
            "(it pools by average); use --method tome"
        )
    if plan.head_only and (getattr(model, "global_pool", "token") != "token" or getattr(model, "attn_pool", None) is not None):
        raise VitpruneError(
            "head-only last block needs class-token pooling (the head must read only the class token); "
            f"this model pools by '{model.global_pool}'"
        )
    if "ats" in methods and getattr(model, "global_pool", "token") != "token":
        raise VitpruneError(f"ats pads the batch per image and needs CLS-token pooling; this model pools by '{model.global_pool}'")


def apply_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """Patch `model` in place to run `plan`; returns it. Applying again replaces the plan."""
    check_plan_fits(model, plan)
    if plan.img_size is not None and model_img_size(model) != plan.img_size:
        model.set_input_size(img_size=plan.img_size)  # timm resamples the position embedding
    model.__class__ = _reduced_class(original_class(model))
    model.vitprune_plan = plan
    model._vitprune_trace = None
    return model


def remove_plan(model: nn.Module) -> nn.Module:
    """Undo `apply_plan` (the input size stays as it is)."""
    model.__class__ = original_class(model)
    for name in ("vitprune_plan", "_vitprune_trace", "_vitprune_ats_pad_to"):
        model.__dict__.pop(name, None)
    return model


def plan_of(model: nn.Module) -> Plan | None:
    return getattr(model, "vitprune_plan", None) if isinstance(model, ReducedVisionTransformer) else None


def model_img_size(model: nn.Module) -> int:
    size = model.patch_embed.img_size
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def first_reduced_layer(model: nn.Module) -> int:
    """Blocks before this one run unreduced: their outputs can be cached across plans."""
    plan = plan_of(model)
    return len(model.blocks) if plan is None else plan.first_reduced_layer(len(model.blocks))


@torch.inference_mode()
def tokens_before(model: nn.Module, images: Tensor, layer: int) -> Tensor:
    """The (unreduced) tokens entering block `layer`: a cache for evaluating many plans that all
    start reducing at `layer` or later, with `logits_from`."""
    x = ReducedVisionTransformer.vitprune_embed(model, images)
    for block in list(model.blocks)[:layer]:
        x = block(x)
    return x


def logits_from(model: nn.Module, tokens: Tensor, layer: int, num_input_tokens: int) -> Tensor:
    """Finish the forward pass of a patched model from the tokens entering block `layer` (see
    `tokens_before`); `layer` must not exceed the plan's first reduction."""
    if layer > first_reduced_layer(model):
        raise VitpruneError(f"cannot start at block {layer}: the plan already reduces at block {first_reduced_layer(model)}")
    return model.forward_head(model.vitprune_blocks(tokens, start=layer, num_input_tokens=num_input_tokens))


@torch.inference_mode()
def advance_tokens(model: nn.Module, tokens: Tensor, start: int, end: int) -> Tensor:
    """The unreduced tokens entering block `end`, from those entering block `start` (see
    `tokens_before`): fills a cache at several layers in one pass instead of one pass per layer."""
    for block in list(model.blocks)[start:end]:
        tokens = block(tokens)
    return tokens


@contextmanager
def record_tokens(model: nn.Module) -> Iterator[list[dict]]:
    """Collect each block's per-image token counts during the forward passes inside the block."""
    if not isinstance(model, ReducedVisionTransformer):
        apply_plan(model, Plan())
        unpatch = True
    else:
        unpatch = False
    trace: list[dict] = []
    model._vitprune_trace = trace
    try:
        yield trace
    finally:
        model._vitprune_trace = None
        if unpatch:
            remove_plan(model)


def set_dynamic_img_size(model: nn.Module, enabled: bool) -> nn.Module:
    """Let `model` take any input size that is a multiple of its patch size (SuperViT trains one
    set of weights at several sizes): timm then resamples the position embedding on every forward
    pass, differentiably, instead of once in `set_input_size`. The weights do not change, and the
    result equals `apply_plan` with that img_size. `enabled=False` restores the fixed size."""
    from timm.layers import Format

    embed = model.patch_embed
    if enabled and not getattr(model, "_vitprune_fixed_size", None):
        model._vitprune_fixed_size = (model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = True, False, False, Format.NHWC
    elif not enabled and getattr(model, "_vitprune_fixed_size", None):
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = model._vitprune_fixed_size
        del model._vitprune_fixed_size
    return model
