"""`vitprune apply --data FOLDER` at scale: peak memory and images/s for 1k and 8k images, against
the same models on preloaded tensors in the same run.

    python benchmarks/scale.py                                 # vit_tiny (real weights), 1000 and 8000 images
    python benchmarks/scale.py --sizes 1000,8000 --img-size 96 --workers 2

The folders are hard links (symbolic links where the file system refuses) to the 1000 shared
ImageNet images, repeated under new names, with a labels.csv. Each `apply` runs in a fresh
wrapper process whose RUSAGE_CHILDREN maximum is the peak resident set of the largest process of
that run (the main process or a DataLoader worker). images/s counts images through both models
(base and reduced), decoding included (report.json's data.images_per_s); "preloaded" times the
same two models on images already decoded into one tensor (median of repeats), so the ratio is what
reading and decoding cost. The bar (issue 26): peak RSS flat from 1k to 8k images within 15%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import vitprune
from vitprune.data import find_images, load_images, transform_for
from vitprune.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IMAGES = SHARED / "images" / "imagenet-sample-images"
WEIGHTS = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
REPO = Path(__file__).resolve().parents[1]
# runs `apply` and prints the peak RSS (KiB on Linux) of the largest process it waited for
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def linked_folder(root: Path, count: int) -> Path:
    """`count` images: the shared ones linked again and again under new names, with their labels."""
    folder = root / f"images_{count}"
    folder.mkdir()
    source = find_images(IMAGES)
    rows = ["file,class_index"]
    for index in range(count):
        original, label = source.files[index % len(source)], source.labels[index % len(source)]
        name = f"{index:05d}_{original.name}"
        try:
            os.link(original, folder / name)
        except OSError:
            (folder / name).symlink_to(original.resolve())
        rows.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def run_apply(folder: Path, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "vitprune", "apply", args.model, "--checkpoint", str(args.checkpoint),
               "--img-size", str(args.img_size), "--method", "tome", "--r", str(args.r), "--data", str(folder),
               "--batch-size", str(args.batch_size), "--workers", str(args.workers), "-o", str(out), "--json"]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *command], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"apply failed on {folder}: {done.stderr.strip().splitlines()[-2:]}")
    report = json.loads((out / "report.json").read_text())
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    return {"images": report["data"]["n_images"], "peak_rss_mb": peak_kib / 1024, "wall_s": wall,
            "images_per_s": report["data"]["images_per_s"], "top1": report["top1"],
            "top1_drop_ci95": report["top1_drop_ci95"]}


def preloaded_images_per_s(args: argparse.Namespace) -> float:
    """Both models on images already in one tensor: images/s through base and reduced, median of repeats."""
    base, _ = create_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)
    reduced = vitprune.apply(create_model(args.model, checkpoint=args.checkpoint, img_size=args.img_size)[0],
                             method="tome", r=args.r)
    images, _ = load_images(find_images(IMAGES, limit=args.preloaded), transform_for(base), progress=False)
    rates = []
    with torch.inference_mode():
        for _ in range(args.repeats):
            start = time.perf_counter()
            for first in range(0, len(images), args.batch_size):
                batch = images[first:first + args.batch_size]
                base(batch)
                reduced(batch)
            rates.append(len(images) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", type=Path, default=WEIGHTS)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--r", type=int, default=13, help="ToMe's r for the reduced model")
    parser.add_argument("--sizes", default="1000,8000")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preloaded", type=int, default=256, help="images for the preloaded timing")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console(width=160)
    rows = []
    root = Path(tempfile.mkdtemp(prefix="vitprune-scale-"))
    try:
        for size in (int(part) for part in args.sizes.split(",")):
            rows.append(run_apply(linked_folder(root, size), args, root / f"out_{size}"))
            shutil.rmtree(root / f"images_{size}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    preloaded = preloaded_images_per_s(args)
    table = Table(title=f"apply --data FOLDER: {args.model} at {args.img_size} px, ToMe r={args.r}, batch "
                        f"{args.batch_size}, {args.workers} workers; {platform.machine()}, {os.cpu_count()} CPUs, "
                        f"torch {torch.__version__}")
    for column in ("images", "peak RSS MB", "vs first", "apply wall s", "apply images/s", "preloaded images/s",
                   "apply / preloaded", "top-1 drop 95% CI"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["images"]), f"{row['peak_rss_mb']:.0f}", f"{row['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}",
                      f"{row['wall_s']:.0f}", f"{row['images_per_s']:.1f}", f"{preloaded:.1f}",
                      f"{row['images_per_s'] / preloaded:.2f}",
                      "{:+.2f}..{:+.2f}".format(*row["top1_drop_ci95"]))
    console.print(table)
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    console.print(f"peak RSS from {rows[0]['images']} to {rows[-1]['images']} images: {growth:+.1%} "
                  f"({'within' if abs(growth) <= 0.15 else 'outside'} the 15% bar); load average "
                  f"{os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
