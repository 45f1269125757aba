"""Calibrated frontier vs the fixed published schedules, on the shared weights and images.

    .venv/bin/python benchmarks/calibrate_frontier.py                       # both tiny models, ratio 0.5
    .venv/bin/python benchmarks/calibrate_frontier.py --models vit_tiny_patch16_224 --target-ratio 0.6

Runs `vitprune calibrate` (500 images calibrate, 500 held out) and prints, per model, every frontier
point and reference schedule measured on the held-out images, then checks the figures the issue
asks for: at >= 40% fewer GMACs a top-1 drop <= 0.5 points, at >= 50% fewer <= 1.5, and every
frontier point at least as accurate as ToMe at equal GMACs (ToMe interpolated between r = 8/13/16).
The held-out set has one image per class (500 images): one image is 0.2 points.

With --cross-fit each model is calibrated twice, on complementary halves (the second run with
--swap-split), and the figures are also pooled over both runs: all 1000 images, each scored by a
plan calibrated without it, which halves the variance of a single 500-image held-out split.
Latency columns are measured on this machine as it is (other load disturbs them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from vitprune.budget import Budget
from vitprune.commands.calibrate import CalibrateRequest, run_calibrate

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
IMAGES = SHARED / "images" / "imagenet-sample-images"


def tome_top1_at(gmacs: float, references: list[dict]) -> float | None:
    """ToMe's held-out top-1 at `gmacs`, linear between its measured r values (None outside them)."""
    points = sorted((row["gmacs"], row["holdout"]["top1"]) for row in references if row["name"].startswith("tome:"))
    for (g0, a0), (g1, a1) in zip(points, points[1:], strict=False):
        if g0 <= gmacs <= g1:
            return a0 + (a1 - a0) * (gmacs - g0) / (g1 - g0) if g1 > g0 else a0
    return None


def print_table(report: dict) -> None:
    cal = report["calibration"]
    base = cal["base"]
    print(f"\n## {report['model']}  (budget: {cal['budget']['text']}; objective: {cal['objective']}; "
          f"search {cal['search_seconds']:.0f} s; {cal['images']['holdout']} held-out images)")
    print(f"{'plan':<70} {'GMACs':>6} {'fewer':>6} {'ms/img':>7} {'top-1':>6} {'drop':>5} {'agree':>6} {'ToMe@=':>7}")
    print(f"{'base':<70} {base['gmacs']:6.3f} {0:6.0%} {base['ms_per_image']:7.2f} {base['holdout']['top1']:6.1f}")
    for row in cal["frontier"] + [dict(r, plan="[ref] " + r["name"]) for r in cal["references"]]:
        hold = row["holdout"]
        tome = tome_top1_at(row["gmacs"], cal["references"])
        tome_text = f"{tome:7.1f}" if tome is not None and not row["plan"].startswith("[ref]") else " " * 7
        plan = row["plan"] if len(row["plan"]) <= 70 else row["plan"][:67] + "..."
        print(f"{plan:<70} {row['gmacs']:6.3f} {row['gmacs_reduction']:6.0%} {row['ms_per_image']:7.2f} "
              f"{hold['top1']:6.1f} {hold['top1_drop']:5.1f} {hold['agreement']:6.1f} {tome_text}")
    print(f"chosen: {cal['chosen']['plan']}")


def check_figures(report: dict) -> list[str]:
    cal = report["calibration"]
    lines = []
    for fewer, allowed in ((0.40, 0.5), (0.50, 1.5)):
        rows = [r for r in cal["frontier"] if r["gmacs_reduction"] >= fewer - 0.005]
        if not rows:
            lines.append(f"at {fewer:.0%} fewer GMACs: no frontier point that far")
            continue
        best = min(rows, key=lambda r: r["holdout"]["top1_drop"])
        verdict = "meets" if best["holdout"]["top1_drop"] <= allowed else "MISSES"
        lines.append(f"at >= {fewer:.0%} fewer GMACs: best held-out drop {best['holdout']['top1_drop']:.1f} points "
                     f"({best['gmacs_reduction']:.0%} fewer) -> {verdict} the <= {allowed} bar")
    beaten = []
    for row in cal["frontier"]:
        tome = tome_top1_at(row["gmacs"], cal["references"])
        if tome is not None:
            beaten.append(row["holdout"]["top1"] >= tome - 1e-9)
    lines.append(f"frontier points at least as accurate as ToMe at equal GMACs: {sum(beaten)} of {len(beaten)} "
                 "comparable (inside ToMe's r=8..16 range)")
    return lines


def pooled_report(first: dict, second: dict) -> dict:
    """The two folds of a cross-fit as one report-shaped dict: each frontier point of the first run
    paired with the second run's point at the nearest GMACs, figures averaged (equal halves)."""
    cal_a, cal_b = first["calibration"], second["calibration"]
    base_top1 = (cal_a["base"]["holdout"]["top1"] + cal_b["base"]["holdout"]["top1"]) / 2

    def pool(row_a: dict, row_b: dict, **extra) -> dict:
        top1 = (row_a["holdout"]["top1"] + row_b["holdout"]["top1"]) / 2
        gmacs = (row_a["gmacs"] + row_b["gmacs"]) / 2
        return {"gmacs": gmacs, "gmacs_reduction": (row_a["gmacs_reduction"] + row_b["gmacs_reduction"]) / 2,
                "ms_per_image": (row_a["ms_per_image"] + row_b["ms_per_image"]) / 2,
                "holdout": {"top1": top1, "top1_drop": base_top1 - top1,
                            "agreement": (row_a["holdout"]["agreement"] + row_b["holdout"]["agreement"]) / 2},
                **extra}

    frontier = []
    for row_a in cal_a["frontier"]:
        row_b = min(cal_b["frontier"], key=lambda row: abs(row["gmacs"] - row_a["gmacs"]))
        if abs(row_b["gmacs"] - row_a["gmacs"]) <= 0.02 * cal_a["base"]["gmacs"]:
            plan = row_a["plan"] if row_a["plan"] == row_b["plan"] else f"{row_a['plan']} | {row_b['plan']}"
            frontier.append(pool(row_a, row_b, plan=plan))
    references = [pool(row, next(r for r in cal_b["references"] if r["name"] == row["name"]), name=row["name"])
                  for row in cal_a["references"]]
    base = dict(cal_a["base"], holdout={"top1": base_top1},
                ms_per_image=(cal_a["base"]["ms_per_image"] + cal_b["base"]["ms_per_image"]) / 2)
    images = {"holdout": cal_a["images"]["holdout"] + cal_b["images"]["holdout"]}
    return {"model": first["model"], "calibration": {
        "base": base, "frontier": frontier, "references": references, "images": images, "budget": cal_a["budget"],
        "objective": cal_a["objective"], "search_seconds": (cal_a["search_seconds"] + cal_b["search_seconds"]) / 2,
        "chosen": {"plan": f"{cal_a['chosen']['plan']} | {cal_b['chosen']['plan']}"}}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WEIGHTS))
    parser.add_argument("--target-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vitprune-calibrate-bench"))
    parser.add_argument("--cross-fit", action="store_true", help="Also calibrate on the other half and pool both.")
    parser.add_argument("--from-report", type=Path, nargs="*",
                        help="Only print tables from existing report.json files (with --cross-fit: pairs of folds).")
    args = parser.parse_args()
    if args.from_report:
        reports = [json.loads(path.read_text()) for path in args.from_report]
        for report in reports:
            print_table(report)
            print("\n".join(check_figures(report)))
        if args.cross_fit:
            for first, second in zip(reports[::2], reports[1::2], strict=False):
                print_pooled(pooled_report(first, second))
        return 0
    if not IMAGES.exists():
        print(f"shared images not found at {IMAGES}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        folds = []
        for swap in (False, True) if args.cross_fit else (False,):
            out = args.out / f"{name}-ratio{args.target_ratio:g}{'-swapped' if swap else ''}"
            result = run_calibrate(CalibrateRequest(model=name, checkpoint=WEIGHTS[name], data=IMAGES,
                                                    budget=Budget("ratio", args.target_ratio),
                                                    swap_split=swap, output=out, force=True))
            print_table(result.report)
            print("\n".join(check_figures(result.report)))
            print(f"(artifact, report.md and pareto.png in {out})")
            folds.append(result.report)
        if args.cross_fit:
            print_pooled(pooled_report(*folds))
    return 0


def print_pooled(report: dict) -> None:
    print(f"\n### pooled over both folds: {report['model']}, {report['calibration']['images']['holdout']} images, "
          "each scored by a plan calibrated without it")
    print_table(report)
    print("\n".join(check_figures(report)))


if __name__ == "__main__":
    sys.exit(main())
