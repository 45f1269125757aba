"""Half precision against float32: top-1 agreement of each reduced model with itself in float32.

    python benchmarks/precision.py                         # both shared weights, 1000 images
    python benchmarks/precision.py --dtype float16 --limit 200

The same reduced model (EViT 0.7, ToMe r=13, ATS K=0.7) runs once in float32 and once under
autocast (`vitprune.runtime.Runtime(dtype=...)`); the table gives the share of images whose top-1
class is the same, the KL between the two, and both top-1 accuracies. The base row is the
unreduced model. Bar: agreement >= 99% for every reduced model.
"""
from __future__ import annotations

import argparse
import copy
import platform
from pathlib import Path

import torch

import vitprune
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.metrics import classification_metrics
from vitprune.models import create_model
from vitprune.runtime import Runtime
from vitprune.tables import ReportTable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {  # files under SHARED/weights
    "vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": "deit_tiny_patch16_224.lnfixed.pth",
}
SETTINGS = [("base", None, {}), ("evit keep=0.7", "evit", {"keep": 0.7}), ("tome r=13", "tome", {"r": 13}),
            ("ats K=0.7", "ats", {"keep": 0.7})]
BAR = 99.0


def rows_for(name: str, shared: Path, limit: int | None, dtype: str, batch_size: int) -> list[list[str]]:
    base, _ = create_model(name, checkpoint=shared / "weights" / WEIGHTS[name])
    images, labels = load_images(find_images(shared / "images" / "imagenet-sample-images", limit=limit), transform_for(base), progress=False)
    half = Runtime(dtype=dtype)
    rows = []
    for label, method, settings in SETTINGS:
        model = base if method is None else vitprune.apply(copy.deepcopy(base), method=method, **settings)
        full = predict(model.eval(), images, batch_size=batch_size, progress=False)
        low = predict(half.prepare(model), images, batch_size=batch_size, progress=False)
        ours = classification_metrics(low, labels, full)
        ref = classification_metrics(full, labels, None)
        met = "" if method is None else ("met" if ours["agreement"] >= BAR else "MISSED")
        rows.append([name, label, f"{ours['agreement']:.1f}", f"{ours['kl']:.5f}", f"{ref['top1']:.1f}",
                     f"{ours['top1']:.1f}", met])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WEIGHTS))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (images/, weights/)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    table = ReportTable(["model", "plan", f"top-1 agreement {args.dtype} vs float32 %", "KL", "top-1 float32 %",
                         f"top-1 {args.dtype} %", f"bar {BAR:g}%"])
    for name in args.models:
        for row in rows_for(name, args.shared, args.limit, args.dtype, args.batch_size):
            table.add(*row)
    print(f"\n{args.dtype} autocast vs float32, eager, {platform.machine()} CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print(table.markdown())


if __name__ == "__main__":
    main()
