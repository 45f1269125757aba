"""The timm adapter: the only module that knows timm's VisionTransformer / Block / Attention.

`apply_plan` swaps the model's class for a subclass whose `forward_features` threads a token
state (ToMe sizes, ATS padding mask) through the blocks and runs the reducers of the plan; the
weights and every other method (heads, distillation tokens, registers) stay timm's own.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Format
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.methods import BlockContext, TokenState
from vitprune.models import is_supported_vit, patch_size_of
from vitprune.plan import Plan, Reduction, make_plan
from vitprune.reducers import attention_probs, gather_tokens
from vitprune.reducers.sources import gather_sources, initial_sources, split_sources, with_sources


class ReducedVisionTransformer:
    """Mixin placed in front of the model's own timm class (see `apply_plan`).

    The block variants below are assembled from the pieces after the class (`_heads`,
    `_project`, `_mlp_residual`), which follow timm 1.0's `Block.forward` and
    `Attention.forward` (timm/models/vision_transformer.py, timm/layers/attention.py, 1.0.15 to
    1.0.31): a change there is mirrored in those pieces once.
    """

    vitprune_plan: Plan
    _vitprune_trace: list | None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VitpruneError("a token-reduced ViT does not take an attention mask")
        return self.vitprune_blocks(self.vitprune_embed(x))

    def vitprune_forward(self, x: Tensor, pad_to: int | None = None) -> Tensor:
        """Logits, with per-image methods (ATS) padding every batch to `pad_to` patch tokens: static
        shapes for graph export (`vitprune.export`)."""
        return self.forward_head(self.vitprune_blocks(self.vitprune_embed(x), pad_to=pad_to))

    def vitprune_embed(self, x: Tensor) -> Tensor:
        """Images -> the tokens entering block 0."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def vitprune_blocks(self, x: Tensor, start: int = 0, num_input_tokens: int | None = None,
                        pad_to: int | None = None) -> Tensor:
        """Run blocks `start`.. on plain tokens (no reduction may happen before `start`), then the
        final norm. `num_input_tokens`: the tokens that entered the model (ATS caps are ratios of it).
        Eager per-image methods pack the real tokens of a batch (one image has no padding to skip);
        graph capture and `pad_to` use the padded form, whose shapes a graph can hold."""
        if x.shape[0] == 0:  # an empty batch has no tokens to reduce (per-image widths have no maximum)
            return self.norm(x)
        num_input_tokens = x.shape[1] if num_input_tokens is None else num_input_tokens
        state = TokenState()
        if getattr(self, "_vitprune_sources", False):  # source tracking (record_tokens(sources=True))
            state.source = initial_sources(x, self.num_prefix_tokens)
        last = len(self.blocks) - 1
        pack = pad_to is None and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        for layer in range(start, len(self.blocks)):
            block = self.blocks[layer]
            reduction = self.vitprune_plan.at(layer)
            if layer == last and self.vitprune_plan.head_only:
                x = self._head_only_block(block, x, state, layer)
            elif reduction is None and state.is_plain:
                x = block(x)
                self._record(layer, None, x.shape[1], state, state, x.shape[1], x)
            elif pack and (state.valid is not None or (x.shape[0] > 1 and reduction is not None
                                                       and reduction.spec.varies_per_image)):
                x, state = self._packed_block(block, x, state, reduction, num_input_tokens, layer)
            else:
                x, state = self._reduced_block(block, x, state, reduction, num_input_tokens, layer, pad_to)
        x = self.norm(x)
        if state.valid is not None and self.global_pool in POOLS_OVER_TOKENS:
            x = _fill_padding(x, state.valid, self.num_prefix_tokens)
        return x

    def _reduced_block(self, block: nn.Module, x: Tensor, state: TokenState, reduction: Reduction | None,
                       num_input_tokens: int, layer: int, pad_to: int | None) -> tuple[Tensor, TokenState]:
        """A block with its reduction: before attention (selected queries) or after it."""
        normed = block.norm1(x)
        q, k, v = _heads(block.attn, block.attn.qkv(normed), 3)
        q, k = block.attn.q_norm(q), block.attn.k_norm(k)
        ctx = self._context(block, q, k, v, state, num_input_tokens, pad_to)
        tokens_in, spec = x.shape[1], reduction.spec if reduction is not None else None
        if spec is not None and spec.selects_queries:
            index, state = _select(spec, ctx, reduction.settings)
            q, x, normed = _take_queries(q, index), gather_tokens(x, index), gather_tokens(normed, index)
        if spec is not None and spec.needs_attention:
            out = _merge_heads(self._attend_explicit(block.attn, q, k, v, ctx))
        else:
            out = _merge_heads(self._attend(block.attn, q, k, v, ctx.key_bias))
        x = x + block.drop_path1(block.ls1(_project(block.attn, out, normed)))
        if spec is not None and not spec.selects_queries:
            x, state = _reduce(spec, x, ctx, reduction.settings)
        x = _mlp_residual(block, x)
        self._record(layer, reduction, tokens_in, ctx.state, state, q.shape[2], x)
        return x, state

    def _head_only_block(self, block: nn.Module, x: Tensor, state: TokenState, layer: int) -> Tensor:
        """The last block, computed for the prefix tokens only (class, distillation, registers).

        With class-token pooling the head reads nothing else, so the patch tokens' queries,
        projection and MLP are wasted there: only their keys and values are needed. Exact.
        """
        attn, num_prefix = block.attn, self.num_prefix_tokens
        normed = block.norm1(x)
        weight, bias = attn.qkv.weight, attn.qkv.bias
        q_bias, kv_bias = (None, None) if bias is None else (bias[: attn.attn_dim], bias[attn.attn_dim:])
        (q,) = _heads(attn, F.linear(normed[:, :num_prefix], weight[: attn.attn_dim], q_bias), 1)
        k, v = _heads(attn, F.linear(normed, weight[attn.attn_dim:], kv_bias), 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _merge_heads(self._attend(attn, q, k, v, state.key_bias()))
        x_prefix = x[:, :num_prefix] + block.drop_path1(block.ls1(_project(attn, out, normed[:, :num_prefix])))
        x_prefix = _mlp_residual(block, x_prefix)
        head_state = TokenState(size=None if state.size is None else state.size[:, :num_prefix])
        self._record(layer, HEAD_ONLY, x.shape[1], state, head_state, num_prefix, x_prefix)
        return x_prefix

    def _packed_block(self, block: nn.Module, x: Tensor, state: TokenState, reduction: Reduction | None,
                      num_input_tokens: int, layer: int) -> tuple[Tensor, TokenState]:
        """A block once a per-image method (ATS) has made the token count differ per image.

        The batch is padded to its largest count only where tokens meet (attention, masked); the
        per-token layers (norms, qkv, projection, MLP: most of the compute) run on the real
        tokens alone, packed, so fewer tokens per image are real speed-up in a batch.
        """
        attn = block.attn
        batch, width, _ = x.shape
        rows = _real_rows(state.valid)  # once per mask: each costs a device sync
        qkv = _unpack(attn.qkv(block.norm1(_pack(x, rows))), rows, batch, width)
        q, k, v = _heads(attn, qkv, 3)
        q, k = attn.q_norm(q), attn.k_norm(k)
        ctx = self._context(block, q, k, v, state, num_input_tokens, None)
        if reduction is not None and reduction.spec.selects_queries:
            index, state = _select(reduction.spec, ctx, reduction.settings)
            q, x = _take_queries(q, index), gather_tokens(x, index)
            rows = _real_rows(state.valid)
        out = _pack(_merge_heads(self._attend(attn, q, k, v, ctx.key_bias)), rows)
        residual = _pack(x, rows)
        gate_input = block.norm1(residual) if getattr(attn, "gate", None) is not None else None
        packed = _mlp_residual(block, residual + block.drop_path1(block.ls1(_project(attn, out, gate_input))))
        x = _unpack(packed, rows, batch, q.shape[2])
        self._record(layer, reduction, width, ctx.state, state, q.shape[2], x)
        return x, state

    def _context(self, block: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: TokenState,
                 num_input_tokens: int, pad_to: int | None) -> BlockContext:
        return BlockContext(q=q, k=k, v=v, scale=block.attn.scale, key_bias=state.key_bias(), state=state,
                            num_prefix=self.num_prefix_tokens, num_input_tokens=num_input_tokens, pad_to=pad_to,
                            class_token=self.cls_token is not None)

    def _attend(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, key_bias: Tensor | None) -> Tensor:
        """timm's fused scaled-dot-product attention, with the token state's logit bias."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if key_bias is None else key_bias.to(q.dtype),
            dropout_p=attn.attn_drop.p if self.training else 0.0,
        )

    def _attend_explicit(self, attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, ctx: BlockContext) -> Tensor:
        """The attention as softmax(q k^T) v, its probabilities kept in `ctx.attn` for methods that
        read all of them (`Method.needs_attention`): the same MACs as the fused kernel."""
        ctx.attn = attention_probs(q, k, attn.scale, ctx.key_bias)
        probs = F.dropout(ctx.attn, attn.attn_drop.p) if self.training else ctx.attn
        return probs.to(v.dtype) @ v

    def _record(self, layer: int, reduction: Reduction | str | None, tokens_in: int, state_in: TokenState,
                state_out: TokenState, queries: int, x: Tensor) -> None:
        """Per-image token counts of this block, for exact FLOPs (only inside `record_tokens`)."""
        if self._vitprune_trace is None:
            return
        batch, device = x.shape[0], x.device
        n_in = state_in.counts(tokens_in, batch, device)
        n_out = state_out.counts(x.shape[1], batch, device)
        queries_kept = reduction == HEAD_ONLY or (isinstance(reduction, Reduction) and reduction.spec.selects_queries)
        n_query = n_out if queries_kept else state_in.counts(queries, batch, device)
        entry = {"layer": layer, "reduction": reduction, "n_in": n_in.cpu(), "n_query": n_query.cpu(),
                 "n_out": n_out.cpu()}
        if state_out.source is not None:
            entry["source"] = state_out.source.cpu()
        self._vitprune_trace.append(entry)


HEAD_ONLY = "head"  # the trace's mark of the head-only last block
POOLS_OVER_TOKENS = ("avg", "max", "avgmax")  # timm global_pool values that read every patch token


def _reduce(spec: Any, x: Tensor, ctx: BlockContext, settings: dict) -> tuple[Tensor, TokenState]:
    """The method's reduction after attention; with source tracking on, the sources ride along as
    extra channels of the tokens, reduced exactly as the tokens are (vitprune.reducers.sources)."""
    if ctx.state.source is None:
        return spec.reduce(x, ctx, settings)
    out, state = spec.reduce(with_sources(x, ctx.state.source), ctx, settings)
    x, source = split_sources(out, x.shape[-1])
    return x, replace(state, source=source)


def _select(spec: Any, ctx: BlockContext, settings: dict) -> tuple[Tensor, TokenState]:
    """The method's selection before attention, with the selected tokens' sources when tracked."""
    index, state = spec.select(ctx, settings)
    if ctx.state.source is not None:
        state = replace(state, source=gather_sources(ctx.state.source, index, state.valid))
    return index, state


def _heads(attn: nn.Module, projected: Tensor, parts: int) -> tuple[Tensor, ...]:
    """(B, N, parts * attn_dim) -> `parts` tensors (B, H, N, hd), as timm's Attention splits qkv."""
    batch, tokens, _ = projected.shape
    return projected.reshape(batch, tokens, parts, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, hd) -> (B, N, H * hd)."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _project(attn: nn.Module, out: Tensor, gate_input: Tensor | None) -> Tensor:
    """timm's Attention after the attention product: its norm, the optional gate, the projection."""
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(gate_input).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _mlp_residual(block: nn.Module, x: Tensor) -> Tensor:
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _take_queries(q: Tensor, index: Tensor) -> Tensor:
    """The queries of the kept tokens: (B, H, N, hd) at index (B, K) -> (B, H, K, hd)."""
    return q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))


def _pack(x: Tensor, rows: Tensor | None) -> Tensor:
    """The real tokens of a padded batch as rows: (B, W, C) -> (real, C); `rows` from `_real_rows`."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _unpack(rows_out: Tensor, rows: Tensor | None, batch: int, width: int) -> Tensor:
    """The inverse of `_pack`: padding rows are zeros. -> (B, W, C)."""
    if rows is None:
        return rows_out.view(batch, width, -1)
    full = rows_out.new_zeros(batch * width, rows_out.shape[-1]).index_copy_(0, rows, rows_out)
    return full.view(batch, width, -1)


def _fill_padding(x: Tensor, valid: Tensor, num_prefix: int) -> Tensor:
    """Per-image padding rows (ATS) set to the mean of the image's real patch tokens: average pooling
    over all rows then gives the mean over the real ones (and max pooling their max)."""
    patch_valid = valid[:, num_prefix:].unsqueeze(-1)
    real_mean = (x[:, num_prefix:] * patch_valid).sum(dim=1, keepdim=True) / patch_valid.sum(dim=1, keepdim=True)
    return torch.where(valid.unsqueeze(-1), x, real_mean)


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
    problem = is_supported_vit(model)
    if problem:
        raise VitpruneError(problem)
    plan.validate(len(model.blocks), tokens=input_tokens(model, plan.img_size))
    has_cls = getattr(model, "cls_token", None) is not None
    token_pooling = getattr(model, "global_pool", "token") == "token" and getattr(model, "attn_pool", None) is None
    # per-image padding is filled with the real tokens' mean (`_fill_padding`): average and max pooling stay exact
    pools_real_tokens = token_pooling or (getattr(model, "attn_pool", None) is None
                                          and getattr(model, "global_pool", "token") in POOLS_OVER_TOKENS)
    for red in plan.reductions:
        if red.spec.needs_class_token(red.settings) and not has_cls:
            raise VitpruneError(f"{red.describe()} scores tokens by the class token's attention, and this model has "
                                "no class token; use tome (without protect)")
        if red.spec.needs_token_pooling and not pools_real_tokens:
            raise VitpruneError(f"{red.method} keeps a different token count per image and needs class-token or "
                                f"average pooling; this model pools by '{_pooling(model)}'")
    if plan.head_only and not token_pooling:
        raise VitpruneError(
            "head-only last block needs class-token pooling (the head must read only the class token); "
            f"this model pools by '{_pooling(model)}'"
        )


def input_tokens(model: nn.Module, img_size: int | None = None) -> int:
    """Tokens entering block 0 at `img_size` (default: the model's own), prefix tokens included."""
    grid = (img_size or model_img_size(model)) // patch_size_of(model)
    return grid * grid + model.num_prefix_tokens


def _pooling(model: nn.Module) -> str:
    return "attention (map)" if getattr(model, "attn_pool", None) is not None else str(model.global_pool)


def apply(model: nn.Module, plan: Plan | None = None, *, method: str | None = None, layers: list[int] | None = None,
          img_size: int | None = None, head_only: bool = False, **settings: Any) -> nn.Module:
    """Patch a timm ViT in place to reduce tokens, by a `plan` or by one method's settings.

    `settings` are the method's parameters: evit `keep`, `fuse`; ats `keep`; tome `r`, `protect`
    (the class token's attention weighed against merging a token; 0: plain ToMe).
    `head_only`: the last block computes only the class (and distillation/register) tokens, the
    only ones the head reads with class-token pooling: exact, about 7% fewer MACs unreduced.

    Returns the same model object, now running the reduction (its class becomes a subclass of
    its timm class). `vitprune.remove(model)` undoes it.
    """
    problem = is_supported_vit(model)
    if problem:
        raise VitpruneError(f"model is not a supported timm ViT ({problem})")
    if plan is None:
        if method is None:
            raise VitpruneError("give a plan or a method")
        plan = make_plan(method, len(model.blocks), layers=layers, img_size=img_size, head_only=head_only, **settings)
    elif method is not None:
        raise VitpruneError("give a plan or a method, not both")
    return apply_plan(model, plan)


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
    for name in ("vitprune_plan", "_vitprune_trace", "_vitprune_sources"):
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
def record_tokens(model: nn.Module, sources: bool = False) -> Iterator[list[dict]]:
    """Collect each block's per-image token counts during the forward passes inside the block.

    `sources`: also track which original patches each token stands for, recorded per block as
    `entry["source"]` (B, N, M) (see vitprune.reducers.sources; off by default, at no cost)."""
    if not isinstance(model, ReducedVisionTransformer):
        apply_plan(model, Plan())
        unpatch = True
    else:
        unpatch = False
    trace: list[dict] = []
    model._vitprune_trace, model._vitprune_sources = trace, sources
    try:
        yield trace
    finally:
        model._vitprune_trace, model._vitprune_sources = None, False
        if unpatch:
            remove_plan(model)


def set_dynamic_img_size(model: nn.Module, enabled: bool) -> nn.Module:
    """Let `model` take any input size that is a multiple of its patch size (SuperViT trains one
    set of weights at several sizes): timm then resamples the position embedding on every forward
    pass, differentiably, instead of once in `set_input_size`. The weights do not change, and the
    result equals `apply_plan` with that img_size. `enabled=False` restores the fixed size."""
    embed = model.patch_embed
    if enabled and not getattr(model, "_vitprune_fixed_size", None):
        model._vitprune_fixed_size = (model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = True, False, False, Format.NHWC
    elif not enabled and getattr(model, "_vitprune_fixed_size", None):
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = model._vitprune_fixed_size
        del model._vitprune_fixed_size
    return model
