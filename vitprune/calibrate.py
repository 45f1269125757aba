"""Calibrate: find the reduction plan that fits a budget best, on the user's own images.

The search never trains anything; it scores candidate plans by how closely the reduced model
follows the unreduced one on calibration images, and reports every figure on held-out images.
The calibration images are split once more: the search runs on a subset of them, and its finalists
are re-ranked and guarded on the rest (the validation images), which it did not select them on.

0. ToMe's protect weight (the class token's attention against merging a token, 0 = plain ToMe):
   each of PROTECT_WEIGHTS on ToMe's constant schedule at the budget, on the validation images;
   the best is used by every ToMe block searched after, and by the guard's ToMe schedule (a weight
   is one number chosen among four: it cannot overfit the way a searched shape can).
1. Sensitivity: reduce a quarter of the patch tokens at one block only, per block and per method
   (evit, tome), and measure the KL divergence to the base model and the GMACs saved.
2. Shapes: spread the reduction over the blocks in proportion to (GMACs saved / KL)^gamma, with the
   method per block fixed (all tome, all evit, the cheaper per block, EViT's 3 blocks), at each
   input size; each shape is scaled (bisection on exact GMACs) to just meet the budget. ATS (cap
   scaled to the budget) competes as well.
3. Refinement: a (1+1) evolutionary search mutates the best shape (a block's weight or method, the
   input size), rescales it to the budget and keeps what scores better.
4. Frontier: the best shapes (and the best of each input size), scaled to a ladder of budgets, give the accuracy/GMACs frontier; the
   chosen plan and every frontier point are then measured on the held-out images and timed.

Model outputs are cached: images are preprocessed once per input size, base logits computed once,
and the unreduced tokens entering block L are kept, so a plan whose first reduction is at block L
only runs the blocks from L on.
"""
from __future__ import annotations

import copy
import io
import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.plan import Plan, Reduction, check_protect, default_layers, make_plan

OBJECTIVES = ("kl", "agreement", "top1")
OBJECTIVE_TEXT = {
    "kl": "mean KL divergence from the unreduced model's predictions (lower is better)",
    "agreement": "top-1 agreement with the unreduced model (higher is better; KL breaks ties)",
    "top1": "top-1 accuracy against the labels (higher is better; KL breaks ties)",
}
PROBE_FRACTION = 0.25  # sensitivity probe: a quarter of the patch tokens removed at one block
MIN_EVIT_KEEP = 0.2  # shapes never keep fewer than this fraction of a block's patch tokens
GAMMAS = (0.0, 1.0, 2.0)  # 0: the same amount everywhere (ToMe's schedule); 2: strongly by efficiency
SHAPES_KEPT = 3  # best shapes carried to the frontier ladder and to the final re-ranking
LADDER_FINALISTS = 3  # per frontier budget: the best plans on the search subset, re-ranked on the validation images
# Finalists are re-ranked, and guarded, on the calibration images outside the search subset: plans
# the search selected on its subset look better there than they are. With fewer left than this,
# all calibration images are used (small image sets).
MIN_VALIDATION_IMAGES = 100
ATS_COUNT_IMAGES = 32  # ATS GMACs depend on the image: counted on this many images
EVAL_BATCH = 50
# A searched plan replaces ToMe's constant schedule only when it beats it on the validation images by
# this many standard errors of the paired per-image difference: among dozens of plans compared, the
# best on a few hundred images is partly the luckiest on them (the winner's curse).
GUARD_Z = 2.0
PROTECT_WEIGHTS = (0.0, 0.1, 0.2, 0.3)  # tome protect weights tried (0.1-0.3 won on both shared models)


@dataclass(frozen=True)
class Budget:
    """What the plan must fit: GMACs, a fraction of the base GMACs, measured latency, or an accuracy drop."""

    kind: str  # 'gmacs' | 'ratio' | 'latency' | 'max_drop'
    value: float
    batch: int = 32  # latency budgets: the batch size timed

    def describe(self) -> str:
        return {
            "gmacs": f"at most {self.value:g} GMACs / image",
            "ratio": f"at most {self.value:.0%} of the base GMACs",
            "latency": f"at most {self.value:g} ms / image at batch {self.batch} (measured)",
            "max_drop": f"the cheapest plan within {self.value:g} points of the base",
        }[self.kind]

    def to_dict(self) -> dict:
        out = {"kind": self.kind, "value": self.value, "text": self.describe()}
        if self.kind == "latency":
            out["batch"] = self.batch
        return out


def make_budget(*, target_gmacs: float | None = None, target_ratio: float | None = None,
                target_latency_ms: float | None = None, max_drop: float | None = None, batch: int = 32) -> Budget:
    """Exactly one budget, checked."""
    given = {name: value for name, value in (("--target-gmacs", target_gmacs), ("--target-ratio", target_ratio),
                                             ("--target-latency-ms", target_latency_ms), ("--max-drop", max_drop))
             if value is not None}
    if not given:
        raise VitpruneError("give a budget: --target-gmacs, --target-ratio, --target-latency-ms or --max-drop")
    if len(given) > 1:
        raise VitpruneError(f"give one budget, not several (got {' and '.join(given)})")
    if batch < 1:
        raise VitpruneError(f"--batch must be at least 1, got {batch}")
    if target_gmacs is not None:
        if not target_gmacs > 0:
            raise VitpruneError(f"--target-gmacs must be positive, got {target_gmacs:g}")
        return Budget("gmacs", float(target_gmacs))
    if target_ratio is not None:
        if not 0 < target_ratio < 1:
            raise VitpruneError(f"--target-ratio is a fraction of the base GMACs and must be in (0, 1), got {target_ratio:g}")
        return Budget("ratio", float(target_ratio))
    if target_latency_ms is not None:
        if not target_latency_ms > 0:
            raise VitpruneError(f"--target-latency-ms must be positive, got {target_latency_ms:g}")
        return Budget("latency", float(target_latency_ms), batch=batch)
    if not max_drop >= 0:
        raise VitpruneError(f"--max-drop must be zero or more points, got {max_drop:g}")
    return Budget("max_drop", float(max_drop))


@dataclass
class Score:
    """A plan measured on one image set."""

    gmacs: float
    kl: float
    agreement: float
    top1: float | None
    n_images: int
    # per image, lower is better: KL, and 0/1 misses (against the base model, against the labels)
    per_image: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def loss(self, objective: str) -> tuple[float, ...]:
        if objective == "kl":
            return (self.kl,)
        if objective == "agreement":
            return (-self.agreement, self.kl)
        return (-(self.top1 if self.top1 is not None else self.agreement), self.kl)

    def paired_gain(self, other: "Score", objective: str) -> tuple[float, float]:
        """How much better this plan is than `other` on the same images: (mean, standard error) of
        the per-image difference in the objective's term (KL, or a miss), positive when better."""
        term = {"kl": "kl", "agreement": "disagree", "top1": "miss" if "miss" in self.per_image else "disagree"}[objective]
        diff = other.per_image[term] - self.per_image[term]
        return float(diff.mean()), float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else math.inf

    def to_dict(self) -> dict:
        out = {"gmacs": round(self.gmacs, 4), "agreement": round(self.agreement, 2), "kl": round(self.kl, 5),
               "n_images": self.n_images}
        if self.top1 is not None:
            out["top1"] = round(self.top1, 2)
        return out


def plan_key(plan: Plan) -> str:
    data = plan.to_dict()
    data.pop("notes", None)
    return json.dumps(data, sort_keys=True)


def uses_ats(plan: Plan) -> bool:
    return any(red.method == "ats" for red in plan.reductions)


class TokenCache:
    """The unreduced tokens entering each block, for one input size and one image set, filled on
    demand from the nearest block below that is already cached."""

    def __init__(self, model: nn.Module, images: Tensor) -> None:
        self.model, self.images = model, images
        self.tokens: dict[int, Tensor] = {}

    def get(self, layer: int) -> Tensor:
        from vitprune.patch import advance_tokens, tokens_before

        if layer not in self.tokens:
            if 0 not in self.tokens:
                self.tokens[0] = torch.cat([tokens_before(self.model, self.images[i:i + EVAL_BATCH], 0)
                                            for i in range(0, len(self.images), EVAL_BATCH)])
            start = max(cached for cached in self.tokens if cached <= layer)
            source = self.tokens[start]
            self.tokens[layer] = torch.cat([advance_tokens(self.model, source[i:i + EVAL_BATCH], start, layer)
                                            for i in range(0, len(source), EVAL_BATCH)])
        return self.tokens[layer]


class Evaluator:
    """Scores plans on one image set against the base model's logits, with caches."""

    def __init__(self, models: dict[int, nn.Module], images: dict[int, Tensor], labels: Tensor | None,
                 base_logits: Tensor, macs: "MacsCounter", keep_all_sizes: bool = True) -> None:
        self.models, self.images, self.labels, self.base_logits, self.macs = models, images, labels, base_logits, macs
        self.keep_all_sizes = keep_all_sizes  # False: cache one input size at a time (large image sets)
        self.caches: dict[int, TokenCache] = {}
        self.scores: dict[str, Score] = {}
        self.evaluations = 0

    def cache(self, size: int) -> TokenCache:
        if size not in self.caches:
            if not self.keep_all_sizes:
                self.caches.clear()
            self.caches[size] = TokenCache(self.models[size], self.images[size])
        return self.caches[size]

    def logits(self, plan: Plan) -> Tensor:
        from vitprune.patch import apply_plan, logits_from

        model = apply_plan(self.models[plan.img_size], plan)
        depth = len(model.blocks)
        start = min(plan.first_reduced_layer(depth), depth - 1)
        tokens = self.cache(plan.img_size).get(start)
        num_input = self.cache(plan.img_size).get(0).shape[1]
        with torch.inference_mode():
            return torch.cat([logits_from(model, tokens[i:i + EVAL_BATCH], start, num_input).float()
                              for i in range(0, len(tokens), EVAL_BATCH)])

    def score(self, plan: Plan) -> Score:
        from vitprune.data import kl_per_image

        key = plan_key(plan)
        if key not in self.scores:
            logits = self.logits(plan)
            gmacs = self.macs.gmacs(plan, self.images[plan.img_size])
            # The means are taken from the per-image terms the guard pairs, so each is computed once.
            predicted = logits.argmax(dim=1)
            agree = (predicted == self.base_logits.argmax(dim=1)).double()
            per_image = {"kl": kl_per_image(logits, self.base_logits), "disagree": 1.0 - agree}
            top1 = None
            if self.labels is not None:
                hits = (predicted == self.labels).double()
                per_image["miss"] = 1.0 - hits
                top1 = hits.mean().item() * 100.0
            self.scores[key] = Score(gmacs=gmacs, kl=per_image["kl"].mean().item(), agreement=agree.mean().item() * 100.0,
                                     top1=top1, n_images=len(self.base_logits), per_image=per_image)
            self.evaluations += 1
        return self.scores[key]


class MacsCounter:
    """Exact GMACs per image of plans (vitprune.flops.count_macs), memoised. EViT and ToMe counts do
    not depend on the image; ATS counts are averaged over the first images of the set given."""

    def __init__(self, models: dict[int, nn.Module]) -> None:
        self.models = models
        self.known: dict[str, float] = {}

    def gmacs(self, plan: Plan, images: Tensor | None = None) -> float:
        from vitprune.flops import count_macs
        from vitprune.patch import apply_plan

        ats = uses_ats(plan)
        key = plan_key(plan) + (f"|{id(images)}" if ats else "")
        if key not in self.known:
            model = apply_plan(self.models[plan.img_size], plan)
            sample = images[:ATS_COUNT_IMAGES] if ats and images is not None else None
            self.known[key] = count_macs(model, sample).gmacs
        return self.known[key]


@dataclass(frozen=True)
class Shape:
    """How a plan spreads its reduction over the blocks; `shape_plan` scales it to an amount."""

    img_size: int
    methods: tuple[str | None, ...]  # per block: 'evit', 'tome' or None
    weights: tuple[float, ...]  # relative number of tokens removed in each block
    label: str

    def normalised(self) -> "Shape":
        top = max((w for w, m in zip(self.weights, self.methods) if m is not None), default=0.0)
        if top <= 0:
            return self
        return replace(self, weights=tuple(round(w / top, 4) for w in self.weights))


@dataclass(frozen=True)
class AtsShape:
    """ATS in the blocks from `start` on, its cap scaled to the budget."""

    img_size: int
    start: int
    label: str = "ats"


def shape_plan(shape: Shape, scale: float, num_tokens: int, num_prefix: int, head_only: bool = False,
               protect: float = 0.0) -> Plan:
    """Remove about `scale * weight` tokens in each block (within each method's limits), ToMe blocks
    with the `protect` weight. With `head_only` the last block keeps only the prefix tokens, so it
    reduces nothing else."""
    from vitprune.reducers import evit_keep_count

    reductions = []
    tokens = num_tokens
    last = len(shape.methods) - 1
    for layer, (method, weight) in enumerate(zip(shape.methods, shape.weights)):
        if method is None or weight <= 0 or (head_only and layer == last):
            continue
        want = round(scale * weight)
        patch = tokens - num_prefix
        if method == "tome":
            r = min(want, patch // 2)
            if r > 0:
                reductions.append(Reduction(layer=layer, method="tome", r=r, protect=protect))
                tokens -= r
        else:
            removed = min(want, patch - max(1, math.ceil(MIN_EVIT_KEEP * patch)))
            if removed > 0:
                keep = round((patch - removed) / patch, 4)
                reductions.append(Reduction(layer=layer, method="evit", keep=keep, fuse=True))
                tokens = num_prefix + evit_keep_count(patch, keep) + 1  # + the fused token
    return Plan(reductions=tuple(reductions), img_size=shape.img_size, head_only=head_only)


def ats_plan(shape: AtsShape, keep: float, depth: int, head_only: bool = False) -> Plan:
    return Plan(reductions=tuple(Reduction(layer=layer, method="ats", keep=round(keep, 4))
                                 for layer in range(shape.start, depth - 1 if head_only else depth)),
                img_size=shape.img_size, head_only=head_only)


@dataclass
class Geometry:
    depth: int
    num_prefix: int
    tokens_at: dict[int, int]  # input size -> tokens entering block 0
    base_size: int
    base_gmacs: float
    head_only: bool = False  # every plan computes only the prefix tokens in the last block
    tome_protect: float = 0.0  # the protect weight of every ToMe block


def fit_to_budget(shape: Shape | AtsShape, target: float, geometry: Geometry, macs: MacsCounter,
                  count_images: dict[int, Tensor]) -> Plan | None:
    """The least reduction of `shape` whose GMACs fit `target`, or None when it cannot reach it."""
    size = shape.img_size
    images = count_images[size]
    if isinstance(shape, AtsShape):
        def build(amount: float) -> Plan:  # amount 0 -> cap 1.0 (no explicit cap), 1 -> cap 0.05
            return ats_plan(shape, 1.0 - 0.95 * amount, geometry.depth, geometry.head_only)
        high = 1.0
    else:
        def build(amount: float) -> Plan:
            return shape_plan(shape, amount, geometry.tokens_at[size], geometry.num_prefix, geometry.head_only,
                              geometry.tome_protect)
        high = float(geometry.tokens_at[size])
    if macs.gmacs(build(0.0), images) <= target:
        return build(0.0)
    if macs.gmacs(build(high), images) > target:
        return None
    low = 0.0
    for _ in range(18):
        middle = (low + high) / 2
        if macs.gmacs(build(middle), images) <= target:
            high = middle
        else:
            low = middle
    return build(high)


def sensitivity_probe(evaluator: Evaluator, geometry: Geometry, methods: tuple[str, ...], bar, task) -> list[dict]:
    """KL and GMACs saved when a quarter of the patch tokens is removed at one block only."""
    size = geometry.base_size
    patch = geometry.tokens_at[size] - geometry.num_prefix
    unit = max(1, round(PROBE_FRACTION * patch))
    rows = []
    for layer in range(geometry.depth):
        row: dict = {"layer": layer}
        for method in methods:
            reduction = (Reduction(layer=layer, method="tome", r=min(unit, patch // 2), protect=geometry.tome_protect)
                         if method == "tome"
                         else Reduction(layer=layer, method="evit", keep=round(1 - unit / patch, 4)))
            score = evaluator.score(Plan(reductions=(reduction,), img_size=size))
            row[method] = {"kl": score.kl, "saved_gmacs": geometry.base_gmacs - score.gmacs,
                           "agreement": score.agreement}
            bar.advance(task)
        rows.append(row)
    return rows


def choose_protect(evaluator: "Evaluator", geometry: Geometry, target: float, macs: "MacsCounter",
                   count_images: dict[int, Tensor], objective: str, bar, task) -> tuple[float, list[dict]]:
    """The protect weight whose ToMe constant schedule at the budget scores best (on `evaluator`'s images)."""
    constant = Shape(geometry.base_size, ("tome",) * geometry.depth, (1.0,) * geometry.depth, "tome constant")
    tried = []
    for weight in PROTECT_WEIGHTS:
        plan = fit_to_budget(constant, target, replace(geometry, tome_protect=weight), macs, count_images)
        if plan is not None:
            score = evaluator.score(plan)
            tried.append({"protect": weight, "loss": score.loss(objective), **score.to_dict()})
        bar.advance(task)
    if not tried:
        return 0.0, []
    best = min(tried, key=lambda entry: entry["loss"])
    return best["protect"], [{k: v for k, v in entry.items() if k != "loss"} for entry in tried]


def make_shapes(sensitivity: list[dict], geometry: Geometry, methods: tuple[str, ...], sizes: list[int]) -> list:
    """Candidate shapes from the sensitivity of each block (see the module docstring)."""
    depth = geometry.depth
    block_methods = tuple(m for m in methods if m != "ats")  # ATS must be last: it gets its own shape
    kls = [row[m]["kl"] for row in sensitivity for m in block_methods]
    floor = max(sorted(kls)[len(kls) // 2] * 0.05, 1e-6)  # a nearly free block must not take everything

    def efficiency(layer: int, method: str) -> float:
        entry = sensitivity[layer][method]
        return max(entry["saved_gmacs"], 1e-9) / max(entry["kl"], floor)

    assignments: dict[str, tuple[str | None, ...]] = {m: (m,) * depth for m in block_methods}
    if len(block_methods) > 1:
        assignments["mixed"] = tuple(max(block_methods, key=lambda m: efficiency(layer, m)) for layer in range(depth))
    shapes: list = []
    for size in sizes:
        for name, assignment in assignments.items():
            for gamma in GAMMAS:
                weights = tuple(efficiency(layer, m) ** gamma for layer, m in enumerate(assignment))
                shapes.append(Shape(size, assignment, weights, f"{name} gamma={gamma:g}").normalised())
        if "evit" in methods:  # EViT's own schedule: three evenly spaced blocks
            evit_layers = set(default_layers("evit", depth))
            shapes.append(Shape(size, tuple("evit" if layer in evit_layers else None for layer in range(depth)),
                                (1.0,) * depth, "evit 3 blocks"))
    if "ats" in methods:
        shapes.append(AtsShape(geometry.base_size, start=default_layers("ats", depth)[0]))
    return shapes


def mutate(shape: Shape, methods: tuple[str, ...], sizes: list[int], rng: random.Random) -> Shape:
    """One to two blocks change weight or method; sometimes the input size moves one step."""
    weights, chosen = list(shape.weights), list(shape.methods)
    block_methods = [m for m in methods if m != "ats"]
    for layer in rng.sample(range(len(weights)), k=rng.choice((1, 2))):
        move = rng.random()
        if move < 0.3 and len(block_methods) > 1:
            chosen[layer] = rng.choice([m for m in block_methods if m != chosen[layer]])
            weights[layer] = weights[layer] or 0.5
        elif chosen[layer] is None or weights[layer] == 0:
            chosen[layer] = chosen[layer] or rng.choice(block_methods)
            weights[layer] = rng.choice((0.25, 0.5, 1.0))
        else:
            weights[layer] *= rng.choice((0.0, 0.5, 1.5, 2.0))
    size = shape.img_size
    if len(sizes) > 1 and rng.random() < 0.2:
        index = sizes.index(size) + rng.choice((-1, 1))
        size = sizes[min(max(index, 0), len(sizes) - 1)]
    return Shape(size, tuple(chosen), tuple(weights), "refined").normalised()


def reference_plans(depth: int, methods: tuple[str, ...]) -> dict[str, Plan]:
    """The fixed published schedules: EViT keep 0.7 at its 3 blocks, ToMe r = 8, 13, 16."""
    refs: dict[str, Plan] = {}
    if "evit" in methods:
        refs["EViT 0.7 @" + ",".join(map(str, default_layers("evit", depth)))] = make_plan("evit", depth, keep=0.7)
    for r in (8, 13, 16):
        refs[f"ToMe r={r}"] = make_plan("tome", depth, r=r)
    return refs


def auto_sizes(base_size: int, patch: int) -> list[int]:
    """The model's size and up to 3 smaller multiples of the patch size, down to 3/4 of it."""
    return [base_size - k * patch for k in range(4) if base_size - k * patch >= 0.75 * base_size]


def pareto_mask(points: list[tuple[float, tuple]]) -> list[bool]:
    """True for each (gmacs, loss) no other point beats on both (lower GMACs, lower loss)."""
    return [not any((g2 <= g and l2 <= l) and (g2 < g or l2 < l) for g2, l2 in points) for g, l in points]


@dataclass
class CalibrateRequest:
    """Everything `vitprune calibrate` takes; the same fields as its options."""

    model: str
    data: Path
    budget: Budget
    checkpoint: Path | None = None
    no_pretrained: bool = False
    img_size: int | None = None
    img_sizes: list[int] | None = None  # None: auto_sizes
    limit: int | None = None
    holdout: float = 0.5
    seed: int = 0
    swap_split: bool = False  # calibrate on the held-out part and hold out the rest (2-fold cross-checks)
    objective: str = "kl"
    head_only: bool = True  # the head-only last block, where the model pools by class token
    protect: float | None = None  # tome protect weight; None: chosen among PROTECT_WEIGHTS
    search_images: int = 128
    refine_steps: int = 16
    bench_repeats: int = 5
    workers: int = 2
    output: Path | None = None
    force: bool = False
    progress: bool = True


@dataclass
class CalibrateResult:
    plan: Plan
    reduced: nn.Module
    report: dict
    calibration_files: list[Path] = field(default_factory=list)
    holdout_files: list[Path] = field(default_factory=list)


def check_request(request: CalibrateRequest) -> None:
    from vitprune.io import check_output_dir

    if request.objective not in OBJECTIVES:
        raise VitpruneError(f"unknown objective '{request.objective}'; choose one of {', '.join(OBJECTIVES)}")
    if not 0 < request.holdout < 1:
        raise VitpruneError(f"--holdout must be a fraction in (0, 1), got {request.holdout:g}")
    if request.search_images < 1:
        raise VitpruneError(f"--search-images must be at least 1, got {request.search_images}")
    if request.refine_steps < 0:
        raise VitpruneError(f"--refine-steps must be zero or more, got {request.refine_steps}")
    if request.bench_repeats < 1:
        raise VitpruneError(f"--bench-repeats must be at least 1, got {request.bench_repeats}")
    if request.protect is not None:
        check_protect(request.protect, "--protect")
    if request.img_sizes is not None and any(size <= 0 for size in request.img_sizes):
        raise VitpruneError(f"input sizes must be positive, got {request.img_sizes}")
    if request.output is not None:
        check_output_dir(request.output, request.force)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def run_calibrate(request: CalibrateRequest) -> CalibrateResult:
    """Search the plan for the budget, measure it and its frontier on held-out images, write the artifact."""
    from vitprune.artifact import model_identity, versions, write_artifact
    from vitprune.bench import measure_latency
    from vitprune.data import classification_metrics, find_images, load_images, predict, split, transform_for
    from vitprune.patch import apply_plan, check_plan_fits, model_img_size
    from vitprune.pipeline import load_base
    from vitprune.report import make_report

    check_request(request)
    base = load_base(request.model, request.checkpoint, request.no_pretrained, request.img_size)
    base_model = base.model.eval()
    base_size = model_img_size(base_model)
    patch = base_model.patch_embed.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    sizes = sorted(set(request.img_sizes or auto_sizes(base_size, patch)) | {base_size}, reverse=True)
    bad = [size for size in sizes if size % patch]
    if bad:
        raise VitpruneError(f"input sizes must be multiples of the patch size {patch}, got {bad}")
    depth = len(base_model.blocks)
    methods = tuple(m for m in ("evit", "tome", "ats")
                    if _fits(check_plan_fits, base_model, make_plan(m, depth, keep=0.9, r=1)))

    # The budget is checked before any image is read: an unreachable one fails at once.
    started = time.perf_counter()
    models = {size: apply_plan(copy.deepcopy(base_model), Plan(img_size=size)) for size in sizes}
    macs = MacsCounter(models)
    base_gmacs = macs.gmacs(Plan(img_size=base_size))
    head_only = request.head_only and _fits(check_plan_fits, base_model, Plan(head_only=True))
    geometry = Geometry(depth=depth, num_prefix=base_model.num_prefix_tokens,
                        tokens_at={s: _input_tokens(models[s], s) for s in sizes},
                        base_size=base_size, base_gmacs=base_gmacs, head_only=head_only)
    budget = request.budget
    if budget.kind in ("gmacs", "ratio"):
        target = budget.value if budget.kind == "gmacs" else budget.value * base_gmacs
        ladder = sorted({round(r, 2) for r in (0.9, 0.8, 0.7, 0.6, 0.5) if r * base_gmacs > target * 1.02}, reverse=True)
        ladder_targets = [r * base_gmacs for r in ladder] + [target]
    else:
        target = 0.6 * base_gmacs  # shapes are discovered at a middle budget, then scaled along the ladder
        ladder_targets = [round(r, 2) * base_gmacs for r in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4)]
    block_methods = tuple(m for m in methods if m != "ats")
    if not block_methods:
        raise VitpruneError("this model supports no token reduction method vitprune can calibrate")
    most = Shape(sizes[-1], ("tome",) * depth, (1.0,) * depth, "most")
    floor_gmacs = macs.gmacs(shape_plan(most, float(geometry.tokens_at[sizes[-1]]), geometry.tokens_at[sizes[-1]],
                                        geometry.num_prefix, head_only))
    if target < floor_gmacs:
        raise VitpruneError(f"the budget of {target:.3f} GMACs is out of reach: the most reduced plan searched "
                            f"(ToMe at every block, {sizes[-1]}px) needs {floor_gmacs:.3f} GMACs")
    ladder_targets = [t for t in ladder_targets if t >= floor_gmacs]

    image_set = find_images(request.data, limit=request.limit, seed=request.seed)
    calibration_set, holdout_set = split(image_set, request.holdout, request.seed)
    if request.swap_split:
        calibration_set, holdout_set = holdout_set, calibration_set
    labelled = image_set.labels is not None
    objective = request.objective
    if objective == "top1" and not labelled:
        raise VitpruneError(f"--objective top1 needs labelled images, and {request.data} has no labels")
    calib_images: dict[int, Tensor] = {}
    holdout_images: dict[int, Tensor] = {}
    labels = holdout_labels = None
    for size in sizes:
        transform = transform_for(base_model, img_size=None if size == base_size else size)
        calib_images[size], labels = load_images(calibration_set, transform, num_workers=request.workers,
                                                 progress=request.progress)
        holdout_images[size], holdout_labels = load_images(holdout_set, transform, num_workers=request.workers,
                                                           progress=request.progress)
    base_calib_logits = predict(base_model, calib_images[base_size], progress=request.progress,
                                description="Base model, calibration images")
    base_holdout_logits = predict(base_model, holdout_images[base_size], progress=request.progress,
                                  description="Base model, held-out images")

    search_index = sorted(random.Random(request.seed).sample(range(len(calibration_set)),
                                                             min(request.search_images, len(calibration_set))))
    search_eval = Evaluator(models, {s: t[search_index] for s, t in calib_images.items()},
                            None if labels is None else labels[search_index], base_calib_logits[search_index], macs)
    searched = set(search_index)
    validation_index = [i for i in range(len(calibration_set)) if i not in searched]
    if len(validation_index) < MIN_VALIDATION_IMAGES:
        validation_index = list(range(len(calibration_set)))
    validation_eval = Evaluator(models, {s: t[validation_index] for s, t in calib_images.items()},
                                None if labels is None else labels[validation_index],
                                base_calib_logits[validation_index], macs, keep_all_sizes=False)
    holdout_eval = Evaluator(models, holdout_images, holdout_labels, base_holdout_logits, macs, keep_all_sizes=False)
    count_images = search_eval.images

    rng = random.Random(request.seed)
    # protect weighs the class token's attention: only for models with one (the same test as evit's)
    can_protect = "tome" in methods and _fits(check_plan_fits, base_model, make_plan("tome", depth, r=1, protect=0.1))
    with _progress(request.progress) as bar:
        protect_trials: list[dict] = []
        if request.protect is not None or not can_protect:
            if request.protect and not can_protect:
                raise VitpruneError("--protect weighs the class token's attention, and this model has no class token "
                                    "(or cannot run tome)")
            geometry.tome_protect = request.protect or 0.0
        else:
            task = bar.add_task("ToMe protect weight", total=len(PROTECT_WEIGHTS))
            geometry.tome_protect, protect_trials = choose_protect(validation_eval, geometry, target, macs, count_images,
                                                                   objective, bar, task)
        probe_methods = tuple(m for m in block_methods)
        task = bar.add_task("Sensitivity per block", total=depth * len(probe_methods))
        sensitivity = sensitivity_probe(search_eval, geometry, probe_methods, bar, task)
        shapes = make_shapes(sensitivity, geometry, methods, sizes)

        task = bar.add_task("Shapes at the budget", total=len(shapes))
        ranked: list[tuple[tuple, Shape | AtsShape, Plan]] = []
        for shape in shapes:
            plan = fit_to_budget(shape, target, geometry, macs, count_images)
            if plan is not None:
                ranked.append((search_eval.score(plan).loss(objective), shape, plan))
            bar.advance(task)
        if not ranked:
            raise VitpruneError(f"no plan searched reaches the budget of {target:.3f} GMACs")
        ranked.sort(key=lambda item: item[0])

        task = bar.add_task("Refining (evolutionary)", total=request.refine_steps)
        best_loss, best_shape, best_plan = next((item for item in ranked if isinstance(item[1], Shape)), ranked[0])
        for _ in range(request.refine_steps):
            if isinstance(best_shape, Shape):
                candidate = mutate(best_shape, methods, sizes, rng)
                plan = fit_to_budget(candidate, target, geometry, macs, count_images)
                if plan is not None:
                    loss = search_eval.score(plan).loss(objective)
                    ranked.append((loss, candidate, plan))
                    if loss < best_loss:
                        best_loss, best_shape = loss, candidate
            bar.advance(task)
        ranked.sort(key=lambda item: item[0])
        top: list[tuple[tuple, Shape | AtsShape, Plan]] = []
        for item in ranked:  # distinct plans only
            if all(plan_key(item[2]) != plan_key(other[2]) for other in top):
                top.append(item)
            if len(top) == SHAPES_KEPT:
                break

        # The frontier: the best shapes, the best shape of each input size (a size that wins at the
        # target can lose at milder budgets) and ToMe's own constant-r schedule, scaled to every budget
        # of the ladder. At each budget the few best on the search subset are re-ranked on the
        # validation images: the subset alone is too small to choose between close plans, and biased.
        ladder_shapes = [shape for _, shape, _ in top]
        for size in sizes:
            best_of_size = next((shape for _, shape, _ in ranked if shape.img_size == size), None)
            if best_of_size is not None and best_of_size not in ladder_shapes:
                ladder_shapes.append(best_of_size)
        constant_tome = next((shape for shape in shapes if isinstance(shape, Shape) and shape.img_size == base_size
                              and shape.label == "tome gamma=0"), None)
        if constant_tome is not None and constant_tome not in ladder_shapes:
            ladder_shapes.append(constant_tome)
        task = bar.add_task("Frontier ladder", total=len(ladder_targets) * len(ladder_shapes))
        ladder_options: list[list[Plan]] = []
        ladder_tome: list[Plan | None] = []  # ToMe's constant schedule at each budget, for the guard
        tome_at_target = None
        for ladder_target in ladder_targets:
            options, tome_plan = [], None
            for shape in ladder_shapes:
                plan = fit_to_budget(shape, ladder_target, geometry, macs, count_images)
                if plan is not None:
                    options.append((search_eval.score(plan).loss(objective), plan))
                    if shape is constant_tome:
                        tome_plan = plan
                bar.advance(task)
            if ladder_target == target:
                options += [(loss, plan) for loss, _, plan in top]
                tome_at_target = tome_plan
            options.sort(key=lambda item: item[0])
            kept = _distinct([plan for _, plan in options])[:LADDER_FINALISTS] + ([tome_plan] if tome_plan is not None else [])
            if kept:
                ladder_options.append(_distinct(kept))
                ladder_tome.append(tome_plan)

        # Every ladder option and the top shapes at the target, on the validation images.
        finalists = _distinct([plan for options in ladder_options for plan in options] + [plan for _, _, plan in top])
        finalists.sort(key=lambda plan: plan.img_size or 0)
        task = bar.add_task("Scoring on the validation images", total=len(finalists))
        for plan in finalists:
            validation_eval.score(plan)
            bar.advance(task)

        def validated(plan: Plan) -> Score:
            return validation_eval.score(plan)

        def guarded(best: Plan, tome_plan: Plan | None) -> Plan:
            """ToMe's constant schedule unless `best` beats it clearly (GUARD_Z standard errors)."""
            if tome_plan is None or plan_key(best) == plan_key(tome_plan):
                return best
            gain, error = validated(best).paired_gain(validated(tome_plan), objective)
            return best if gain > GUARD_Z * error else tome_plan

        ladder_plans = [guarded(min(options, key=lambda plan: validated(plan).loss(objective)), tome)
                        for options, tome in zip(ladder_options, ladder_tome)]

        if budget.kind in ("gmacs", "ratio"):
            at_target = [plan for _, _, plan in top] + [p for p in ladder_plans if validated(p).gmacs <= target]
            chosen = min(at_target, key=lambda plan: (validated(plan).loss(objective), validated(plan).gmacs))
            chosen = guarded(chosen, tome_at_target)
        frontier = _distinct(ladder_plans)
        search_seconds = time.perf_counter() - started

        references = reference_plans(depth, methods)
        to_measure = _distinct(frontier + ([chosen] if budget.kind in ("gmacs", "ratio") else []))
        measured_plans = sorted(to_measure + list(references.values()), key=lambda plan: -(plan.img_size or base_size))
        task = bar.add_task("Held-out images", total=len(measured_plans))
        for plan in measured_plans:
            holdout_eval.score(_sized(plan, base_size))
            bar.advance(task)

        # Latency: every frontier point and reference, side by side with the base, on held-out images.
        timed = {"base": base_model}
        timed_inputs = {"base": holdout_images[base_size]}
        names: dict[str, str] = {}
        for index, plan in enumerate(to_measure + list(references.values())):
            name = f"plan{index}"
            names[plan_key(_sized(plan, base_size))] = name
            timed[name] = apply_plan(copy.deepcopy(models[plan.img_size or base_size]), _sized(plan, base_size))
            timed_inputs[name] = holdout_images[plan.img_size or base_size]
        task = bar.add_task(f"Timing {len(timed)} models at batch {budget.batch}", total=1)
        timing = measure_latency(timed, timed_inputs, (budget.batch,), warmup=1, repeats=request.bench_repeats)
        bar.advance(task)

    def ms(plan: Plan) -> float:
        return timing["ms_per_image"][names[plan_key(_sized(plan, base_size))]][budget.batch]

    if budget.kind == "latency":
        fits = [plan for plan in frontier if ms(plan) <= budget.value]
        if not fits:
            fastest = min(frontier, key=ms)
            raise VitpruneError(f"no plan searched runs within {budget.value:g} ms / image at batch {budget.batch}: "
                                f"the fastest measured {ms(fastest):.2f} ms ({validated(fastest).gmacs:.3f} GMACs)")
        chosen = min(fits, key=lambda plan: (validated(plan).loss(objective), validated(plan).gmacs))
    elif budget.kind == "max_drop":
        base_calib = classification_metrics(validation_eval.base_logits, validation_eval.labels, None)
        def drop(plan: Plan) -> float:
            score = validated(plan)
            return base_calib["top1"] - score.top1 if labelled else 100.0 - score.agreement
        fits = [plan for plan in frontier if drop(plan) <= budget.value]
        if not fits:
            raise VitpruneError(f"no plan searched stays within {budget.value:g} points of the base on the calibration "
                                f"images (the least reduced, {ladder_targets[0] / base_gmacs:.0%} of the base GMACs, "
                                f"loses {drop(frontier[0]):.2f})")
        chosen = min(fits, key=lambda plan: (validated(plan).gmacs, validated(plan).loss(objective)))

    chosen = _sized(chosen, base_size)
    holdout_base = classification_metrics(base_holdout_logits, holdout_labels, None)
    chosen_holdout = holdout_eval.score(chosen)
    # The plan written names no input size when it keeps the model's own.
    written = replace(chosen, img_size=None if chosen.img_size == base_size else chosen.img_size, notes={})
    reduced = apply_plan(copy.deepcopy(base_model), written)
    written.notes = {"calibrated": {"objective": objective, "budget": budget.to_dict(),
                                   "calibration_images": len(calibration_set), "holdout_images": len(holdout_set),
                                   "seed": request.seed, "swap_split": request.swap_split, "data": str(request.data)}}

    def row(plan: Plan) -> dict:
        sized = _sized(plan, base_size)
        public = replace(sized, img_size=None if sized.img_size == base_size else sized.img_size, notes={})
        out = {"plan": public.describe(), "method": public.method, "params": public.params(),
               "gmacs": round(holdout_eval.score(sized).gmacs, 4),
               "gmacs_reduction": round(1 - holdout_eval.score(sized).gmacs / base_gmacs, 4),
               "ms_per_image": round(ms(plan), 3),
               "holdout": holdout_eval.score(sized).to_dict(), "reductions": sized.to_dict()["reductions"],
               "img_size": sized.img_size or base_size}
        if plan_key(sized) in validation_eval.scores:
            out["validation"] = validation_eval.scores[plan_key(sized)].to_dict()
        if holdout_labels is not None:
            out["holdout"]["top1_drop"] = round(holdout_base["top1"] - holdout_eval.score(sized).top1, 2)
        return out

    frontier_losses = [(validated(plan).gmacs, validated(plan).loss(objective)) for plan in frontier]
    frontier_rows = [dict(row(plan), pareto=flag) for plan, flag in zip(frontier, pareto_mask(frontier_losses))]
    measured = {"gmacs_base": round(base_gmacs, 4), "gmacs": round(chosen_holdout.gmacs, 4),
                "gmacs_reduction": round(1 - chosen_holdout.gmacs / base_gmacs, 4),
                "data": {"path": f"{request.data} (held-out part)", "n_images": len(holdout_set), "labelled": labelled}}
    if labelled:
        measured.update(top1_base=round(holdout_base["top1"], 2), top5_base=round(holdout_base["top5"], 2))
        chosen_metrics = classification_metrics(holdout_eval.logits(chosen), holdout_labels, base_holdout_logits)
        measured.update(top1=round(chosen_metrics["top1"], 2), top5=round(chosen_metrics["top5"], 2),
                        top1_drop=round(holdout_base["top1"] - chosen_metrics["top1"], 2))
    measured.update(agreement=round(chosen_holdout.agreement, 2), kl=round(chosen_holdout.kl, 5))
    measured["latency_ms"] = {str(budget.batch): {
        "base": round(timing["ms_per_image"]["base"][budget.batch], 3), "reduced": round(ms(chosen), 3),
        "speedup": round(timing["ms_per_image"]["base"][budget.batch] / ms(chosen), 3)}}
    measured["latency_setup"] = {"device": timing["device"], "threads": timing["threads"], "warmup": timing["warmup"],
                                 "repeats": timing["repeats"], "inputs": "real images", "runtime": "eager PyTorch",
                                 "machine": "this machine"}
    report = make_report(model_identity(reduced, base.info), written, measured, versions())
    report["calibration"] = {
        "objective": objective,
        "objective_text": OBJECTIVE_TEXT[objective],
        "budget": budget.to_dict(),
        "target_gmacs": round(target, 4) if budget.kind in ("gmacs", "ratio") else None,
        "images": {"total": len(image_set), "calibration": len(calibration_set), "holdout": len(holdout_set),
                   "search_subset": len(search_index),
                   "validation": len(validation_index), "validation_disjoint": len(validation_index) < len(calibration_set),
                   "labelled": labelled, "holdout_fraction": request.holdout,
                   "seed": request.seed, "swap_split": request.swap_split, "points_per_holdout_image": round(100 / len(holdout_set), 3)},
        "img_sizes": sizes,
        "methods": list(methods),
        "head_only": head_only,
        "guard_z": GUARD_Z,
        "tome_protect": {"chosen": geometry.tome_protect, "given": request.protect is not None, "tried": protect_trials},
        "search_seconds": round(search_seconds, 1),
        "evaluations": {"search_subset": search_eval.evaluations, "validation": validation_eval.evaluations,
                        "holdout": holdout_eval.evaluations},
        "sensitivity": [{"layer": r["layer"], **{m: {k: round(v, 5) for k, v in r[m].items()} for m in probe_methods}}
                        for r in sensitivity],
        "chosen": row(chosen),
        "base": {"gmacs": round(base_gmacs, 4), "ms_per_image": round(timing["ms_per_image"]["base"][budget.batch], 3),
                 "holdout": {k: round(v, 2) for k, v in holdout_base.items() if k in ("top1", "top5")}},
        "frontier": frontier_rows,
        "references": [dict(row(plan), name=name) for name, plan in references.items()],
    }
    report_md = render_calibration_markdown(report)
    if request.output is not None:
        plot = pareto_png(report)
        write_artifact(request.output, reduced, base.info, report=report, report_md=report_md, force=request.force,
                       extra_files={"pareto.png": plot})
    return CalibrateResult(plan=written, reduced=reduced, report=report, calibration_files=calibration_set.files,
                           holdout_files=holdout_set.files)


def _input_tokens(model: nn.Module, size: int) -> int:
    """Tokens entering block 0 at this input size (prefix tokens included)."""
    from vitprune.patch import tokens_before

    return tokens_before(model, torch.zeros(1, 3, size, size), 0).shape[1]


def _fits(check, model: nn.Module, plan: Plan) -> bool:
    try:
        check(model, plan)
    except VitpruneError:
        return False
    return True


def _sized(plan: Plan, base_size: int) -> Plan:
    """Plans are evaluated with their input size named (the published schedules name none)."""
    return plan if plan.img_size is not None else replace(plan, img_size=base_size)


def _distinct(plans: list[Plan]) -> list[Plan]:
    seen: set[str] = set()
    out = []
    for plan in plans:
        key = plan_key(plan)
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out


def _metric_name(report: dict) -> str:
    return "top1" if report["calibration"]["images"]["labelled"] else "agreement"


def render_calibration_markdown(report: dict) -> str:
    """report.md: the chosen plan (held-out figures), then the frontier and the published schedules."""
    cal = report["calibration"]
    images = cal["images"]
    lines = [render_markdown_head(report), "## Calibration", "",
             f"- budget: {cal['budget']['text']}",
             f"- objective: {cal['objective_text']}, on {images['calibration']} calibration images "
             f"(search on a subset of {images['search_subset']}; its finalists are re-ranked on "
             + (f"the other {images['validation']}, the validation images)" if images.get("validation_disjoint")
                else "all of them, the validation images: too few to set some apart)"),
             f"- every figure below is measured on the {images['holdout']} held-out images the search never saw "
             f"(1 image = {images['points_per_holdout_image']:g} points)",
             f"- input sizes searched: {', '.join(map(str, cal['img_sizes']))}; methods: {', '.join(cal['methods'])}"
             + ("; every plan computes only the class token in the last block (exact with class-token pooling)"
                if cal.get("head_only") else ""),
             _protect_line(cal.get("tome_protect")),
             f"- a searched plan replaces ToMe's constant schedule at a budget only when it beats it by more than "
             f"{cal['guard_z']:g} standard errors (paired, per image) on the validation images",
             f"- search time: {cal['search_seconds']:.0f} s ({sum(cal['evaluations'].values())} plan evaluations)",
             "", "## Frontier (held-out images)", ""]
    labelled = images["labelled"]
    header = "| plan | GMACs | fewer | ms/img | " + ("top-1 % | drop | " if labelled else "") + "agreement % | KL | Pareto |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    base = cal["base"]
    lines.append(f"| base | {base['gmacs']:.3f} | 0% | {base['ms_per_image']:.2f} | "
                 + (f"{base['holdout']['top1']:.1f} | 0 | " if labelled else "") + "100 | 0 | |")
    for row in cal["frontier"] + [dict(r, plan=f"**{r['name']}** ({r['plan']})", pareto=None) for r in cal["references"]]:
        hold = row["holdout"]
        mark = "" if row.get("pareto") is None else ("yes" if row["pareto"] else "no")
        lines.append(f"| {row['plan']} | {row['gmacs']:.3f} | {row['gmacs_reduction']:.0%} | {row['ms_per_image']:.2f} | "
                     + (f"{hold['top1']:.1f} | {hold['top1_drop']:.1f} | " if labelled else "")
                     + f"{hold['agreement']:.1f} | {hold['kl']:.4f} | {mark} |")
    lines += ["", "Rows in bold are the fixed published schedules, for reference. Latency: eager PyTorch, "
              f"median of {report['latency_setup']['repeats']} runs at batch {cal['budget'].get('batch', 32)}, "
              "all models interleaved.", ""]
    return "\n".join(lines)


def _protect_line(protect: dict | None) -> str:
    if not protect:
        return "- ToMe blocks: plain ToMe"
    if protect["given"]:
        return f"- ToMe blocks: protect weight {protect['chosen']:g} (given)"
    tried = ", ".join(f"{entry['protect']:g}: KL {entry['kl']:.4f}" for entry in protect["tried"])
    return (f"- ToMe blocks: protect weight {protect['chosen']:g}, the best on the validation images of "
            f"ToMe's constant schedule at the budget ({tried})")


def render_markdown_head(report: dict) -> str:
    from vitprune.report import render_markdown

    return render_markdown(report, title="vitprune calibrate")


def pareto_png(report: dict) -> bytes:
    """The frontier and the published schedules, held-out accuracy against GMACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = report["calibration"]
    metric = _metric_name(report)
    label = "held-out top-1 %" if metric == "top1" else "held-out agreement with the base %"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    points = sorted((row["gmacs"], row["holdout"][metric]) for row in cal["frontier"] if row["pareto"])
    others = [(row["gmacs"], row["holdout"][metric]) for row in cal["frontier"] if not row["pareto"]]
    if points:
        ax.plot(*zip(*points), "o-", color="tab:blue", label="calibrated frontier")
    if others:
        ax.plot(*zip(*others), "o", color="tab:blue", alpha=0.35, label="calibrated (dominated on calibration)")
    chosen = cal["chosen"]
    ax.plot([chosen["gmacs"]], [chosen["holdout"][metric]], "*", color="tab:red", markersize=15, label="chosen plan")
    base_value = cal["base"]["holdout"].get("top1", 100.0) if metric == "top1" else 100.0
    ax.plot([cal["base"]["gmacs"]], [base_value], "s", color="black", label="base")
    for row in cal["references"]:
        marker = "^" if row["name"].startswith("EViT") else "v"
        ax.plot([row["gmacs"]], [row["holdout"][metric]], marker, color="tab:orange")
        ax.annotate(row["name"], (row["gmacs"], row["holdout"][metric]), textcoords="offset points", xytext=(5, -10),
                    fontsize=8)
    ax.set_xlabel("GMACs / image")
    ax.set_ylabel(label)
    ax.set_title(f"{report['model']}: calibrated plans vs published schedules ({cal['images']['holdout']} held-out images)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
