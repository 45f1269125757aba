"""ONNX Runtime: base vs reduced graphs, side by side, with parity and the GMACs they should save.

For each model (vit_tiny, deit_tiny with the shared weights) it exports the base model, EViT 0.7
@3,6,9, ToMe r=13 and ATS K=197 @3-11 (padded per batch, and padded to the cap) with
`vitprune.export.export_onnx` (dynamic batch, opset 17), checks each against PyTorch on the shared
images, and times each against the base in its own interleaved run on ONNX Runtime at batch 1
and 32 (median ms/image; the base row is the median over those runs).
The issue's bar: at batch 32, speed-up >= 0.9 x the GMACs ratio for EViT and ToMe; ATS faster
than base.

    .venv/bin/python benchmarks/onnx_bench.py                    # all 1000 shared images for parity
    .venv/bin/python benchmarks/onnx_bench.py --images 200 --repeats 5 --threads 2

Timings depend on the machine's load: run it on an idle machine for figures worth quoting.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console

import vitprune
from vitprune.export import bench_onnx, choose_provider, export_onnx, verify_onnx
from vitprune.models import create_model
from vitprune.report import count_gmacs
from vitprune.source import load_images_for
from vitprune.tables import ReportTable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
IMAGES = SHARED / "images" / "imagenet-sample-images"
# name -> (apply settings, ATS padding)
VARIANTS = {
    "EViT 0.7": ({"method": "evit", "keep": 0.7}, "batch"),
    "ToMe r=13": ({"method": "tome", "r": 13}, "batch"),
    "ATS K=197 (pad to batch max)": ({"method": "ats", "keep": 1.0}, "batch"),
    "ATS K=197 (pad to cap)": ({"method": "ats", "keep": 1.0}, "cap"),
}
TARGET_FRACTION = 0.9  # of the GMACs ratio, at the largest batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(WEIGHTS), help="comma-separated, from: " + ", ".join(WEIGHTS))
    parser.add_argument("--images", type=int, default=1000, help="shared images for parity (and the timed batches)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    parser.add_argument("--provider", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    console = Console(width=200)  # the table is wide; do not fold it to a pipe's 80 columns
    torch.set_num_threads(args.threads or torch.get_num_threads())
    console.print(f"ONNX Runtime provider: {choose_provider(args.provider)}; threads: {args.threads or 'default'}")

    table = ReportTable(["model", "graph", "GMACs", "GMACs ratio", "top-1 agree %", "within tol %", "max |Δlogit|",
                         *[f"ms b{b}" for b in batches], f"speed-up b{batches[-1]}", "target", "met"],
                        title=f"ONNX Runtime, ms/image (median of {args.repeats}), dynamic-batch opset-17 graphs")
    for name in args.models.split(","):
        base, _ = create_model(name, checkpoint=WEIGHTS[name])
        images, _, _ = load_images_for(base, IMAGES, limit=args.images, workers=2)
        gmacs_base = count_gmacs(base, images)
        with tempfile.TemporaryDirectory() as scratch:
            paths = {"base": Path(scratch) / "base.onnx"}
            export_onnx(base, paths["base"])
            rows = {}
            for label, (settings, padding) in VARIANTS.items():
                model, _ = create_model(name, checkpoint=WEIGHTS[name])
                vitprune.apply(model, **settings)
                paths[label] = Path(scratch) / f"{len(paths)}.onnx"
                export_onnx(model, paths[label], ats_padding=padding)
                parity = verify_onnx(model, paths[label], images, provider=args.provider, progress=True)
                rows[label] = (count_gmacs(model, images), parity)
            # Each graph is timed in its own interleaved run with the base: timing all six in turn
            # let the others' sessions evict its weights and buffers from the CPU caches, which cost
            # the reduced graphs (another shape in every block) up to 10% in an earlier version.
            timing, paired_base = {}, {}
            for label in rows:
                pair = bench_onnx({"base": paths["base"], label: paths[label]}, images[:max(batches)], batches,
                                  repeats=args.repeats, provider=args.provider, threads=args.threads)["ms_per_image"]
                timing[label], paired_base[label] = pair[label], pair["base"]
            timing["base"] = {b: statistics.median(ms[b] for ms in paired_base.values()) for b in batches}
        table.add(name, "base", f"{gmacs_base:.3f}", "1.00", "", "", "",
                  *[f"{timing['base'][b]:.2f}" for b in batches], "1.00", "", "")
        for label, (gmacs, parity) in rows.items():
            ratio = gmacs_base / gmacs
            speedup = paired_base[label][batches[-1]] / timing[label][batches[-1]]
            ats = label.startswith("ATS")
            target = TARGET_FRACTION * ratio if not ats else 1.0
            table.add(name, label, f"{gmacs:.3f}", f"{ratio:.2f}", f"{parity['agreement']:.1f}",
                      f"{parity['within_tolerance']:.1f}", f"{parity['max_abs_diff']:.2g}",
                      *[f"{timing[label][b]:.2f}" for b in batches], f"{speedup:.2f}",
                      f"{'>' if ats else '≥'}{target:.2f}",
                      "yes" if (speedup > target if ats else speedup >= target) else "NO")
    console.print(table.rich())


if __name__ == "__main__":
    main()
