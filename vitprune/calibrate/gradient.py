"""The gradient rate search (`calibrate --search gradient`): per-block token counts learned on the
frozen model, DiffRate-style (Chen et al., "DiffRate: Differentiable Compression Rate for Efficient
Vision Transformers", ICCV 2023).

Every block (but a head-only last one) has two sets of logits: over a grid of token counts to
remove (the count is the grid value nearest the expected one) and over the block methods (the
largest wins). The forward pass runs on dense tokens with masses (`vitprune.reducers.soft`), the
hard choice applied exactly; the backward pass carries the straight-through gradient of the
soft probabilities to the logits. The loss is the KL divergence from the unreduced model's
predictions (cross-entropy on the labels with objective top1) plus a penalty on the distance to
the GMACs target, the GMACs counted by vitprune.flops' rule (`block_macs`, methods' extra_macs)
on straight-through token counts, so their forward value is the hard plan's exact count. Only
the logits train; the weights are frozen. The learned counts become shapes that the rest of the
search scales to each budget like any other (`vitprune.calibrate.shapes.fit_to_budget`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune import methods
from vitprune.calibrate import policy
from vitprune.calibrate.search import Search
from vitprune.calibrate.shapes import CONSTANT_METHOD, Geometry, Shape, constant_shape
from vitprune.errors import VitpruneError
from vitprune.flops import block_macs
from vitprune.methods.base import CLS_SCORE
from vitprune.models import has_class_token
from vitprune.patch import HEAD_ONLY
from vitprune.reducers import SoftTokens, masked_attention, straight_through

GRID_POINTS = 48  # candidate counts per block: 0 and up to half the patch tokens, in even steps
MAX_REMOVE = 0.5  # the largest count, as a share of the patch tokens entering the model
STEPS = 60  # optimiser steps (calibrate --gradient-steps)
BATCH = 32  # images per step
LR = 0.1  # Adam on the count logits, decayed linearly to 0
GATE_LR = 0.02  # Adam on the method logits: a block changes method only on steady evidence
PENALTY = 20.0  # weight of (GMACs / target - 1)^2
INIT_WIDTH = 2.0  # initial count logits: a bump this many grid steps wide at ToMe's constant r


@dataclass
class Rates:
    """The learned logits: counts (blocks, grid) and methods (blocks, methods)."""

    counts: Tensor
    gates: Tensor
    grid: Tensor  # (K,) token counts
    methods: tuple[str, ...]
    blocks: int  # blocks 0 .. blocks-1 are searched (a head-only last block is not)

    def parameters(self) -> list[dict]:
        return [{"params": [self.counts], "lr": LR}, {"params": [self.gates], "lr": GATE_LR}]


@dataclass
class BlockChoice:
    """One method's straight-through share of one block."""

    method: str
    settings: dict | None  # its settings at the hard count; None: it removes nothing there
    tokens_after: int
    gate: Tensor  # scalar: 1 / 0 in the forward pass (the chosen method), the method probability's gradient
    active: bool


@dataclass
class Walk:
    """A pass over the blocks: each block's choices, the straight-through token counts and MACs."""

    choices: list[list[BlockChoice]] = field(default_factory=list)
    soft: list[Tensor] = field(default_factory=list)  # per block, (R,) the probability per ranked token of removal
    macs: Tensor | None = None


def make_rates(geometry: Geometry, block_methods: tuple[str, ...], start_r: float) -> Rates:
    """Logits that start at ToMe's constant schedule removing `start_r` tokens per block."""
    patch = geometry.tokens_at[geometry.base_size] - geometry.num_prefix
    top = max(1, round(MAX_REMOVE * patch))
    grid = torch.unique(torch.linspace(0, top, GRID_POINTS).round())
    step = float(grid[1] - grid[0]) if len(grid) > 1 else 1.0
    blocks = geometry.depth - (1 if geometry.head_only else 0)
    bump = -((grid - start_r) / (INIT_WIDTH * step)) ** 2
    gates = torch.zeros(blocks, len(block_methods))
    if CONSTANT_METHOD in block_methods:
        gates[:, block_methods.index(CONSTANT_METHOD)] = 1.0
    return Rates(counts=bump.repeat(blocks, 1).requires_grad_(True), gates=gates.requires_grad_(True),
                 grid=grid, methods=block_methods, blocks=blocks)


def block_choices(rates: Rates, layer: int, tokens: int, geometry: Geometry) -> tuple[list[BlockChoice], Tensor, Tensor]:
    """(each method's choice at `layer`, the soft removal probability per ranked token, the expected count)."""
    probs = rates.counts[layer].softmax(dim=0)
    expected = probs @ rates.grid
    hard_want = int(rates.grid[(rates.grid - expected.detach()).abs().argmin()])
    ranks = torch.arange(int(rates.grid[-1]))
    soft = (probs.unsqueeze(0) * (rates.grid.unsqueeze(0) > ranks.unsqueeze(1))).sum(dim=1)
    gate_probs = rates.gates[layer].softmax(dim=0)
    chosen = int(gate_probs.detach().argmax())
    choices = []
    for index, name in enumerate(rates.methods):
        removal = policy.removing(name, hard_want, tokens, geometry.num_prefix, geometry.protect)
        settings, after = removal if removal is not None else (None, tokens)
        gate = straight_through(torch.tensor(float(index == chosen)), gate_probs[index])
        choices.append(BlockChoice(name, settings, after, gate, index == chosen and settings is not None))
    return choices, soft, expected


def walk(rates: Rates, model: nn.Module, geometry: Geometry) -> Walk:
    """The hard choices block by block, and the plan's MACs per image with straight-through gradients."""
    tokens = geometry.tokens_at[geometry.base_size]
    prefix = geometry.num_prefix
    n_in = torch.tensor([float(tokens)], dtype=torch.float64)
    macs = constant_macs(model, geometry)
    out = Walk()
    for layer, block in enumerate(model.blocks):
        if layer >= rates.blocks:  # the head-only last block
            macs = macs + block_macs(block, n_in, torch.full_like(n_in, prefix), torch.full_like(n_in, prefix),
                                     HEAD_ONLY, prefix)
            continue
        choices, soft, expected = block_choices(rates, layer, tokens, geometry)
        removed = sum(c.gate.double() * ((tokens - c.tokens_after) + (expected - expected.detach()).double())
                      for c in choices)
        n_out = n_in - removed
        macs = macs + block_macs(block, n_in, n_in, n_out, None, prefix)
        for c in choices:
            if c.settings is not None:
                extra = methods.get(c.method).extra_macs(block.attn, n_in, torch.full_like(n_in, c.tokens_after),
                                                         prefix, c.settings)
                macs = macs + c.gate.double() * extra
        tokens = next((c.tokens_after for c in choices if c.active), tokens)
        n_in = n_out
        out.choices.append(choices)
        out.soft.append(soft)
    out.macs = macs
    return out


def constant_macs(model: nn.Module, geometry: Geometry) -> Tensor:
    """MACs outside the blocks (patch embedding, head): the base count less its blocks'."""
    tokens = torch.tensor([float(geometry.tokens_at[geometry.base_size])], dtype=torch.float64)
    blocks = sum(block_macs(block, tokens, tokens, tokens, None, geometry.num_prefix) for block in model.blocks)
    return geometry.base_gmacs * 1e9 - blocks


def soft_logits(model: nn.Module, tokens0: Tensor, path: Walk, num_prefix: int) -> Tensor:
    """The reduced model's logits on dense tokens (the tokens entering block 0), `path`'s choices applied."""
    x = tokens0
    tokens = SoftTokens(x=x, mass=x.new_ones(x.shape[:2]), alive=x.shape[1], metric=x[..., :0], cls_attn=x[..., 0])
    for layer, block in enumerate(model.blocks):
        tokens = soft_attention(block, tokens)
        if layer < len(path.choices):
            for choice in path.choices[layer]:
                soft = choice.gate * path.soft[layer]
                settings = choice.settings if choice.active else None
                tokens = methods.get(choice.method).soft_reduce(tokens, num_prefix, settings, soft)
        x = tokens.x + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens.x))))
        tokens = tokens._replace(x=x)
    return model.forward_head(model.norm(tokens.x[:, :tokens.alive]))


def soft_attention(block: nn.Module, tokens: SoftTokens) -> SoftTokens:
    """A timm Block's attention residual over every token, keys weighted by their mass; the class
    attention and the mean keys for the reductions that follow."""
    attn, x = block.attn, tokens.x
    batch, width, _ = x.shape
    normed = block.norm1(x)
    q, k, v = attn.qkv(normed).reshape(batch, width, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, weights = masked_attention(q, k, v, tokens.mass, attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(batch, width, -1))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(normed).sigmoid()
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return tokens._replace(x=x, metric=k.mean(dim=1), cls_attn=weights[:, :, 0].mean(dim=1))


def learned_shape(rates: Rates, geometry: Geometry, label: str = "gradient") -> Shape:
    """The hard counts and methods of `rates` as a shape (its relative counts, for fit_to_budget)."""
    depth = geometry.depth
    chosen, weights = [None] * depth, [0.0] * depth
    for layer in range(rates.blocks):
        probs = rates.counts[layer].detach().softmax(dim=0)
        want = float(rates.grid[(rates.grid - probs @ rates.grid).abs().argmin()])
        if want > 0:
            chosen[layer] = rates.methods[int(rates.gates[layer].detach().argmax())]
            weights[layer] = want
    return Shape(geometry.base_size, tuple(chosen), tuple(weights), label).normalised()


@dataclass
class Learned:
    rates: Rates
    trace: list[dict]  # per few steps: loss, KL (or cross-entropy), GMACs of the hard plan


def learn_rates(model: nn.Module, tokens0: Tensor, base_logits: Tensor, labels: Tensor | None,
                geometry: Geometry, block_methods: tuple[str, ...], target: float, start_r: float,
                steps: int = STEPS, seed: int = 0, advance=None) -> Learned:
    """Train the rate logits on frozen `model` (a copy is taken) to follow `base_logits` at `target` GMACs."""
    model = copy.deepcopy(model).eval().requires_grad_(False)
    rates = make_rates(geometry, block_methods, start_r)
    optimiser = torch.optim.Adam(rates.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    trace = []
    for step in range(steps):
        index = torch.randperm(len(tokens0), generator=generator)[:BATCH]
        path = walk(rates, model, geometry)
        logits = soft_logits(model, tokens0[index], path, geometry.num_prefix)
        fit = fit_loss(logits, base_logits[index], None if labels is None else labels[index])
        gmacs = path.macs.sum() / 1e9
        loss = fit + PENALTY * (gmacs / target - 1) ** 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if advance is not None:
            advance()
        if step % 5 == 0 or step == steps - 1:
            trace.append({"step": step, "loss": round(loss.item(), 5), "fit": round(fit.item(), 5),
                          "gmacs": round(gmacs.item(), 4)})
    return Learned(rates, trace)


def fit_loss(logits: Tensor, base_logits: Tensor, labels: Tensor | None) -> Tensor:
    """KL(base || reduced), or cross-entropy on `labels` when given."""
    if labels is not None:
        return F.cross_entropy(logits, labels)
    return F.kl_div(logits.log_softmax(dim=-1), base_logits.log_softmax(dim=-1), log_target=True,
                    reduction="batchmean")


def gradient_shapes(learned: Learned, geometry: Geometry) -> list[Shape]:
    """The learned shape and ToMe's constant schedule (the guard's yardstick), at the model's input size."""
    return [learned_shape(learned.rates, geometry), constant_shape(geometry.base_size, geometry.depth,
                                                                   f"{CONSTANT_METHOD} gamma=0")]


def start_count(model: nn.Module, geometry: Geometry, block_methods: tuple[str, ...], target: float) -> float:
    """The constant count per block whose hard plan (the initial logits) just meets `target` GMACs."""
    low, high = 0.0, float(max(1, round(MAX_REMOVE * (geometry.tokens_at[geometry.base_size] - geometry.num_prefix))))
    for _ in range(12):
        middle = (low + high) / 2
        with torch.no_grad():
            macs = float(walk(make_rates(geometry, block_methods, middle), model, geometry).macs.sum()) / 1e9
        low, high = (low, middle) if macs <= target else (middle, high)
    return high


def soft_methods(block_methods: tuple[str, ...], model: nn.Module) -> tuple[str, ...]:
    """The block methods the gradient search can learn on `model`: those with a soft form whose
    ranking is their hard reducer's here (the soft forward ranks by class-token attention)."""
    class_token = has_class_token(model)
    return tuple(name for name in block_methods if methods.get(name).soft_searchable
                 and methods.get(name).token_score(methods.get(name).settings({}), class_token) in (None, CLS_SCORE))


def gradient_search(search: Search, steps: int, seed: int) -> tuple[list[Shape], list[dict]]:
    """Learn the rates on the search subset at the target; (the shapes to rank, the training trace)."""
    setup = search.setup
    geometry = setup.geometry
    soft = soft_methods(setup.block_methods, setup.models[geometry.base_size])
    if not soft:
        raise VitpruneError("no token reduction method this model can run has a soft form for the gradient "
                            "search; use --search evolutionary", param="search")
    evaluator = search.evals.search
    model = setup.models[geometry.base_size]
    tokens0 = evaluator.cache(geometry.base_size).get(0)
    labels = evaluator.labels if search.objective == "top1" else None
    start = start_count(model, geometry, soft, setup.target)
    task = search.bar.add_task("Learning the rates (gradient)", total=steps)
    learned = learn_rates(model, tokens0, evaluator.base_logits, labels, geometry, soft, setup.target, start,
                          steps=steps, seed=seed, advance=lambda: search.bar.advance(task))
    return gradient_shapes(learned, geometry), learned.trace
