"""Method x setting -> top-1, agreement, GMACs, ms/img, speed-up, on real weights and images.

    python benchmarks/methods.py                      # vit_tiny and deit_tiny from ../shared
    python benchmarks/methods.py --models vit_tiny_patch16_224 --limit 300 --repeats 5
    python benchmarks/methods.py --batches ''         # accuracy with 95% intervals and GMACs, no timing

The intervals are the report's (vitprune.evaluation): the top-1 change's is paired over the
per-image differences (normal approximation), the agreement's is Wilson's.

Each reduced model is timed in its own interleaved run with the unreduced model
(vitprune.bench.measure_latency on the pair), so every speed-up is a ratio measured side by side,
and the other settings' weights and activations do not evict its own from the CPU caches (a
deployment holds one model; timing all eight in turn cost the reduced ones, whose every block has
another shape, up to 8% in an earlier version of this script). The base row's ms/img is the median
over the pairs. The reference ToMe package
(facebookresearch/ToMe) is not on PyPI (the `tome` there is an unrelated project), so there is
no column for it; vitprune's own ToMe is the training-free peer.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import vitprune
from vitprune.bench import measure_latency
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.evaluation import classification_figures
from vitprune.metrics import classification_metrics, prediction_terms
from vitprune.models import create_model
from vitprune.report import count_gmacs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
SETTINGS = [
    ("evit", {"keep": 0.7}),
    ("evit", {"keep": 0.5}),
    ("ats", {"keep": 1.0}),
    ("ats", {"keep": 0.7}),
    ("tome", {"r": 8}),
    ("tome", {"r": 13}),
    ("tome", {"r": 13, "protect": 0.2}),
    ("tome", {"r": 16}),
]


def label(method: str, setting: dict) -> str:
    return f"{method} " + " ".join(f"{k}={v}" for k, v in setting.items())


def benchmark_model(name: str, images_dir: Path, limit: int | None, batches: tuple[int, ...], repeats: int,
                    console: Console, only: str | None = None) -> list[dict]:
    base, _ = create_model(name, checkpoint=WEIGHTS[name])
    images, labels = load_images(find_images(images_dir, limit=limit), transform_for(base), progress=True)
    base_logits = predict(base, images, description=f"{name} base")
    base_metrics = classification_metrics(base_logits, labels, None)
    models = {"base": base}
    rows = [{"model": name, "setting": "base", "top1": base_metrics["top1"], "agreement": 100.0,
             "gmacs": count_gmacs(base, images)}]
    for method, setting in SETTINGS:
        if only is not None and only not in label(method, setting):
            continue
        reduced = vitprune.apply(copy.deepcopy(base), method=method, **setting)
        logits = predict(reduced, images, description=label(method, setting))
        metrics = classification_metrics(logits, labels, base_logits)
        figures = classification_figures(prediction_terms(logits, base_logits, labels))  # the report's intervals
        rows.append({"model": name, "setting": label(method, setting), "top1": metrics["top1"],
                     "agreement": metrics["agreement"], "gmacs": count_gmacs(reduced, images),
                     "top1_drop_ci95": figures["top1_drop_ci95"], "agreement_ci95": figures["agreement_ci95"]})
        models[label(method, setting)] = reduced
    if not batches:  # accuracy and GMACs only
        return rows
    base_times: dict[int, list[float]] = {batch: [] for batch in batches}
    for row in rows[1:]:
        console.print(f"timing {row['setting']} against base at batch {batches} ...")
        pair = {"base": base, row["setting"]: models[row["setting"]]}
        timing = measure_latency(pair, images[: max(batches)], batches, repeats=repeats)["ms_per_image"]
        for batch in batches:
            row[f"ms_b{batch}"] = timing[row["setting"]][batch]
            row[f"speedup_b{batch}"] = timing["base"][batch] / timing[row["setting"]][batch]
            base_times[batch].append(timing["base"][batch])
        row["gmacs_ratio"] = rows[0]["gmacs"] / row["gmacs"]
    for batch in batches:
        rows[0][f"ms_b{batch}"] = statistics.median(base_times[batch])
        rows[0][f"speedup_b{batch}"] = 1.0
    rows[0]["gmacs_ratio"] = 1.0
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(WEIGHTS))
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batches", default="1,32", help="'' for accuracy, intervals and GMACs without timing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--only", help="run only the settings whose label contains this text, e.g. 'tome r=13'")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(",") if b)
    console = Console()
    rows = []
    for name in args.models:
        rows += benchmark_model(name, args.data, args.limit, batches, args.repeats, console, args.only)
    table = Table(title=f"vitprune methods — {platform.machine()}, {torch.get_num_threads()} threads, eager PyTorch {torch.__version__}")
    timed = bool(batches)
    for column in ["model", "setting", "top-1 %", "top-1 change 95% CI", "agree %", "agree 95% CI", "GMACs",
                   *(["GMACs ratio", *[f"ms/img b{b}" for b in batches], *[f"speed-up b{b}" for b in batches],
                      "speed-up / GMACs ratio"] if timed else [])]:
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for row in rows:
        drop, agree = row.get("top1_drop_ci95"), row.get("agreement_ci95")
        cells = [row["model"], row["setting"], f"{row['top1']:.1f}",
                 f"{0.0 - drop[1]:+.1f}..{0.0 - drop[0]:+.1f}" if drop else "", f"{row['agreement']:.1f}",
                 f"{agree[0]:.1f}..{agree[1]:.1f}" if agree else "", f"{row['gmacs']:.3f}"]
        if timed:
            last = batches[-1]
            cells += [f"{row['gmacs_ratio']:.2f}", *[f"{row[f'ms_b{b}']:.2f}" for b in batches],
                      *[f"{row[f'speedup_b{b}']:.2f}x" for b in batches],
                      f"{row[f'speedup_b{last}'] / row['gmacs_ratio']:.2f}"]
        table.add_row(*cells)
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
