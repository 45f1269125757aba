"""calibrate's searches side by side with ToMe, per image, on images each plan was never calibrated on.

    .venv/bin/python benchmarks/calibrate_search.py --targets 0.6,0.5 --searches gradient,evolutionary

For each target and search, vit_tiny is calibrated twice on complementary halves of the 1000 shared
images (the second run with --swap-split). Every plan is then scored on its run's held-out half, per
image, and the halves are pooled: 1000 images, each scored by a plan calibrated without it. Each
plan (the chosen one and every frontier point) is compared with plain ToMe (a constant r, no
protect weight, no head-only block, as published) at equal GMACs: the pooled top-1 interpolated
between the two ToMe r whose GMACs bracket the plan's, and, paired per image, the difference
against the cheapest ToMe r that costs at least as much, with its standard error. Searches are
compared with each other paired per image at each budget. Bars: at 60% of the base GMACs a top-1
drop of at most 0.5 points, at 50% at most 1.5; every frontier point at least as accurate as ToMe.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from vitprune import calibrate
from vitprune.budget import Budget
from vitprune.commands.calibrate import CalibrateRequest, run_calibrate
from vitprune.plan import Plan, make_plan
from vitprune.source import load_base

ROOT = Path(__file__).resolve().parents[1]
# the shared data beside the checkout (or beside the folder of worktrees)
SHARED = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").exists()), ROOT.parent / "shared" / "data")
WEIGHTS = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
IMAGES = SHARED / "images" / "imagenet-sample-images"
MODEL = "vit_tiny_patch16_224"
TOME_RS = range(1, 25)
# The plans the evolutionary search chose in both folds at 60% and 50% of the base GMACs in its
# documented cross-fit (docs/calibrate.md, "Frontier at 50% of the base GMACs", 2026-11-25):
# ToMe's constant schedule with protect 0.1 and the head-only last block. `--documented` scores
# them per image instead of re-running that search (about 9 minutes per fold).
DOCUMENTED = {0.6: 12, 0.5: 16}


def documented_plan(target: float) -> Plan:
    return make_plan("tome", 12, layers=list(range(11)), r=DOCUMENTED[target], protect=0.1, head_only=True)


def held_out_scorer(swap: bool, args):
    """(plan -> per-image misses on this fold's held-out half, plan -> GMACs)."""
    base = load_base(MODEL, WEIGHTS, False, None)
    setup = calibrate.prepare(base.model.eval(), [224], True, Budget("ratio", 0.5))
    sets = calibrate.split_images(IMAGES, limit=args.limit, holdout=0.5, seed=0, swap_split=swap)
    images = calibrate.load_split(setup, sets, workers=0, progress=False)
    evaluator = calibrate.Evaluator(setup.models, images.holdout_images, images.holdout_labels,
                                    images.base_holdout_logits, setup.macs)

    def misses(plan: Plan) -> torch.Tensor:
        return evaluator.score(calibrate.sized(plan, 224)).per_image["miss"].double()

    return misses, lambda plan: evaluator.score(calibrate.sized(plan, 224)).gmacs, setup.base_gmacs


def run_fold(search: str, target: float, swap: bool, args) -> dict:
    request = CalibrateRequest(model=MODEL, checkpoint=WEIGHTS, data=IMAGES, budget=Budget("ratio", target),
                               limit=args.limit, swap_split=swap, search=search, bench_repeats=1, progress=False,
                               gradient_steps=args.gradient_steps,
                               # the gradient search learns at the model's own size: no other size to load
                               img_sizes=[224] if search == "gradient" else None)
    result = run_calibrate(request)
    cal = result.report["calibration"]
    print(f"  {search} target {target} fold {int(swap)}: search {cal['search_seconds']:.0f} s; chosen "
          f"{result.plan.describe()}", flush=True)
    return {"chosen": replace(result.plan, notes={}), "frontier": result.frontier,
            "search_seconds": cal["search_seconds"],
            "held_out": [{"plan": row["plan"], "gmacs": row["gmacs"], **row["holdout"]}
                         for row in [cal["chosen"], *cal["frontier"], *cal["references"]]],
            "gradient_trace": cal["gradient_trace"]}


def save_runs(runs: dict, path: Path) -> None:
    path.write_text(json.dumps([{"key": list(key), "chosen": run["chosen"].to_dict(),
                                 "frontier": [plan.to_dict() for plan in run["frontier"]],
                                 "search_seconds": run["search_seconds"], "held_out": run.get("held_out"),
                                 "gradient_trace": run.get("gradient_trace")} for key, run in runs.items()]))


def load_runs(path: Path) -> dict:
    return {tuple(entry["key"]): {"chosen": Plan.from_dict(entry["chosen"]),
                                  "frontier": [Plan.from_dict(plan) for plan in entry["frontier"]],
                                  "search_seconds": entry["search_seconds"], "held_out": entry.get("held_out"),
                                  "gradient_trace": entry.get("gradient_trace")}
            for entry in json.loads(path.read_text())}


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Top-1 points a beats b by (misses of b minus a), and the standard error of that mean."""
    diff = (b - a) * 100
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.6,0.5")
    parser.add_argument("--searches", default="gradient,evolutionary")
    parser.add_argument("--runs-json", type=Path, default=Path("/tmp/vitprune-calibrate-search-runs.json"),
                        help="Each run's plans are written here as they finish.")
    parser.add_argument("--from-runs", action="store_true", help="Continue from the runs in --runs-json.")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="Calibrate at most this many missing runs, then stop (long jobs in short pieces).")
    parser.add_argument("--gradient-steps", type=int, default=60)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--documented", action="store_true",
                        help="Also score the evolutionary search's documented plans (DOCUMENTED).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = [float(t) for t in args.targets.split(",")]
    searches = args.searches.split(",")
    runs = load_runs(args.runs_json) if args.from_runs else {}
    missing = [(s, t, swap) for t in targets for s in searches for swap in (False, True) if (s, t, swap) not in runs]
    for key in missing[:args.max_runs]:
        runs[key] = run_fold(*key, args)
        save_runs(runs, args.runs_json)
    if len(missing) > (args.max_runs if args.max_runs is not None else len(missing)):
        return 0
    rows = pooled_rows(runs, targets, searches, args)
    print_rows(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def pooled_rows(runs: dict, targets: list[float], searches: list[str], args) -> list[dict]:
    folds = [held_out_scorer(swap, args) for swap in (False, True)]
    base_gmacs = folds[0][2]
    base_misses = torch.cat([misses(Plan()) for misses, _, _ in folds])
    base_top1 = 100 - 100 * base_misses.mean().item()
    tome = {r: make_plan("tome", 12, r=r) for r in TOME_RS}
    tome_gmacs = {r: folds[0][1](plan) for r, plan in tome.items()}
    tome_misses: dict[int, torch.Tensor] = {}

    def pooled(plans: list[Plan]) -> torch.Tensor:
        return torch.cat([fold[0](plan) for fold, plan in zip(folds, plans, strict=True)])

    def tome_at(gmacs: float) -> tuple[int, float | None]:
        """(the cheapest ToMe r costing at least `gmacs`, ToMe's top-1 interpolated to `gmacs`)."""
        above = [r for r in TOME_RS if tome_gmacs[r] >= gmacs - 1e-9]
        below = [r for r in TOME_RS if tome_gmacs[r] < gmacs]
        r = max(above) if above else min(TOME_RS)
        for s in {r} | ({min(below)} if below else set()):
            tome_misses.setdefault(s, pooled([tome[s], tome[s]]))
        if not below:
            return r, None
        s = min(below)
        a0, a1 = 100 - 100 * tome_misses[r].mean().item(), 100 - 100 * tome_misses[s].mean().item()
        return r, a0 + (a1 - a0) * (gmacs - tome_gmacs[r]) / (tome_gmacs[s] - tome_gmacs[r])

    def row(search: str, kind: str, plans: list[Plan], **extra) -> dict:
        misses = pooled(plans)
        gmacs = sum(fold[1](plan) for fold, plan in zip(folds, plans, strict=True)) / 2
        r, interp = tome_at(gmacs)
        gain, error = paired(misses, tome_misses[r])
        top1 = 100 - 100 * misses.mean().item()
        return {"search": search, "kind": kind, "gmacs": round(gmacs, 4), "ratio": round(gmacs / base_gmacs, 4),
                "top1": round(top1, 2), "drop": round(base_top1 - top1, 2),
                "tome_interp_top1": None if interp is None else round(interp, 2), "vs_tome_r": r,
                "tome_r_gmacs": round(tome_gmacs[r], 4), "gain_vs_tome_r": round(gain, 2), "se": round(error, 2),
                "plans": [plan.describe() for plan in plans], "misses": misses, **extra}

    rows = []
    for target in targets:
        for search in searches:
            first, second = (runs[(search, target, swap)] for swap in (False, True))
            seconds = [first["search_seconds"], second["search_seconds"]]
            rows.append(row(search, "chosen", [first["chosen"], second["chosen"]], target=target, seconds=seconds))
            for plan in first["frontier"]:
                gmacs = folds[0][1](plan)
                partner = min(second["frontier"], key=lambda other: abs(folds[1][1](other) - gmacs))
                rows.append(row(search, "frontier", [plan, partner], target=target))
    if args.documented:
        rows += [row("evolutionary (documented plans)", "chosen", [documented_plan(t)] * 2, target=t)
                 for t in DOCUMENTED]
    for t in DOCUMENTED:  # each search's point nearest t x the base GMACs (at most 1% above), paired
        near = {}
        for entry in rows:
            if "misses" in entry and entry["ratio"] <= t + 0.01 and (
                    entry["search"] not in near or abs(entry["ratio"] - t) < abs(near[entry["search"]]["ratio"] - t)):
                near[entry["search"]] = entry
        names = sorted(near)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                gain, error = paired(near[a]["misses"], near[b]["misses"])
                rows.append({"budget": t, "kind": "paired", "a": a, "b": b, "a_ratio": near[a]["ratio"],
                             "b_ratio": near[b]["ratio"], "a_minus_b_top1": round(gain, 2), "se": round(error, 2)})
    for entry in rows:
        entry.pop("misses", None)
    rows.append({"base_top1": round(base_top1, 2), "base_gmacs": round(base_gmacs, 4), "images": len(base_misses)})
    return rows


def print_rows(rows: list[dict]) -> None:
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    raise SystemExit(main())
