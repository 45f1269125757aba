"""Dense features of a reduced model against the unreduced model's, per block, on real weights and images.

    python benchmarks/dense.py                            # vit_tiny from ../shared, 64 images
    python benchmarks/dense.py --limit 200 --blocks 2,5,8,11

For each setting: the mean cosine similarity, over images and patches, of `forward_intermediates`'
features on the patch grid (merged tokens unmerged, dropped patches keeping the features they had
when dropped; docs/methods.md "Dense outputs") with the unreduced model's, and the share of patches
still held by a token (`vitprune.reduced_intermediates`). No timing: a fidelity table only.
"""
from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import vitprune
from vitprune.data import find_images, load_images, transform_for
from vitprune.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
SETTINGS = [("tome", {"r": 8}), ("tome", {"r": 13}), ("evit", {"keep": 0.7}), ("ats", {"keep": 0.7}),
            ("zerotprune", {"keep": 0.7}), ("ppt", {"r": 50})]


def dense_fidelity(base: torch.nn.Module, images: torch.Tensor, blocks: list[int]) -> list[tuple[str, list, list]]:
    """Per setting: (label, cosine per block, share of patches held per block)."""
    with torch.inference_mode():
        reference = base.forward_intermediates(images, indices=blocks, output_fmt="NLC", intermediates_only=True)
        rows = []
        for method, setting in SETTINGS:
            reduced = vitprune.apply(copy.deepcopy(base), method=method, **setting)
            dense = reduced.forward_intermediates(images, indices=blocks, output_fmt="NLC", intermediates_only=True)
            held = [(block.patch_map >= 0).float().mean().item()
                    for block in vitprune.reduced_intermediates(reduced, images, indices=blocks)]
            cosine = [F.cosine_similarity(a, b, dim=-1).mean().item() for a, b in zip(dense, reference, strict=True)]
            label = f"{method} " + " ".join(f"{k}={v}" for k, v in setting.items())
            rows.append((label, cosine, held))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--blocks", default="3,6,9,11", help="blocks to compare, comma-separated")
    args = parser.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]
    base, _ = create_model("vit_tiny_patch16_224", checkpoint=WEIGHTS)
    images, _ = load_images(find_images(args.images, limit=args.limit), transform_for(base))
    table = Table(title=f"dense features vs unreduced, vit_tiny, {len(images)} images "
                        f"({platform.machine()}, torch {torch.__version__})")
    table.add_column("setting")
    for block in blocks:
        table.add_column(f"block {block}: cos / held", justify="right")
    for label, cosine, held in dense_fidelity(base, images, blocks):
        table.add_row(label, *(f"{c:.3f} / {h:.2f}" for c, h in zip(cosine, held, strict=True)))
    Console().print(table)


if __name__ == "__main__":
    main()
