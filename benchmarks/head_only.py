"""The head-only last block: same predictions, fewer GMACs, measured latency, side by side.

    python benchmarks/head_only.py                       # vit_tiny and deit_tiny from ../shared
    python benchmarks/head_only.py --limit 200 --repeats 5

For each setting (no reduction, ToMe r=13, EViT 0.7 @3,6,9), the plan with and without the head-only
last block are run on the same images and timed in one interleaved run (vitprune.bench.measure_latency
on the pair, medians after warm-up). Printed: the largest logit difference and the top-1 agreement
between the two (the change is exact: float rounding only), both GMACs and the speed-up.
"""
from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch
from rich.console import Console

import vitprune
from vitprune.bench import measure_latency
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.metrics import classification_metrics
from vitprune.models import create_model
from vitprune.report import count_gmacs
from vitprune.tables import ReportTable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
SETTINGS = [("no reduction", {}), ("tome r=13", {"method": "tome", "r": 13}), ("evit 0.7", {"method": "evit", "keep": 0.7})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WEIGHTS))
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    console = Console(width=200)  # the whole table, also when piped
    table = ReportTable(["model", "setting", "max |Δlogit|", "top-1 agree %", "GMACs", "GMACs head-only", "fewer",
                         "ms/img", "ms/img head-only", "speed-up"],
                        title=f"head-only last block — {platform.machine()}, {torch.get_num_threads()} threads, "
                              f"eager PyTorch {torch.__version__}, batch {args.batch}")
    for name in args.models:
        base, _ = create_model(name, checkpoint=WEIGHTS[name])
        images, _ = load_images(find_images(args.data, limit=args.limit), transform_for(base), progress=True)
        for setting, kwargs in SETTINGS:
            if kwargs:
                plain = vitprune.apply(copy.deepcopy(base), **kwargs)
                head = vitprune.apply(copy.deepcopy(base), **kwargs, head_only=True)
            else:
                plain, head = base, vitprune.apply(copy.deepcopy(base), vitprune.Plan(head_only=True))
            logits = predict(plain, images, description=f"{name} {setting}")
            head_logits = predict(head, images, description=f"{name} {setting}, head-only")
            gmacs, head_gmacs = count_gmacs(plain, images), count_gmacs(head, images)
            timing = measure_latency({"plain": plain, "head": head}, images[: args.batch], (args.batch,),
                                     repeats=args.repeats)["ms_per_image"]
            ms, head_ms = timing["plain"][args.batch], timing["head"][args.batch]
            agree = classification_metrics(head_logits, None, logits)["agreement"]
            table.add(name, setting, f"{(logits - head_logits).abs().max().item():.1e}", f"{agree:.1f}",
                      f"{gmacs:.3f}", f"{head_gmacs:.3f}", f"{1 - head_gmacs / gmacs:.1%}",
                      f"{ms:.2f}", f"{head_ms:.2f}", f"{ms / head_ms:.3f}x")
    console.print(table.rich())


if __name__ == "__main__":
    main()
