"""The search: protect weight, sensitivity, shapes at the budget, refinement, the frontier ladder,
the guard against ToMe's constant schedule, and the choice of the plan for the budget.

0. ToMe's protect weight (the class token's attention against merging a token, 0 = plain ToMe):
   each of PROTECT_WEIGHTS on ToMe's constant schedule at the budget, on the validation images;
   the best is used by every ToMe block searched after, and by the guard's ToMe schedule (a weight
   is one number chosen among four: it cannot overfit the way a searched shape can).
1. Sensitivity: reduce a quarter of the patch tokens at one block only, per block and per block
   method, and measure the KL divergence to the base model and the GMACs saved.
2. Shapes (vitprune.calibrate.shapes), each scaled to just meet the budget, ranked on the search subset.
3. Refinement: a (1+1) evolutionary search mutates the best shape (a block's weight or method, the
   input size), rescales it to the budget and keeps what scores better.
4. Frontier: the best shapes (and the best of each input size), scaled to a ladder of budgets; at
   each budget the few best on the search subset are re-ranked on the validation images, and a
   searched plan replaces ToMe's constant schedule only when it beats it clearly (the guard).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from rich.progress import Progress

from vitprune.budget import Budget
from vitprune.calibrate import policy
from vitprune.calibrate.evaluate import Evaluator, Score, distinct, plan_key
from vitprune.calibrate.images import Evaluators
from vitprune.calibrate.prepare import Setup
from vitprune.calibrate.shapes import (
    CONSTANT_METHOD,
    AtsShape,
    Geometry,
    Shape,
    constant_shape,
    fit_to_budget,
    mutate,
)
from vitprune.errors import VitpruneError
from vitprune.metrics import classification_metrics
from vitprune.plan import Plan, Reduction, make_plan

PROBE_FRACTION = 0.25  # sensitivity probe: a quarter of the patch tokens removed at one block
SHAPES_KEPT = 3  # best shapes carried to the frontier ladder and to the final re-ranking
LADDER_FINALISTS = 3  # per frontier budget: the best plans on the search subset, re-ranked on the validation images
# A searched plan replaces ToMe's constant schedule only when it beats it on the validation images by
# this many standard errors of the paired per-image difference: among dozens of plans compared, the
# best on a few hundred images is partly the luckiest on them (the winner's curse).
GUARD_Z = 2.0
# How the shapes are found: sensitivity-weighted shapes refined by a (1+1) evolution, or per-block
# counts learned by gradient on the frozen model (vitprune.calibrate.gradient).
SEARCHES = ("evolutionary", "gradient")
PROTECT_WEIGHTS = (0.0, 0.1, 0.2, 0.3)  # tome protect weights tried (0.1-0.3 won on both shared models)
CONSTANT_LABEL = f"{CONSTANT_METHOD} gamma=0"  # make_shapes' label of ToMe's constant schedule

Ranked = tuple[tuple, Shape | AtsShape, Plan]  # (loss on the search subset, shape, its plan at the budget)


@dataclass
class Search:
    """What the search steps share: the frame, the evaluators, the objective and the progress bar."""

    setup: Setup
    evals: Evaluators
    objective: str
    budget: Budget
    bar: Progress

    def fit(self, shape: Shape | AtsShape, target: float, geometry: Geometry | None = None) -> Plan | None:
        """`shape` scaled to just meet `target` GMACs (None: it cannot)."""
        geometry = self.setup.geometry if geometry is None else geometry
        return fit_to_budget(shape, target, geometry, self.setup.macs, self.evals.search.images)

    def loss(self, plan: Plan) -> tuple:
        """The objective on the search subset."""
        return self.evals.search.score(plan).loss(self.objective)

    def validated(self, plan: Plan) -> Score:
        return self.evals.validation.score(plan)

    def tracked(self, description: str, items):
        """`items`, one step of the progress bar each."""
        items = list(items)
        task = self.bar.add_task(description, total=len(items))
        for item in items:
            yield item
            self.bar.advance(task)


@dataclass
class Found:
    """What the search found, for the held-out measurement and the report."""

    protect_trials: list[dict]
    sensitivity: list[dict]
    frontier: list[Plan]  # the best plan at each budget of the ladder
    chosen: Plan | None  # the plan for a GMACs budget (the others choose on the held-out timing)
    search_seconds: float
    search: str = "evolutionary"  # SEARCHES: how the shapes were found
    gradient_trace: list[dict] = field(default_factory=list)  # the gradient search's training, every few steps


@dataclass
class Ladder:
    """Per frontier budget: the finalists, and ToMe's constant schedule there (the guard's fallback)."""

    options: list[list[Plan]] = field(default_factory=list)
    tome: list[Plan | None] = field(default_factory=list)
    tome_at_target: Plan | None = None


# -- 0. the protect weight -------------------------------------------------------------------------

def protect_weight(search: Search, given: float | None) -> list[dict]:
    """Set the protect weight of every ToMe block: `given`, or the best of PROTECT_WEIGHTS. Returns the trials."""
    setup = search.setup
    # protect weighs the class token's attention: only for models with one
    can_protect = setup.fits(make_plan(CONSTANT_METHOD, setup.depth, r=1, protect=0.1))
    if given is not None or not can_protect:
        if given and not can_protect:
            raise VitpruneError("protect weighs the class token's attention, and this model has no class token "
                                "(or cannot run tome)", param="protect")
        setup.geometry.protect = given or 0.0
        return []
    setup.geometry.protect, tried = choose_protect(search)
    return tried


def choose_protect(search: Search) -> tuple[float, list[dict]]:
    """The protect weight whose ToMe constant schedule at the budget scores best on the validation images."""
    geometry = search.setup.geometry
    constant = constant_shape(geometry.base_size, geometry.depth, "tome constant")
    tried = []
    for weight in search.tracked("ToMe protect weight", PROTECT_WEIGHTS):
        plan = search.fit(constant, search.setup.target, replace(geometry, protect=weight))
        if plan is not None:
            score = search.validated(plan)
            tried.append({"protect": weight, "loss": score.loss(search.objective), **score.to_dict()})
    if not tried:
        return 0.0, []
    best = min(tried, key=lambda entry: entry["loss"])
    return best["protect"], [{k: v for k, v in entry.items() if k != "loss"} for entry in tried]


# -- 1. sensitivity --------------------------------------------------------------------------------

def sensitivity_probe(search: Search) -> list[dict]:
    """KL and GMACs saved when a quarter of the patch tokens is removed at one block only."""
    geometry, block_methods = search.setup.geometry, search.setup.block_methods
    size = geometry.base_size
    tokens = geometry.tokens_at[size]
    unit = max(1, round(PROBE_FRACTION * (tokens - geometry.num_prefix)))
    rows = [{"layer": layer} for layer in range(geometry.depth)]
    probes = [(row, method) for row in rows for method in block_methods]
    for row, method in search.tracked("Sensitivity per block", probes):
        settings = policy.probe(method, unit, tokens, geometry.num_prefix, geometry.protect)
        score = search.evals.search.score(Plan(reductions=(Reduction(row["layer"], method, **settings),),
                                               img_size=size))
        row[method] = {"divergence": score.divergence, "saved_gmacs": geometry.base_gmacs - score.gmacs,
                       **score.figures()}
    return rows


# -- 2, 3. shapes at the budget, refinement --------------------------------------------------------

def rank_shapes(search: Search, shapes: list[Shape | AtsShape]) -> list[Ranked]:
    """Every shape that reaches the budget, scaled to it, best first on the search subset."""
    ranked: list[Ranked] = []
    for shape in search.tracked("Shapes at the budget", shapes):
        plan = search.fit(shape, search.setup.target)
        if plan is not None:
            ranked.append((search.loss(plan), shape, plan))
    if not ranked:
        raise VitpruneError(f"no plan searched reaches the budget of {search.setup.target:.3f} GMACs")
    ranked.sort(key=lambda item: item[0])
    return ranked


def refine(search: Search, ranked: list[Ranked], steps: int, rng: random.Random) -> list[Ranked]:
    """(1+1) evolution from the best block shape: `ranked` with every mutant that reaches the budget, re-sorted."""
    setup = search.setup
    best_loss, best_shape, _ = next((item for item in ranked if isinstance(item[1], Shape)), ranked[0])
    for _ in search.tracked("Refining (evolutionary)", range(steps)):
        if isinstance(best_shape, Shape):
            candidate = mutate(best_shape, setup.block_methods, setup.sizes, rng)
            plan = search.fit(candidate, setup.target)
            if plan is not None:
                loss = search.loss(plan)
                ranked.append((loss, candidate, plan))
                if loss < best_loss:
                    best_loss, best_shape = loss, candidate
    ranked.sort(key=lambda item: item[0])
    return ranked


def best_distinct(ranked: list[Ranked]) -> list[Ranked]:
    """The SHAPES_KEPT best entries with distinct plans."""
    top: list[Ranked] = []
    for item in ranked:
        if all(plan_key(item[2]) != plan_key(other[2]) for other in top):
            top.append(item)
        if len(top) == SHAPES_KEPT:
            break
    return top


# -- 4. the frontier ladder, the guard, the choice -------------------------------------------------

def ladder_shapes(search: Search, top: list[Ranked], ranked: list[Ranked],
                  shapes: list[Shape | AtsShape]) -> tuple[list[Shape | AtsShape], Shape | None]:
    """The best shapes, the best shape of each input size (a size that wins at the target can lose at
    milder budgets) and ToMe's constant schedule (returned apart too, for the guard)."""
    chosen = [shape for _, shape, _ in top]
    for size in search.setup.sizes:
        best_of_size = next((shape for _, shape, _ in ranked if shape.img_size == size), None)
        if best_of_size is not None and best_of_size not in chosen:
            chosen.append(best_of_size)
    constant = next((shape for shape in shapes if isinstance(shape, Shape) and shape.img_size == search.setup.base_size
                     and shape.label == CONSTANT_LABEL), None)
    if constant is not None and constant not in chosen:
        chosen.append(constant)
    return chosen, constant


def frontier_ladder(search: Search, shapes: list[Shape | AtsShape], constant: Shape | None,
                    top: list[Ranked]) -> Ladder:
    """At each budget of the ladder, the LADDER_FINALISTS best plans on the search subset (the top
    shapes too at the target) and ToMe's constant schedule."""
    ladder = Ladder()
    targets = search.setup.ladder_targets
    task = search.bar.add_task("Frontier ladder", total=len(targets) * len(shapes))
    for target in targets:
        options, tome_plan = [], None
        for shape in shapes:
            plan = search.fit(shape, target)
            if plan is not None:
                options.append((search.loss(plan), plan))
                if shape is constant:
                    tome_plan = plan
            search.bar.advance(task)
        if target == search.setup.target:
            options += [(loss, plan) for loss, _, plan in top]
            ladder.tome_at_target = tome_plan
        options.sort(key=lambda item: item[0])
        kept = distinct([plan for _, plan in options])[:LADDER_FINALISTS]
        kept += [tome_plan] if tome_plan is not None else []
        if kept:
            ladder.options.append(distinct(kept))
            ladder.tome.append(tome_plan)
    return ladder


def score_finalists(search: Search, ladder: Ladder, top: list[Ranked]) -> None:
    """Every ladder option and the top shapes at the target, on the validation images."""
    finalists = distinct([plan for options in ladder.options for plan in options] + [plan for _, _, plan in top])
    finalists.sort(key=lambda plan: plan.img_size or 0)
    for plan in search.tracked("Scoring on the validation images", finalists):
        search.validated(plan)


def guarded(search: Search, best: Plan, tome_plan: Plan | None) -> Plan:
    """ToMe's constant schedule unless `best` beats it clearly (GUARD_Z standard errors)."""
    if tome_plan is None or plan_key(best) == plan_key(tome_plan):
        return best
    gain, error = search.validated(best).paired_gain(search.validated(tome_plan), search.objective)
    return best if gain > GUARD_Z * error else tome_plan


def guard_frontier(search: Search, ladder: Ladder, top: list[Ranked]) -> tuple[list[Plan], Plan | None]:
    """(the frontier: each budget's best on the validation images, guarded; the plan for a GMACs budget, else None)."""
    objective, target = search.objective, search.setup.target
    ladder_plans = [guarded(search, min(options, key=lambda plan: search.validated(plan).loss(objective)), tome)
                    for options, tome in zip(ladder.options, ladder.tome, strict=True)]
    chosen = None
    if search.budget.has_gmacs_target:
        at_target = [plan for _, _, plan in top] + [p for p in ladder_plans if search.validated(p).gmacs <= target]
        chosen = min(at_target, key=lambda plan: (search.validated(plan).loss(objective), search.validated(plan).gmacs))
        chosen = guarded(search, chosen, ladder.tome_at_target)
    return distinct(ladder_plans), chosen


def choose(search: Search, frontier: list[Plan], chosen: Plan | None, ms) -> Plan:
    """The plan for the budget: at a GMACs budget the one chosen at the target; at a latency budget the
    best frontier point measured within it (`ms(plan)`); at an accuracy budget the cheapest within it."""
    budget = search.budget
    if budget.kind == "latency":
        return choose_by_latency(search, frontier, budget, ms)
    if budget.kind == "max_drop":
        return choose_by_drop(search, frontier, budget)
    return chosen


def choose_by_latency(search: Search, frontier: list[Plan], budget: Budget, ms) -> Plan:
    fits = [plan for plan in frontier if ms(plan) <= budget.value]
    if not fits:
        fastest = min(frontier, key=ms)
        raise VitpruneError(f"no plan searched runs within {budget.value:g} ms / image at batch {budget.batch}: "
                            f"the fastest measured {ms(fastest):.2f} ms ({search.validated(fastest).gmacs:.3f} GMACs)")
    return min(fits, key=lambda plan: (search.validated(plan).loss(search.objective), search.validated(plan).gmacs))


def choose_by_drop(search: Search, frontier: list[Plan], budget: Budget) -> Plan:
    validation: Evaluator = search.evals.validation
    base_top1 = classification_metrics(validation.base_logits, validation.labels, None).get("top1")

    def drop(plan: Plan) -> float:
        score = search.validated(plan)
        return base_top1 - score.top1 if base_top1 is not None else 100.0 - score.agreement_points

    fits = [plan for plan in frontier if drop(plan) <= budget.value]
    if not fits:
        least = search.setup.ladder_targets[0] / search.setup.base_gmacs
        raise VitpruneError(f"no plan searched stays within {budget.value:g} points of the base on the calibration "
                            f"images (the least reduced, {least:.0%} of the base GMACs, loses {drop(frontier[0]):.2f})")
    return min(fits, key=lambda plan: (search.validated(plan).gmacs, search.validated(plan).loss(search.objective)))


def pareto_mask(points: list[tuple[float, tuple]]) -> list[bool]:
    """True for each (gmacs, loss) no other point beats on both (lower GMACs, lower loss)."""
    return [not any((g2 <= g and loss2 <= loss) and (g2 < g or loss2 < loss) for g2, loss2 in points)
            for g, loss in points]
