"""The timm adapter: the only module that knows timm's VisionTransformer / Block / Attention.

`apply_plan` swaps the model's class for a subclass whose `forward_features` threads a token
state (ToMe sizes, ATS padding mask) through the blocks and runs the reducers of the plan; the
weights and every other method (heads, distillation tokens, registers) stay timm's own.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Format
from timm.models._features import feature_take_indices
from timm.models.naflexvit import NaFlexVit
from torch import Tensor, nn

from vitprune.blocks import block_kind
from vitprune.errors import VitpruneError
from vitprune.methods import BlockContext, TokenState
from vitprune.models import (
    RELATIVE_POSITION_CLASSES,
    grid_size,
    has_class_token,
    image_size,
    is_supported_vit,
    patch_size_of,
    set_image_size,
    stem_of,
)
from vitprune.plan import Plan, Reduction, make_plan
from vitprune.reducers import (
    PatchGrid,
    attention_probs,
    channel_positions,
    gather_tokens,
    index_holders,
    initial_positions,
    pair_bias,
    position_channels,
    token_rotations,
    unit_rotations,
)
from vitprune.reducers.sources import gather_sources, initial_sources


class ReducedVisionTransformer:
    """Mixin placed in front of the model's own timm class (see `apply_plan`).

    A reduced block runs one path (`_block`) for every block kind, assembled from the kind's
    pieces (vitprune.blocks: projections, attention residual, MLP residual).
    """

    vitprune_plan: Plan
    _vitprune_trace: list | None

    def forward_features(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise VitpruneError("a token-reduced ViT does not take an attention mask")
        return self.vitprune_blocks(self.vitprune_embed(x))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Tensor | None = None, is_causal: bool = False) -> Any:
        """timm's dense outputs of the reduced model, in timm's layout: each requested block's tokens
        put back on the patch grid (`PatchGrid.dense`: a merged token's features copied to every
        patch it holds, a dropped patch keeping the features it had when it was dropped). The final
        features are the reduced tokens, exactly `forward_features`' output, so `forward_head`
        gives the reduced model's logits."""
        if attn_mask is not None or is_causal:
            raise VitpruneError("a token-reduced ViT does not take an attention mask", param="attn_mask")
        if output_fmt not in ("NCHW", "NLC"):
            raise VitpruneError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}", param="output_fmt")
        if x.shape[0] == 0:  # (timm's own forward_intermediates fails on one too)
            raise VitpruneError("x is an empty batch: give at least one image", param="x")
        taps = self.vitprune_taps(indices, stop_early)
        final = self.vitprune_blocks(self.vitprune_embed(x), taps=taps)
        tokens = [torch.cat([out[:, :self.num_prefix_tokens], grid.dense(out)], dim=1) for out, grid, _ in taps.out]
        grid_size = stem_of(self).dynamic_feat_size(x.shape[-2:]) if output_fmt == "NCHW" else None
        return _timm_layout(self, tokens, final, return_prefix_tokens=return_prefix_tokens, norm=norm,
                            grid_size=grid_size, intermediates_only=intermediates_only, output_dict=output_dict)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's pruning of the blocks after the last requested one; the plan's reductions stay
        (all must sit in the kept blocks)."""
        depth = len(self.blocks)
        last = max(_take_indices(depth, indices))
        beyond = [red.layer for red in self.vitprune_plan.reductions if red.layer > last]
        if beyond:
            raise VitpruneError(f"prune_intermediate_layers would remove block {beyond[0]}, where the plan reduces "
                                f"tokens; keep blocks up to {max(beyond)} or change the plan", param="indices")
        if self.vitprune_plan.head_only:
            raise VitpruneError("prune_intermediate_layers takes the head whose class token a head-only plan "
                                "computes alone; apply the plan without head_only", param="indices")
        return original_class(self).prune_intermediate_layers(self, indices, prune_norm=prune_norm,
                                                               prune_head=prune_head)

    def vitprune_taps(self, indices: int | list[int] | None = None, stop_early: bool = False) -> DenseTaps:
        """What a dense forward pass keeps (`vitprune_blocks(taps=...)`): the blocks timm's `indices`
        name (the last n for an int, all for None), refused before running if a method of the plan
        cannot put its tokens back on the patch grid."""
        for red in self.vitprune_plan.reductions:
            if not red.spec.holds_patches:
                raise VitpruneError(f"dense outputs cannot put {red.method}'s tokens back on the patch grid: "
                                    f"{red.spec.no_patch_grid}", param="method")
        layers = _take_indices(len(self.blocks), indices)
        return DenseTaps(frozenset(layers), max(layers) if stop_early else len(self.blocks) - 1)

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickle (torch.save, copy.deepcopy) by the timm class: the reduced class is made at run
        time, so pickle could not find it by name; `_new_reduced` makes it again on loading."""
        _, _, *state = object.__reduce_ex__(self, max(protocol, 2))
        return (_new_reduced, (original_class(self),), *state)

    def vitprune_forward(self, x: Tensor, pad_to: int | None = None) -> Tensor:
        """Logits, with per-image methods (ATS) padding every batch to `pad_to` patch tokens: static
        shapes for graph export (`vitprune.export`)."""
        return self.forward_head(self.vitprune_blocks(self.vitprune_embed(x), pad_to=pad_to))

    def vitprune_embed(self, x: Tensor) -> Tensor:
        """Images -> the tokens entering block 0."""
        return _embed(self, x)

    def vitprune_rope(self) -> Tensor | None:
        """timm's rotary embeddings of the patch tokens (N, 2D) on rotary models (Eva), else None."""
        return patch_rotations(self)

    def vitprune_blocks(self, x: Tensor, start: int = 0, num_input_tokens: int | None = None,
                        pad_to: int | None = None, taps: DenseTaps | None = None) -> Tensor:
        """Run blocks `start`.. on plain tokens (no reduction may happen before `start`), then the
        final norm. `num_input_tokens`: the tokens that entered the model (ATS caps are ratios of it).
        `taps`: keep the tokens of its blocks with their patch grid (dense outputs), and stop after
        its last block; the last block then computes all tokens even in a head-only plan.
        Eager per-image methods pack the real tokens of a batch (one image has no padding to skip);
        graph capture and `pad_to` use the padded form, whose shapes a graph can hold."""
        if x.shape[0] == 0:  # an empty batch has no tokens to reduce (per-image widths have no maximum)
            return self.norm(x)
        num_input_tokens = x.shape[1] if num_input_tokens is None else num_input_tokens
        rope = self.vitprune_rope()
        if rope is not None and rope.shape[-2] != x.shape[1] - self.num_prefix_tokens:
            raise VitpruneError("a reduced rotary model runs at its own input size; set img_size to change it",
                                param="img_size")
        shared_bias = shared_position_bias(self)
        given = rope if rope is not None else shared_bias  # what timm's own block forward takes besides the tokens
        state = TokenState(rope=None if rope is None else token_rotations(rope, self.num_prefix_tokens, x.shape[0]),
                           position=initial_positions(*x.shape[:2], x.device) if has_position_bias(self) else None)
        # timm's rotations and position biases are for the unreduced tokens: its own block forward
        # serves those models only until the first reduction
        positional = state.rope is not None or state.position is not None
        reduced = False
        if getattr(self, "_vitprune_sources", False):  # source tracking (record_tokens(sources=True))
            state.source = initial_sources(x, self.num_prefix_tokens)
        if taps is not None:
            state.grid = PatchGrid.start(x, self.num_prefix_tokens)
        last = len(self.blocks) - 1
        pack = pad_to is None and not (torch.jit.is_tracing() or torch.compiler.is_compiling())
        for layer in range(start, len(self.blocks) if taps is None else taps.last + 1):
            block = self.blocks[layer]
            reduction = self.vitprune_plan.at(layer)
            head_only = layer == last and self.vitprune_plan.head_only and taps is None
            reduction = None if head_only else reduction
            if reduction is None and state.is_plain and not head_only and not (positional and reduced):
                x = block_kind(block).plain(block, x, given)  # timm's own forward: an unreduced block stays bit-identical
                self._record(layer, None, x.shape[1], state, state, x.shape[1], x)
            else:
                packed = pack and (state.valid is not None or (x.shape[0] > 1 and reduction is not None
                                                                and reduction.spec.varies_per_image))
                run = BlockRun(block, layer, reduction, num_input_tokens, pad_to, packed, head_only, shared_bias)
                x, state = self._block(run, x, state)
                reduced = reduced or reduction is not None
            if taps is not None and layer in taps.layers:
                taps.out.append((x, state.grid, state.valid))
        x = self.norm(x)
        if state.valid is not None and self.global_pool in POOLS_OVER_TOKENS:
            pooled_from = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
            x = _fill_padding(x, state.valid, pooled_from)
        return x

    def _block(self, run: BlockRun, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        """One block with its reduction: before attention (selected queries) or after it, the one
        path for every block kind (vitprune.blocks).

        `run.head_only`: the last block computes the prefix tokens alone (class, distillation,
        registers): with class-token pooling the head reads nothing else, so only the patch
        tokens' keys and values are needed. Exact.
        `run.packed`: a per-image method (ATS) has made the token count differ per image; the
        per-token layers (norms, projections, MLP: most of the compute) run on the real tokens
        alone, packed, and the batch is padded only where tokens meet (attention, masked), so fewer
        tokens per image are real speed-up in a batch.
        """
        block, kind, spec = run.block, block_kind(run.block), run.reduction.spec if run.reduction else None
        x_in, grid_in = x, state.grid
        rows = _real_rows(state.valid) if run.packed else None  # once per mask: each costs a device sync
        normed = _per_token(lambda t: kind.attention_input(block, t), x, rows)
        if run.head_only:
            prefix = self.num_prefix_tokens
            q = kind.project_q(block, normed[:, :prefix])
            k, v = _per_token(lambda t: kind.project_kv(block, t), normed, rows)
        else:
            q, k, v = _per_token(lambda t: kind.project_qkv(block, t), normed, rows)
        q, k, v = kind.heads(block, q, k, v, state.rope)
        # relative position biases: the unreduced bias's rows and columns at the tokens' own positions
        table = None if state.position is None else kind.position_bias(block, run.shared_bias)
        ctx = self._context(kind, block, q, k, v, state, run.num_input_tokens, run.pad_to,
                            _logit_bias(state, table, None if table is None else state.position[:, :q.shape[2]]))
        tokens_in = x.shape[1]
        if run.head_only:  # the prefix tokens are real in every image: no padding left
            x, normed, rows = x[:, :prefix], normed[:, :prefix], None
            state = TokenState(**{name: None if getattr(state, name) is None else getattr(state, name)[:, :prefix]
                                  for name in ("size", "rope", "position")})
        attn_bias = ctx.key_bias
        if spec is not None and spec.selects_queries:
            index, state = _select(spec, ctx, run.reduction.settings)
            q, x, normed = _take_queries(q, index), gather_tokens(x, index), gather_tokens(normed, index)
            rows = _real_rows(state.valid) if run.packed else None
            attn_bias = attn_bias if table is None else _logit_bias(ctx.state, table, state.position)  # their rows
        if spec is not None and spec.needs_attention:
            out = self._attend_explicit(kind, block, q, k, v, ctx)
        else:
            out = self._attend(kind, block, q, k, v, attn_bias)
        out = _merge_heads(out)
        x = _per_token(lambda t, o, n: kind.attention_residual(block, t, o, n), x, rows, out, normed)
        if spec is not None and not spec.selects_queries:
            x, state = _reduce(spec, x, ctx, run.reduction.settings)
            rows = _real_rows(state.valid) if run.packed else None
        if grid_in is not None and spec is not None:
            if state.holders is None:
                raise VitpruneError(f"{spec.name} did not say which token holds each patch", param="method")
            state = replace(state, grid=grid_in.follow(state.holders, x_in), holders=None)
        x = _per_token(lambda t: kind.mlp_residual(block, t), x, rows)
        self._record(run.layer, HEAD_ONLY if run.head_only else run.reduction, tokens_in, ctx.state, state,
                     q.shape[2], x)
        return x, state

    def _context(self, kind: Any, block: nn.Module, q: Tensor, k: Tensor, v: Tensor, state: TokenState,
                 num_input_tokens: int, pad_to: int | None, key_bias: Tensor | None) -> BlockContext:
        return BlockContext(q=q, k=k, v=v, scale=kind.scale(block), key_bias=key_bias, state=state,
                            num_prefix=self.num_prefix_tokens, num_input_tokens=num_input_tokens, pad_to=pad_to,
                            class_token=has_class_token(self))

    def _attend(self, kind: Any, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
                key_bias: Tensor | None) -> Tensor:
        """timm's fused scaled-dot-product attention, with the token state's logit bias."""
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if key_bias is None else key_bias.to(q.dtype),
            dropout_p=kind.dropout(block) if self.training else 0.0,
        )

    def _attend_explicit(self, kind: Any, block: nn.Module, q: Tensor, k: Tensor, v: Tensor,
                         ctx: BlockContext) -> Tensor:
        """The attention as softmax(q k^T) v, its probabilities kept in `ctx.attn` for methods that
        read all of them (`Method.needs_attention`): the same MACs as the fused kernel."""
        ctx.attn = attention_probs(q, k, ctx.scale, ctx.key_bias)
        probs = F.dropout(ctx.attn, kind.dropout(block)) if self.training else ctx.attn
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


@dataclass(frozen=True)
class DenseTaps:
    """The blocks whose tokens a dense forward pass keeps (`vitprune_blocks(taps=...)`), in `out`:
    per block (tokens (B, N', C), their PatchGrid, the padding mask (B, N') or None)."""

    layers: frozenset[int]
    last: int  # the last block run
    out: list = field(default_factory=list)


def _take_indices(depth: int, indices: int | list[int] | None) -> list[int]:
    """timm's block selection (`feature_take_indices`): the last n blocks for an int n, all for
    None, else those listed (negative ones count from the end)."""
    try:
        return list(feature_take_indices(depth, indices)[0])
    except (AssertionError, TypeError, ValueError) as error:  # ValueError: an empty list
        raise VitpruneError(f"indices must be a count in [1, {depth}] or block numbers in [-{depth}, {depth - 1}], "
                            f"got {indices!r}", param="indices") from error


def _timm_layout(model: nn.Module, tokens: list[Tensor], final: Tensor, *, return_prefix_tokens: bool,
                 norm: bool, grid_size: tuple[int, int] | None, intermediates_only: bool,
                 output_dict: bool) -> Any:
    """Dense tokens (B, P + M, C) per block in the layout of timm's `forward_intermediates`:
    prefix tokens split off, NCHW on `grid_size` (None: NLC), a list, pairs with the prefix
    tokens, or a dict."""
    num_prefix = model.num_prefix_tokens
    tokens = [model.norm(t) if norm else t for t in tokens]
    prefix = [t[:, :num_prefix] for t in tokens] if num_prefix else None
    spatial = [t[:, num_prefix:] for t in tokens]
    if grid_size is not None:
        spatial = [t.reshape(t.shape[0], *grid_size, -1).permute(0, 3, 1, 2).contiguous() for t in spatial]
    if output_dict:
        out: dict[str, Any] = {"image_intermediates": spatial}
        if prefix is not None and return_prefix_tokens:
            out["image_intermediates_prefix"] = prefix
        if not intermediates_only:
            out["image_features"] = final
        return out
    if return_prefix_tokens and prefix is not None:
        spatial = list(zip(spatial, prefix, strict=True))
    return spatial if intermediates_only else (final, spatial)


class ReducedNaFlexVit(ReducedVisionTransformer):
    """The adapter on timm's NaFlexVit called with an image batch (B, C, H, W): its embeddings
    (`embeds`: patches, position embedding, prefix tokens) then the same reduced blocks. NaFlex's
    patch sequences with padding (patch_coord, patch_valid) are refused: see `NAFLEX_REFUSAL`."""

    def forward_features(self, patches: Tensor, patch_coord: Tensor | None = None, patch_valid: Tensor | None = None,
                         attn_mask: Tensor | None = None) -> Tensor:
        _refuse_patch_sequences(patches, patch_coord, patch_valid)
        if attn_mask is not None:
            raise VitpruneError("a token-reduced ViT does not take an attention mask", param="attn_mask")
        return self.vitprune_blocks(self.vitprune_embed(patches))

    def forward_intermediates(self, x: Tensor, indices: int | list[int] | None = None, *args: Any,
                              patch_coord: Tensor | None = None, patch_valid: Tensor | None = None,
                              **kwargs: Any) -> Any:
        _refuse_patch_sequences(x, patch_coord, patch_valid)
        return super().forward_intermediates(x, indices, *args, **kwargs)


def _refuse_patch_sequences(x: Any, patch_coord: Tensor | None, patch_valid: Tensor | None) -> None:
    if isinstance(x, dict) or patch_coord is not None or patch_valid is not None:
        raise VitpruneError(NAFLEX_REFUSAL, param="patch_valid")


# Why a reduced NaFlexVit takes image batches only (docs/methods.md, "NaFlexVit").
NAFLEX_REFUSAL = ("a token-reduced NaFlexVit takes image batches (B, C, H, W) only, not NaFlex patch sequences with "
                  "padding (patch_coord, patch_valid): its reductions would rank, keep and merge padding patches "
                  "as if they were image; call the unreduced model (vitprune.remove(model)) for those")


@dataclass(frozen=True)
class BlockRun:
    """How one block runs in a reduced forward pass (see `ReducedVisionTransformer._block`)."""

    block: nn.Module
    layer: int
    reduction: Reduction | None
    num_input_tokens: int
    pad_to: int | None
    packed: bool  # per-token layers on the real tokens of a padded batch only
    head_only: bool  # the last block, for the prefix tokens alone
    shared_bias: Tensor | None = None  # the model's relative position bias shared by its blocks


POOLS_OVER_TOKENS = ("avg", "max", "avgmax")  # timm global_pool values that read every patch token


def _reduce(spec: Any, x: Tensor, ctx: BlockContext, settings: dict) -> tuple[Tensor, TokenState]:
    """The method's reduction after attention. What rides with the tokens (their sources while
    tracked, their rotary embeddings on rotary models, their positions on models with a relative
    position bias) rides as extra channels, reduced exactly as the tokens are
    (vitprune.reducers.sources, vitprune.reducers.rope, vitprune.reducers.position)."""
    state_in = ctx.state
    riders = {name: value for name, value in (
        ("source", state_in.source), ("rope", state_in.rope),
        ("position", None if state_in.position is None else position_channels(state_in.position, x.dtype)),
    ) if value is not None}
    if not riders:
        return spec.reduce(x, ctx, settings)
    out, state = spec.reduce(torch.cat([x, *(t.to(x.dtype) for t in riders.values())], dim=-1), ctx, settings)
    parts = out.split([x.shape[-1], *(t.shape[-1] for t in riders.values())], dim=-1)
    reduced = {name: part.contiguous() for name, part in zip(riders, parts[1:], strict=True)}
    if "rope" in reduced:
        reduced["rope"] = unit_rotations(reduced["rope"].to(ctx.state.rope.dtype))
    if "position" in reduced:
        reduced["position"] = channel_positions(reduced["position"])
    return parts[0].contiguous(), replace(state, **reduced)


def _select(spec: Any, ctx: BlockContext, settings: dict) -> tuple[Tensor, TokenState]:
    """The method's selection before attention, with the selected tokens' sources (when tracked)
    and rotary embeddings."""
    index, state = spec.select(ctx, settings)
    if ctx.state.grid is not None:
        state = replace(state, holders=index_holders(index, ctx.k.shape[2], state.valid))
    if ctx.state.source is not None:
        state = replace(state, source=gather_sources(ctx.state.source, index, state.valid))
    if ctx.state.rope is not None:
        state = replace(state, rope=gather_tokens(ctx.state.rope, index))
    if ctx.state.position is not None:
        state = replace(state, position=gather_tokens(ctx.state.position.unsqueeze(-1), index).squeeze(-1))
    return index, state


def _logit_bias(keys: TokenState, table: Tensor | None, query_position: Tensor | None) -> Tensor | None:
    """The keys' state's logit bias (B, 1, 1, N) plus, on relative-position blocks, the bias of each
    (query, key) pair of positions from the block's bias over the unreduced tokens `table` (H, N0, N0):
    (B, H, Nq, N)."""
    bias = keys.key_bias()
    if table is None:
        return bias
    pairs = pair_bias(table, query_position, keys.position)
    return pairs if bias is None else pairs + bias.to(pairs.dtype)


def _merge_heads(out: Tensor) -> Tensor:
    """(B, H, N, hd) -> (B, N, H * hd)."""
    batch, heads, tokens, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def _per_token(fn: Any, x: Tensor, rows: Tensor | None, *more: Tensor) -> Tensor:
    """`fn` on every token of `x` (and the same rows of `more`), on the real rows alone when `rows`
    (`_real_rows`) says the batch is padded: padding rows come back as zeros."""
    if rows is None:
        return fn(x, *more)
    batch, width, _ = x.shape
    out = fn(_pack(x, rows), *(_pack(t, rows) for t in more))
    if isinstance(out, tuple):
        return tuple(_unpack(part, rows, batch, width) for part in out)
    return _unpack(out, rows, batch, width)


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


def _fill_padding(x: Tensor, valid: Tensor, pooled_from: int) -> Tensor:
    """Per-image padding rows (ATS) set to the mean of the real tokens the pooling reads (the patch
    tokens, from `pooled_from`: the prefix too when timm pools it): average pooling over all rows then
    gives the mean over the real ones (and max pooling their max)."""
    pooled = valid[:, pooled_from:].unsqueeze(-1)
    real_mean = (x[:, pooled_from:] * pooled).sum(dim=1, keepdim=True) / pooled.sum(dim=1, keepdim=True)
    return torch.where(valid.unsqueeze(-1), x, real_mean)


def _real_rows(valid: Tensor | None) -> Tensor | None:
    """Flat indices of the real (non-padding) tokens of a (B, W) mask."""
    return None if valid is None else valid.flatten().nonzero().squeeze(1)


_REDUCED_CLASSES: dict[type, type] = {}


def _reduced_class(base: type) -> type:
    """One subclass per timm class, created once, so isinstance(model, base) still holds."""
    if base not in _REDUCED_CLASSES:
        mixin = ReducedNaFlexVit if issubclass(base, NaFlexVit) else ReducedVisionTransformer
        _REDUCED_CLASSES[base] = type(f"Reduced{base.__name__}", (mixin, base), {})
    return _REDUCED_CLASSES[base]


def _new_reduced(base: type) -> nn.Module:
    """An empty instance of the reduced subclass of `base`, for unpickling (see `__reduce_ex__`)."""
    cls = _reduced_class(base)
    return cls.__new__(cls)


def _check_rotary_grid(model: nn.Module, images: Tensor) -> None:
    """The rotations a reduced rotary model (Eva, NaFlexVit) carries are made for its recorded patch
    grid, also when timm would take any size (dynamic_img_size, NaFlex): a token count alone would let
    another grid of the same size through with the wrong rotations."""
    if getattr(model, "rope", None) is not None:
        grid = tuple(stem_of(model).dynamic_feat_size(tuple(images.shape[-2:])))
        if grid != tuple(grid_size(model)):
            raise VitpruneError(f"a reduced rotary model runs at its recorded input size "
                                f"{'x'.join(map(str, image_size(model)))} (patch grid {tuple(grid_size(model))}), "
                                f"got images of {images.shape[-2]}x{images.shape[-1]}; set img_size to change it",
                                param="img_size")


def _embed(model: nn.Module, images: Tensor) -> Tensor:
    """timm's embedding of `images`: the tokens entering block 0 (Eva's `_pos_embed` also returns the
    rotary embeddings, which `patch_rotations` gives the blocks; NaFlexVit's `_forward_embeds` too)."""
    _check_rotary_grid(model, images)
    if isinstance(model, NaFlexVit):
        return model._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)["patches"]
    if not hasattr(model, "_pos_embed"):  # Beit, VisionTransformerRelPos: as their forward_features
        x = model.patch_embed(images)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if getattr(model, "pos_embed", None) is not None:
            x = x + model.pos_embed
        return model.pos_drop(x) if hasattr(model, "pos_drop") else x
    x = model._pos_embed(model.patch_embed(images))
    x = x[0] if isinstance(x, tuple) else model.patch_drop(x)
    return model.norm_pre(x)


def patch_rotations(model: nn.Module) -> Tensor | None:
    """The rotary embeddings timm gives a rotary model's blocks (N, 2D), as its `_pos_embed` makes
    them at the model's input size; None on models without."""
    if getattr(model, "rope", None) is None:
        return None
    if isinstance(model, NaFlexVit):
        return model.rope.get_embed(shape=grid_size(model))
    embed = model.patch_embed
    grid = tuple(embed.grid_size) if getattr(model, "dynamic_img_size", False) else (embed.num_patches,)  # NHWC
    return model._pos_embed(next(model.parameters()).new_zeros(1, *grid, model.embed_dim))[1]


def shared_position_bias(model: nn.Module) -> Tensor | None:
    """The relative position bias a model shares among its blocks, as its forward makes it once
    (BEiT's `rel_pos_bias`, VisionTransformerRelPos's `shared_rel_pos`); None on models without."""
    if getattr(model, "rel_pos_bias", None) is not None:
        return model.rel_pos_bias()
    if getattr(model, "shared_rel_pos", None) is not None:
        return model.shared_rel_pos.get_bias()
    return None


def has_position_bias(model: nn.Module) -> bool:
    """Whether the model's attention adds a bias per pair of token positions (BEiT, VisionTransformerRelPos)."""
    return isinstance(model, RELATIVE_POSITION_CLASSES) and any(block_kind(block).relative_position
                                                                for block in model.blocks)


def carried_channels(model: nn.Module) -> int:
    """Channels that ride with the tokens through a reduction (the rotary embeddings), which a merge sums too."""
    rope = patch_rotations(model)
    return 0 if rope is None else int(rope.shape[-1])


def _plain_blocks(model: nn.Module, x: Tensor, start: int, end: int) -> Tensor:
    """timm's own forward of blocks start..end-1 on unreduced tokens."""
    rope = patch_rotations(model)
    given = rope if rope is not None else shared_position_bias(model)
    for block in list(model.blocks)[start:end]:
        x = block_kind(block).plain(block, x, given)
    return x


def original_class(model: nn.Module) -> type:
    cls = type(model)
    return cls.__bases__[-1] if issubclass(cls, ReducedVisionTransformer) else cls


def check_plan_fits(model: nn.Module, plan: Plan) -> None:
    """Refuse plans the model cannot run, with the reason in one line."""
    problem = is_supported_vit(model)
    if problem:
        raise VitpruneError(problem)
    plan.validate(len(model.blocks), tokens=input_tokens(model, plan.img_size))
    has_cls = has_class_token(model)
    token_pooling = getattr(model, "global_pool", "token") == "token" and getattr(model, "attn_pool", None) is None
    # per-image padding is filled with the real tokens' mean (`_fill_padding`): average and max pooling stay exact
    pools_real_tokens = token_pooling or (getattr(model, "attn_pool", None) is None
                                          and getattr(model, "global_pool", "token") in POOLS_OVER_TOKENS)
    relative_positions = has_position_bias(model)
    for red in plan.reductions:
        if relative_positions and red.spec.combines_tokens(red.settings):
            raise VitpruneError(f"{red.describe()} makes tokens that combine several patches, and this model's "
                                f"attention ({type(model).__name__}) adds a bias per pair of token positions, which "
                                "such a token does not have; use a pruning method (evit with fuse=false, ats, "
                                "zerotprune)")
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
    if img_size is None or img_size == model_img_size(model):  # the model's own grid, non-square too
        rows, columns = grid_size(model)
        return rows * columns + model.num_prefix_tokens
    grid = img_size // patch_size_of(model)
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
        set_image_size(model, plan.img_size)
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
    return image_size(model)[0]


def first_reduced_layer(model: nn.Module) -> int:
    """Blocks before this one run unreduced: their outputs can be cached across plans."""
    plan = plan_of(model)
    return len(model.blocks) if plan is None else plan.first_reduced_layer(len(model.blocks))


@torch.inference_mode()
def tokens_before(model: nn.Module, images: Tensor, layer: int) -> Tensor:
    """The (unreduced) tokens entering block `layer`: a cache for evaluating many plans that all
    start reducing at `layer` or later, with `logits_from`."""
    return _plain_blocks(model, _embed(model, images), 0, layer)


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
    return _plain_blocks(model, tokens, start, end)


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


@dataclass(frozen=True)
class ReducedTokens:
    """One block's output of a reduced model in its own layout (`reduced_intermediates`)."""

    tokens: Tensor  # (B, N', C): the prefix tokens, then the reduced patch tokens
    patch_map: Tensor  # (B, M) int64: for each patch of the grid (row-major), the row of `tokens` holding it; -1: dropped
    valid: Tensor | None  # (B, N') False on per-image padding (ATS batches); None: every row is real


def reduced_intermediates(model: nn.Module, images: Tensor, indices: int | list[int] | None = None) -> list[ReducedTokens]:
    """The reduced tokens of the blocks timm's `indices` name (the last n for an int, all for None),
    each with the map from the patch grid to them: what `forward_intermediates` spreads on the grid."""
    if not isinstance(model, ReducedVisionTransformer):
        raise VitpruneError("model is not token-reduced: apply a plan first (vitprune.apply)", param="model")
    taps = model.vitprune_taps(indices, stop_early=True)
    model.vitprune_blocks(model.vitprune_embed(images), taps=taps)
    return [ReducedTokens(tokens, grid.holder, valid) for tokens, grid, valid in taps.out]


def set_dynamic_img_size(model: nn.Module, enabled: bool) -> nn.Module:
    """Let `model` take any input size that is a multiple of its patch size (SuperViT trains one
    set of weights at several sizes): timm then resamples the position embedding on every forward
    pass, differentiably, instead of once in `set_input_size`. The weights do not change, and the
    result equals `apply_plan` with that img_size. `enabled=False` restores the fixed size. NaFlexVit
    always takes any size: nothing to change."""
    if isinstance(model, NaFlexVit):
        return model
    embed = model.patch_embed
    if enabled and not getattr(model, "_vitprune_fixed_size", None):
        model._vitprune_fixed_size = (model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt)
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = True, False, False, Format.NHWC
    elif not enabled and getattr(model, "_vitprune_fixed_size", None):
        model.dynamic_img_size, embed.strict_img_size, embed.flatten, embed.output_fmt = model._vitprune_fixed_size
        del model._vitprune_fixed_size
    return model
