"""Does `vitprune finetune` raise agreement with the teacher on images it never trained on? K-fold answer.

With one image per class, a single 70/30 split leaves 300 held-out images, too few for a paired
test to tell a 3-point gain from noise. Here the images are split into K folds; each fold is held
out once while `run_finetune` trains on the others, so every image is scored exactly once by a
student that never saw it (nor, with one image per class, its class). Per image, before
(off-the-shelf reduction) vs after (fine-tuned) agreement with the unreduced teacher is paired
and tested with McNemar's exact test, per fold and pooled. Top-1 and KL are reported too.

    python benchmarks/finetune_crossval.py --folds 3 --epochs 8       # about 15 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import random
import tempfile
import time
from pathlib import Path

import torch

import vitprune
from vitprune.commands.finetune import FinetuneRequest, run_finetune
from vitprune.data import ImageSet, find_images, load_images, predict, transform_for
from vitprune.metrics import classification_metrics, per_image_terms
from vitprune.models import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_folder(image_set: ImageSet, folder: Path) -> Path:
    """A labels.csv folder of links to `image_set`'s files, so `finetune --data` reads exactly them."""
    folder.mkdir(parents=True)
    with open(folder / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "class_index"])
        for file, label in zip(image_set.files, image_set.labels, strict=True):
            (folder / file.name).symlink_to(file.resolve())
            writer.writerow([file.name, label])
    return folder


def mcnemar(gained: int, lost: int) -> tuple[float, float]:
    """(z, two-sided exact p) for gained vs lost discordant pairs."""
    n = gained + lost
    if n == 0:
        return 0.0, 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return (gained - lost) / math.sqrt(n), min(1.0, 2 * tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", type=Path,
                        default=SHARED / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth")
    parser.add_argument("--data", type=Path, default=SHARED / "images" / "imagenet-sample-images")
    parser.add_argument("--method", default="evit")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--feature-distill", type=float, default=1.0)
    parser.add_argument("--trainable", default="*norm*,*bias")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images = find_images(args.data)
    if images.labels is None:
        raise SystemExit("this benchmark needs labelled images (top-1 is reported too)")
    order = random.Random(args.seed).sample(range(len(images)), len(images))
    folds = [sorted(order[k :: args.folds]) for k in range(args.folds)]

    teacher, _ = create_model(args.model, checkpoint=args.checkpoint)
    before = vitprune.apply(copy.deepcopy(teacher), method=args.method, keep=args.keep)
    recipe = (f"{args.method} keep {args.keep}, {args.epochs} epochs, lr {args.lr:g}, feature distill "
              f"{args.feature_distill:g}, trainable {args.trainable}")
    print(f"{args.model}: {recipe}; {len(images)} images in {args.folds} folds, {torch.get_num_threads()} threads")
    print(f"{'fold':>4s} {'held out':>8s} {'agree before':>12s} {'agree after':>11s} {'+gained':>7s} {'-lost':>5s} "
          f"{'z':>5s} {'p':>7s} {'top-1 before':>12s} {'top-1 after':>11s} {'KL before':>9s} {'KL after':>8s} "
          f"{'train s':>7s}")
    pooled = {"teacher": [], "before": [], "after": [], "labels": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, held_out in enumerate(folds):
            train = sorted(set(range(len(images))) - set(held_out))
            train_dir = write_folder(images.subset(train), Path(tmp) / f"fold{k}-train")
            request = FinetuneRequest(model=args.model, checkpoint=args.checkpoint, method=args.method, keep=args.keep,
                                      data=train_dir, seed=args.seed, epochs=args.epochs, lr=args.lr,
                                      label_weight=0.0, feature_distill=args.feature_distill, crop_scale=0.5,
                                      warmup_epochs=0.3, trainable=tuple(args.trainable.split(",")), workers=1,
                                      progress=False)
            started = time.perf_counter()
            after = run_finetune(request).model
            seconds = time.perf_counter() - started
            x, y = load_images(images.subset(held_out), transform_for(teacher), progress=False)
            logits = {name: predict(model, x, progress=False)
                      for name, model in (("teacher", teacher), ("before", before), ("after", after))}
            for name in ("teacher", "before", "after"):
                pooled[name].append(logits[name])
            pooled["labels"].append(y)
            print(row(str(k), logits, y, seconds), flush=True)
    pooled_logits = {name: torch.cat(pooled[name]) for name in ("teacher", "before", "after")}
    print(row("all", pooled_logits, torch.cat(pooled["labels"]), None))


def row(name: str, logits: dict[str, torch.Tensor], labels: torch.Tensor, seconds: float | None) -> str:
    agrees = {when: per_image_terms(logits[when], logits["teacher"], None)["disagree"] == 0
              for when in ("before", "after")}
    gained = int((agrees["after"] & ~agrees["before"]).sum())
    lost = int((~agrees["after"] & agrees["before"]).sum())
    z, p = mcnemar(gained, lost)
    metrics = {when: classification_metrics(logits[when], labels, logits["teacher"]) for when in ("before", "after")}
    train = f"{seconds:7.0f}" if seconds is not None else f"{'':7s}"
    return (f"{name:>4s} {len(logits['teacher']):8d} {metrics['before']['agreement']:12.1f} "
            f"{metrics['after']['agreement']:11.1f} {gained:7d} {lost:5d} {z:5.2f} {p:7.4f} "
            f"{metrics['before']['top1']:12.1f} {metrics['after']['top1']:11.1f} "
            f"{metrics['before']['kl']:9.4f} {metrics['after']['kl']:8.4f} {train}")


if __name__ == "__main__":
    main()
