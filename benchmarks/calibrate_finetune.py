"""To a budget, end to end: `vitprune calibrate --finetune` on the shared weights and images, judged
against the original model on the held-out images.

    .venv/bin/python benchmarks/calibrate_finetune.py --models vit_tiny_patch16_224 --ratios 0.5,0.6

Per model and budget: calibrate on half of the 1000 shared images (the other half held out, as
calibrate does it; `--swap-split` for the other fold), fine-tune the chosen plan on the same
calibration images with the default recipe, and print the held-out top-1 drop against the
original model before and after fine-tuning, ToMe's drop at equal GMACs (before fine-tuning,
interpolated between r = 8/13/16), the bar (0.5 points at 60% of the GMACs, 1.5 at 50%), and what
the run cost: search and fine-tuning wall time and the CPU time of the whole run.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_frontier import IMAGES, WEIGHTS, tome_top1_at  # noqa: E402

from vitprune.budget import Budget  # noqa: E402
from vitprune.commands.calibrate import CalibrateRequest, FinetuneRecipe, run_calibrate  # noqa: E402

BARS = {0.6: 0.5, 0.5: 1.5}  # the bars: top-1 drop against the original model, in points


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the image-decoding workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def nearest_tome(report: dict, teacher: float) -> str:
    """Outside ToMe's measured r values: the nearest one's drop, with its share of the base GMACs."""
    tome = [r for r in report["calibration"]["references"] if r["name"].startswith("tome:")]
    if not tome:
        return "-"
    near = min(tome, key=lambda r: abs(r["gmacs"] - report["gmacs"]))
    return f"{teacher - near['holdout']['top1']:.2f} ({near['name']}, {near['gmacs'] / report['gmacs_base']:.1%})"


def row(report: dict, ratio: float, wall: float, cpu: float) -> str:
    tuning, cal = report["finetune"], report["calibration"]
    teacher = tuning["teacher"]["top1"]
    before, after = tuning["variants"][0]["before"]["top1"], tuning["variants"][0]["after"]["top1"]
    tome = tome_top1_at(report["gmacs"], cal["references"])
    tome_drop = f"{teacher - tome:5.2f}" if tome is not None else nearest_tome(report, teacher)
    after_ci = tuning["variants"][0]["after"].get("top1_drop_ci95")
    after_text = f"{teacher - after:.2f}" + (f" ({after_ci[0]:+.2f}..{after_ci[1]:+.2f})" if after_ci else "")
    bar = BARS.get(ratio)
    verdict = "" if bar is None else ("met" if teacher - after <= bar else "missed") + f" (<= {bar})"
    return (f"| {report['model']} | {ratio:.0%} | {report['plan']} | {report['gmacs'] / report['gmacs_base']:.1%} | "
            f"{teacher:.2f} | {teacher - before:.2f} | {after_text} | {tome_drop} | {verdict} | "
            f"{tuning['train_images']} imgs x {tuning['epochs']} ep | {cal['search_seconds']:.0f} s | "
            f"{tuning['train_seconds']:.0f} s | {wall:.0f} s / {cpu:.0f} s | {tuning['val_images']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224")
    parser.add_argument("--ratios", default="0.5,0.6")
    parser.add_argument("--epochs", type=int, default=FinetuneRecipe.epochs)
    parser.add_argument("--swap-split", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, default=None, help="write each artifact to OUTPUT/MODEL-RATIO")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| model | budget | plan | GMACs of base | original top-1 | drop before | drop after | ToMe@= drop "
          "(before) | bar | fine-tuning | search | fine-tuning time | wall / CPU | held-out images |")
    print("|---" * 14 + "|")
    for model in args.models.split(","):
        for ratio in (float(value) for value in args.ratios.split(",")):
            out = args.output / f"{model}-{ratio:g}" if args.output else None
            wall, cpu = time.perf_counter(), cpu_seconds()
            result = run_calibrate(CalibrateRequest(
                model=model, checkpoint=WEIGHTS[model], data=IMAGES, budget=Budget("ratio", ratio),
                swap_split=args.swap_split, output=out, force=True, progress=False,
                finetune=FinetuneRecipe(epochs=args.epochs)))
            print(row(result.report, ratio, time.perf_counter() - wall, cpu_seconds() - cpu), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
