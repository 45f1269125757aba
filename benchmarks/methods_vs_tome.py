"""Zero-TPrune, PPT and Token Transforming against ToMe at equal GMACs, paired per image.

    python benchmarks/methods_vs_tome.py                           # both shared weights, 1000 images
    python benchmarks/methods_vs_tome.py --models deit_tiny_patch16_224 --limit 200 --shared ../shared/data

Each method runs at its published (off-the-shelf) setting, and at a more aggressive one. ToMe is
matched to the method's GMACs: r merged in every block, r + 1 in the first j blocks, the (r, j)
whose GMACs come nearest. Both run on the same images, so the difference in top-1 (and in
agreement with the unreduced model) is paired per image; its standard error is the standard
deviation of the per-image differences over sqrt(n). The paper column is the gain over ToMe that
the method's paper reports on DeiT-S (ImageNet-1k val, training-free).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

from rich.console import Console
from torch import Tensor, nn

import vitprune
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.flops import count_macs
from vitprune.metrics import classification_metrics
from vitprune.models import create_model
from vitprune.plan import Plan, Reduction
from vitprune.report import count_gmacs
from vitprune.tables import ReportTable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": "deit_tiny_patch16_224.lnfixed.pth",
}
# (method, settings beyond the defaults, the paper's DeiT-S figure against ToMe 78.9 % at 2.95 GFLOPs)
SETTINGS = [
    ("zerotprune", {}, "+0.5 (79.4 @ 2.97 vs ToMe 78.9 @ 2.95)"),
    ("zerotprune", {"keep": 0.57}, "79.1 @ 2.50: +0.2 over ToMe @ 2.95 with 15% fewer GFLOPs"),
    ("zerotprune", {"keep": 0.5}, "-"),
    ("ppt", {}, "+0.6 (79.5 @ 2.94 vs ToMe 78.9 @ 2.95)"),
    ("ppt", {"r": 64}, "-"),
    ("transform", {}, "-0.1 pt from base at -40% GFLOPs; ToMe: -0.9 pt at -36%"),
    ("transform", {"keep": 0.5}, "-"),
]
MAX_R = 40


def tome_plan(r: int, extra: int, depth: int) -> Plan:
    """ToMe merging r + 1 tokens in the first `extra` blocks and r in the others."""
    return Plan(tuple(Reduction(layer, "tome", r=r + (layer < extra)) for layer in range(depth)))


def tome_gmacs_table(base: nn.Module) -> dict[tuple[int, int], float]:
    """GMACs of every (r, extra) ToMe plan (ToMe's count does not depend on the image)."""
    depth, table = len(base.blocks), {}
    model = copy.deepcopy(base)
    for r in range(MAX_R):
        for extra in range(depth):
            vitprune.apply(model, tome_plan(r, extra, depth))
            table[(r, extra)] = count_macs(model).gmacs
    vitprune.remove(model)
    return table


def matched_tome(base: nn.Module, table: dict[tuple[int, int], float], gmacs: float) -> tuple[nn.Module, str]:
    """ToMe at the GMACs nearest `gmacs`, and its label."""
    r, extra = min(table, key=lambda key: abs(table[key] - gmacs))
    label = f"tome r={r}" + (f" (r={r + 1} in blocks 0-{extra - 1})" if extra else "")
    return vitprune.apply(copy.deepcopy(base), tome_plan(r, extra, len(base.blocks))), label


def paired(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean of a - b (percentage points) and its standard error, for per-image 0/1 outcomes."""
    diff = (a.double() - b.double()) * 100.0
    return float(diff.mean()), float(diff.std(unbiased=True) / math.sqrt(len(diff)))


def outcomes(logits: Tensor, labels: Tensor, base_logits: Tensor) -> tuple[Tensor, Tensor]:
    predicted = logits.argmax(dim=1)
    return predicted == labels, predicted == base_logits.argmax(dim=1)


def compare_model(name: str, shared: Path, limit: int | None, only: str | None = None) -> list[dict]:
    base, _ = create_model(name, checkpoint=shared / "weights" / WEIGHTS[name])
    images_dir = shared / "images" / "imagenet-sample-images"
    images, labels = load_images(find_images(images_dir, limit=limit), transform_for(base), progress=False)
    base_logits = predict(base, images, progress=False)
    base_gmacs = count_gmacs(base, images)
    table = tome_gmacs_table(base)
    rows = [{"model": name, "method": "base", "gmacs": base_gmacs,
             **classification_metrics(base_logits, labels, None)}]
    for method, settings, paper in SETTINGS:
        if only is not None and method != only:
            continue
        reduced = vitprune.apply(copy.deepcopy(base), method=method, **settings)
        tome, tome_label = matched_tome(base, table, count_gmacs(reduced, images))
        row = {"model": name, "method": vitprune.plan_of(reduced).describe(), "tome": tome_label,
               "gmacs": count_gmacs(reduced, images), "tome_gmacs": count_gmacs(tome, images), "paper": paper}
        mine, theirs = (outcomes(predict(model, images, progress=False), labels, base_logits) for model in (reduced, tome))
        row.update(top1=float(mine[0].double().mean()) * 100, tome_top1=float(theirs[0].double().mean()) * 100,
                   agreement=float(mine[1].double().mean()) * 100, tome_agreement=float(theirs[1].double().mean()) * 100)
        row["d_top1"], row["se_top1"] = paired(mine[0], theirs[0])
        row["d_agreement"], row["se_agreement"] = paired(mine[1], theirs[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render(rows: list[dict], images: int) -> ReportTable:
    table = ReportTable(["model", "method (GMACs)", "ToMe at equal GMACs", "top-1 % method / ToMe",
                         "d top-1 (SE)", "agree % method / ToMe", "d agree (SE)", "paper, DeiT-S"],
                        title=f"methods vs ToMe at equal GMACs, {images} images, paired per image")
    for row in rows:
        if row["method"] == "base":
            table.add(row["model"], f"base ({row['gmacs']:.3f})", "", f"{row['top1']:.1f}", "", "100", "", "")
            continue
        table.add(row["model"], f"{row['method']} ({row['gmacs']:.3f})", f"{row['tome']} ({row['tome_gmacs']:.3f})",
                  f"{row['top1']:.1f} / {row['tome_top1']:.1f}", f"{row['d_top1']:+.1f} ({row['se_top1']:.1f})",
                  f"{row['agreement']:.1f} / {row['tome_agreement']:.1f}",
                  f"{row['d_agreement']:+.1f} ({row['se_agreement']:.1f})", row["paper"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WEIGHTS))
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (weights/, images/)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--only", help="run only this method's rows (zerotprune, ppt or transform)")
    args = parser.parse_args()
    rows = [row for name in args.models for row in compare_model(name, args.shared, args.limit, args.only)]
    images = rows[0]["n_images"]
    table = render(rows, images)
    Console().print(table.rich())
    print(table.markdown())
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
