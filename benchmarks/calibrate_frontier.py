"""Calibrated frontier vs the fixed published schedules, on the shared weights and images.

    .venv/bin/python benchmarks/calibrate_frontier.py                       # both tiny models, ratio 0.5
    .venv/bin/python benchmarks/calibrate_frontier.py --models vit_tiny_patch16_224 --target-ratio 0.6

Runs `vitprune calibrate` (500 images calibrate, 500 held out) and prints, per model, every frontier
point and reference schedule measured on the held-out images, then checks the figures the issue
asks for: at >= 40% fewer GMACs a top-1 drop <= 0.5 points, at >= 50% fewer <= 1.5, and every
frontier point at least as accurate as ToMe at equal GMACs (ToMe interpolated between r = 8/13/16).
The held-out set has one image per class (500 images): one image is 0.2 points.
Latency columns are measured on this machine as it is (other load disturbs them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
IMAGES = SHARED / "images" / "imagenet-sample-images"


def tome_top1_at(gmacs: float, references: list[dict]) -> float | None:
    """ToMe's held-out top-1 at `gmacs`, linear between its measured r values (None outside them)."""
    points = sorted((row["gmacs"], row["holdout"]["top1"]) for row in references if row["name"].startswith("ToMe"))
    for (g0, a0), (g1, a1) in zip(points, points[1:]):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WEIGHTS))
    parser.add_argument("--target-ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/vitprune-calibrate-bench"))
    parser.add_argument("--from-report", type=Path, nargs="*", help="Only print tables from existing report.json files.")
    args = parser.parse_args()
    if args.from_report:
        for path in args.from_report:
            report = json.loads(path.read_text())
            print_table(report)
            print("\n".join(check_figures(report)))
        return 0
    if not IMAGES.exists():
        print(f"shared images not found at {IMAGES}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from vitprune.calibrate import CalibrateRequest, make_budget, run_calibrate

    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        out = args.out / f"{name}-ratio{args.target_ratio:g}"
        result = run_calibrate(CalibrateRequest(model=name, checkpoint=WEIGHTS[name], data=IMAGES,
                                                budget=make_budget(target_ratio=args.target_ratio),
                                                output=out, force=True))
        print_table(result.report)
        print("\n".join(check_figures(result.report)))
        print(f"(artifact, report.md and pareto.png in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
