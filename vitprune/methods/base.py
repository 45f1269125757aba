"""What a token-reduction method is to vitprune: its parameters, where it runs, how it reduces.

A method module (evit.py, ats.py, tome.py) defines one `Method` subclass and registers an
instance in `vitprune.methods`. Everything else (plans, the timm adapter, FLOPs, calibrate,
cascade) asks the method instead of comparing names, so a new method is one new module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitprune.checks import is_finite_number
from vitprune.errors import VitpruneError
from vitprune.reducers import PatchGrid, SoftTokens, cls_attention, received_attention

REQUIRED = object()  # a parameter without a default
# More tokens than any ViT input holds: the upper bound of every token count, so a setting always fits
# the runtime's integers (the model's own token count is checked where a plan meets a model).
MAX_TOKENS = 1_000_000


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, help text and range.

    Numbers lie in [low, high] (`low_open`: (low, high]); `counts_tokens`: a value above 1 counts
    tokens, so it is also at most the tokens entering the model (checked against the model).
    `check` and `rule` add a rule the range cannot say (ATS: a ratio or a whole count)."""

    name: str
    kind: type
    help: str
    default: Any = REQUIRED
    low: float = 0.0
    high: float = MAX_TOKENS
    low_open: bool = False
    counts_tokens: bool = False
    check: Callable[[Any], bool] = lambda value: True
    rule: str = ""

    @property
    def range_text(self) -> str:
        """The values accepted, in words ('a whole number in [0, 1000000]')."""
        if self.kind is bool:
            return "true or false"
        if self.rule:
            return self.rule
        word = "a whole number" if self.kind is int else "a number"
        return f"{word} in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}]"

    def accepts(self, value: Any) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if not is_finite_number(value) or (self.kind is int and int(value) != value):
            return False
        above_low = value > self.low if self.low_open else value >= self.low
        return above_low and value <= self.high and self.check(value)

    def validate(self, method: str, value: Any, tokens: int | None = None) -> None:
        """`tokens`: the tokens entering the model, when the plan meets one."""
        if not self.accepts(value):
            raise VitpruneError(f"{method} {self.name} must be {self.range_text}, got {value!r}", param=self.name)
        if tokens is not None and self.counts_tokens and value > tokens:
            raise VitpruneError(f"{method} {self.name} must be at most {tokens} (the tokens entering this model), "
                                f"got {value!r}", param=self.name)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass
class TokenState:
    """What the reducers carry from block to block."""

    size: Tensor | None = None  # (B, N, 1) tokens each token stands for (ToMe); None: all 1
    valid: Tensor | None = None  # (B, N) False on per-image padding (ATS); None: all valid
    # (B, N, M) the original patches each token stands for, only while `record_tokens(sources=True)`
    # asks for it (vitprune.reducers.sources); None: not tracked, at no cost
    source: Tensor | None = None
    # (B, N, 2D) each token's rotary embedding [sin | cos] on rotary models (vitprune.reducers.rope)
    rope: Tensor | None = None
    # where each original patch is among the tokens, only while dense outputs are asked for
    # (forward_intermediates; vitprune.reducers.patch_grid); None: not tracked, at no cost
    grid: PatchGrid | None = None
    # (B, N_in) set by a reduction while `grid` is tracked: the output row holding each token that
    # entered it, -1 if dropped (`Method.holds_patches`); the adapter folds it into `grid`
    holders: Tensor | None = None

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


@dataclass
class BlockContext:
    """What a method's block hooks see inside one attention block (see `vitprune.patch`)."""

    q: Tensor  # (B, H, N, hd) queries, after timm's q_norm
    k: Tensor  # (B, H, N, hd) keys, after k_norm
    v: Tensor  # (B, H, N, hd)
    scale: float  # the attention's softmax scale
    key_bias: Tensor | None  # the token state's attention-logit bias
    state: TokenState
    num_prefix: int  # class, distillation and register tokens: never reduced
    num_input_tokens: int  # tokens entering the model (ATS caps are ratios of it)
    pad_to: int | None = None  # per-image methods: pad the batch to this width (static shapes)
    attn: Tensor | None = None  # (B, H, N, N) softmax attention, for `needs_attention` methods (after attending)
    class_token: bool = True  # the model has a class token (else attention scores fall back, `attention_scores`)


class Method:
    """Base class of the methods; subclasses set the class attributes and override the hooks."""

    name: str = ""
    paper: str = ""  # the paper the method follows (`vitprune methods`)
    # the first parameter is the one `METHOD:VALUE` sets (vitprune.plan's grammar)
    params: tuple[Param, ...] = ()
    # The kept count differs per image: the batch is padded (masked) from the first such block on,
    # so only methods of the same kind may follow, and FLOPs are counted on real images.
    varies_per_image: bool = False
    needs_token_pooling: bool = False  # the head must pool real tokens only: class token, average or max
    selects_queries: bool = False  # reduces before attention: only the kept tokens are queried
    # reads the whole attention of its block (`BlockContext.attn`): the adapter computes it there in
    # place of the fused kernel, and the block's own attention product uses it (no extra MACs)
    needs_attention: bool = False
    merges: bool = False  # tokens become groups of patches (`vitprune show` paints groups, not kept/dropped)
    # `reduce` sets `TokenState.holders` while `ctx.state.grid` is tracked (selections need not: the
    # adapter reads their indices), so dense outputs can put the tokens back on the patch grid
    holds_patches: bool = False
    no_patch_grid: str = "it does not say which token holds each patch"  # why not, when not

    # -- parameters ------------------------------------------------------------------------------
    def settings(self, given: dict[str, Any]) -> dict[str, Any]:
        """`given` with the defaults filled in; a parameter of another method is refused."""
        names = {param.name for param in self.params}
        unknown = sorted(set(given) - names)
        if unknown:
            takes = ", ".join(sorted(names))
            raise VitpruneError(f"{unknown[0]} is not a parameter of {self.name} (it takes {takes})", param=unknown[0])
        out = {}
        for param in self.params:
            value = given.get(param.name, param.default)
            if value is not REQUIRED:
                out[param.name] = value
        return out

    def validate(self, settings: dict[str, Any], tokens: int | None = None) -> None:
        """Every parameter given and in range (`tokens`: the tokens entering the model, when known)."""
        for param in self.params:
            if param.name not in settings:
                raise VitpruneError(f"{self.name} needs {param.name} ({param.help})", param=param.name)
            param.validate(self.name, settings[param.name], tokens)

    def shown(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings a plan line shows: the required ones and those away from their default."""
        return {param.name: settings[param.name] for param in self.params
                if param.default is REQUIRED or settings[param.name] != param.default}

    def default_layers(self, depth: int) -> list[int]:
        return list(range(depth))

    def needs_class_token(self, settings: dict[str, Any]) -> bool:
        return False

    def token_score(self, settings: dict[str, Any], class_token: bool) -> str | None:
        """The attention score this method ranks tokens by, on a model with or without a class token
        (the report names it); None: it scores no tokens by attention."""
        return None

    def static_width(self, settings: dict[str, Any], num_input_tokens: int) -> int:
        """`varies_per_image` methods: the most tokens a block can keep, the width the static-shape
        (ONNX) form pads every image to."""
        raise NotImplementedError(f"{self.name} keeps the same count for every image: nothing to pad")

    # -- the block hooks (see vitprune.patch) ------------------------------------------------------
    def select(self, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState] | None:
        """Before attention (`selects_queries`): (kept token indices (B, K), their state)."""
        return None

    def reduce(self, x: Tensor, ctx: BlockContext, settings: dict[str, Any]) -> tuple[Tensor, TokenState]:
        """After the attention residual, before the MLP: the reduced tokens and their state.

        Decide from `ctx` (attention, keys), and reduce `x` linearly (gathers, weighted sums): with
        source tracking on, `x` carries extra channels that must be reduced as the tokens are."""
        return x, ctx.state

    # -- FLOPs ------------------------------------------------------------------------------------
    def extra_macs(self, costs: Any, n_in: Tensor, n_out: Tensor, num_prefix: int,
                   settings: dict[str, Any], class_token: bool = True) -> Tensor:
        """MACs of the method's own matrix products inside a block (scoring, merging), float64 per
        image, as FlopCounterMode counts them; `costs`: the block's sizes (vitprune.flops.BlockCosts:
        attn_dim, head_dim, num_heads, width); `class_token`: the model has one (scores by attention
        fall back without it, `attention_scores`)."""
        return torch.zeros_like(n_in)

    # -- calibrate's gradient search (vitprune.reducers.soft) ----------------------------------------
    soft_searchable: bool = False  # `soft_reduce` is defined: the gradient search can learn this method's counts

    def soft_reduce(self, tokens: SoftTokens, num_prefix: int, settings: dict[str, Any] | None,
                    soft: Tensor) -> SoftTokens:
        """The reduction on dense tokens with masses: `settings` the hard choice (None: nothing removed),
        `soft` (R,) the probability of each ranked token (the first to go first) being removed, whose
        gradient the straight-through removal weights carry."""
        raise NotImplementedError


def cls_row_macs(costs: Any, n_in: Tensor) -> Tensor:
    """The CLS row of the attention computed once more, for scoring."""
    return n_in * costs.attn_dim


# The attention score of the scoring methods (EViT, ATS): the class token's attention row, or, on a
# model without a class token (`*_gap_*`, attention pooling), the mean attention each token receives
# from all queries (LTMP's and Zero-TPrune's importance).
def stage_layers(depth: int) -> list[int]:
    """The 4th, 7th and 10th of 12 blocks (the stage blocks of EViT and the methods that follow its
    setting), scaled to the depth."""
    return sorted({round(depth * i / 4) for i in (1, 2, 3)})


CLS_SCORE = "class-token attention"
RECEIVED_SCORE = "mean attention received (no class token)"


def attention_score_name(class_token: bool) -> str:
    return CLS_SCORE if class_token else RECEIVED_SCORE


def attention_scores(ctx: BlockContext) -> Tensor:
    """Per head, how much attention each token gets: (B, H, N), a distribution over the tokens."""
    if ctx.class_token:
        return cls_attention(ctx.q[:, :, :1], ctx.k, ctx.scale, ctx.key_bias)
    weight = None if ctx.state.size is None else ctx.state.size.squeeze(-1)
    if ctx.state.valid is not None:
        weight = ctx.state.valid.to(ctx.q.dtype) if weight is None else weight * ctx.state.valid
    return received_attention(ctx.q, ctx.k, ctx.scale, ctx.key_bias, weight)


def attention_score_macs(costs: Any, n_in: Tensor, class_token: bool) -> Tensor:
    """MACs of `attention_scores`: the class row once more, or every query's logits once more."""
    return cls_row_macs(costs, n_in) if class_token else n_in * n_in * costs.attn_dim
