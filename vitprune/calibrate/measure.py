"""The held-out measurement: every frontier point, the chosen plan and the published schedules
scored on the held-out images, and timed side by side with the base model."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

from vitprune.bench import measure_latency
from vitprune.calibrate.evaluate import Evaluator, distinct, plan_key
from vitprune.calibrate.search import Search
from vitprune.calibrate.shapes import reference_plans
from vitprune.patch import apply_plan
from vitprune.plan import Plan


@dataclass
class HeldOut:
    """Held-out scores and latencies of the plans measured."""

    evaluator: Evaluator
    references: dict[str, Plan]  # the published schedules, by name
    timing: dict  # vitprune.bench.measure_latency's result
    names: dict[Plan, str]  # plan key -> its name in `timing`
    base_size: int
    batch: int

    def sized(self, plan: Plan) -> Plan:
        return sized(plan, self.base_size)

    def score(self, plan: Plan):
        return self.evaluator.score(self.sized(plan))

    def ms(self, plan: Plan) -> float:
        return self.timing["ms_per_image"][self.names[plan_key(self.sized(plan))]][self.batch]

    @property
    def base_ms(self) -> float:
        return self.timing["ms_per_image"]["base"][self.batch]


def sized(plan: Plan, base_size: int) -> Plan:
    """Plans are evaluated with their input size named (the published schedules name none)."""
    return plan if plan.img_size is not None else replace(plan, img_size=base_size)


def measure_held_out(search: Search, frontier: list[Plan], chosen: Plan | None, repeats: int) -> HeldOut:
    """Score the frontier, the chosen plan (if any yet) and the published schedules on the held-out
    images, largest input size first, then time them all with the base at the budget's batch."""
    setup, holdout, batch = search.setup, search.evals.holdout, search.budget.batch
    references = reference_plans(setup.depth, setup.fits)
    to_measure = distinct(frontier + ([chosen] if chosen is not None else []))
    measured = sorted(to_measure + list(references.values()), key=lambda plan: -(plan.img_size or setup.base_size))
    for plan in search.tracked("Held-out images", measured):
        holdout.score(sized(plan, setup.base_size))
    timed = {"base": setup.base_model}
    timed_inputs = {"base": holdout.images[setup.base_size]}
    names: dict[Plan, str] = {}
    for index, plan in enumerate(to_measure + list(references.values())):
        name = f"plan{index}"
        names[plan_key(sized(plan, setup.base_size))] = name
        size = plan.img_size or setup.base_size
        timed[name] = apply_plan(copy.deepcopy(setup.models[size]), sized(plan, setup.base_size))
        timed_inputs[name] = holdout.images[size]
    task = search.bar.add_task(f"Timing {len(timed)} models at batch {batch}", total=1)
    timing = measure_latency(timed, timed_inputs, (batch,), warmup=1, repeats=repeats)
    search.bar.advance(task)
    return HeldOut(evaluator=holdout, references=references, timing=timing, names=names,
                   base_size=setup.base_size, batch=batch)
