"""Embedding fidelity of off-the-shelf plans: cosine and retrieval agreement with the unreduced model.

    python benchmarks/embeddings.py [--limit N]

1. vit_tiny / deit_tiny (shared weights, head removed: pre-logits embeddings) on the shared images:
   EViT keep 0.7 and ToMe r=13.
2. A model without a class token, vit_wee_patch16_reg1_gap_256 with RANDOM weights (no pretrained
   copy here): EViT and ATS with the mean-attention-received fallback score against ToMe at about
   the same GMACs, on the same images.
Prints markdown tables (docs/embeddings.md).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import timm
import torch

import vitprune
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.evaluation import token_scores
from vitprune.flops import count_macs
from vitprune.metrics import embedding_metrics
from vitprune.models import create_model, use_pre_logits
from vitprune.patch import plan_of
from vitprune.report import count_gmacs

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {"vit_tiny_patch16_224": "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
           "deit_tiny_patch16_224": "deit_tiny_patch16_224.lnfixed.pth"}
HEADER = "| model | plan | score | GMACs | cosine mean | cosine p5 | NN agreement % | recall@5 % |\n|---|---|---|---|---|---|---|---|"


def row(name: str, base, images, base_out, **kwargs) -> str:
    model = vitprune.apply(copy.deepcopy(base), **kwargs)
    metrics = embedding_metrics(predict(model, images, progress=False), base_out)
    scores = token_scores(model)
    score = scores[0]["score"] if scores else "key similarity (ToMe)"
    return (f"| {name} | {plan_of(model).describe()} | {score} | {count_gmacs(model, images):.3f} | "
            f"{metrics['cosine_mean']:.4f} | {metrics['cosine_p5']:.4f} | {metrics['retrieval_agreement']:.1f} | "
            f"{metrics['recall_at_5']:.1f} |")


def pretrained_tables(image_set, shared: Path) -> None:
    print(HEADER)
    for name, weights in WEIGHTS.items():
        base, _ = create_model(name, checkpoint=shared / "weights" / weights)
        use_pre_logits(base.eval())
        images, _ = load_images(image_set, transform_for(base), progress=False)
        base_out = predict(base, images, progress=False)
        print(f"| {name} | base | | {count_macs(base).gmacs:.3f} | 1 | 1 | 100 | 100 |")
        for kwargs in ({"method": "evit", "keep": 0.7}, {"method": "tome", "r": 13}):
            print(row(name, base, images, base_out, **kwargs))
        sys.stdout.flush()


def gap_table(image_set) -> None:
    torch.manual_seed(0)
    base = use_pre_logits(timm.create_model("vit_wee_patch16_reg1_gap_256", pretrained=False).eval())
    images, _ = load_images(image_set, transform_for(base), progress=False)
    base_out = predict(base, images, progress=False)
    name = "vit_wee_patch16_reg1_gap_256 (random weights)"
    print(HEADER)
    print(f"| {name} | base | | {count_macs(base).gmacs:.3f} | 1 | 1 | 100 | 100 |")
    evit_gmacs = count_macs(vitprune.apply(copy.deepcopy(base), method="evit", keep=0.7)).gmacs
    r = min(range(1, 40), key=lambda r: abs(count_macs(vitprune.apply(copy.deepcopy(base), method="tome", r=r)).gmacs
                                           - evit_gmacs))  # ToMe at EViT's GMACs
    for kwargs in ({"method": "evit", "keep": 0.7}, {"method": "evit", "keep": 0.7, "fuse": False},
                   {"method": "tome", "r": r}, {"method": "ats", "keep": 0.7}):
        print(row(name, base, images, base_out, **kwargs))
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (weights/, images/)")
    parser.add_argument("--part", choices=("pretrained", "gap", "all"), default="all")
    args = parser.parse_args()
    image_set = find_images(args.shared / "images" / "imagenet-sample-images", limit=args.limit)
    print(f"{len(image_set)} images, torch {torch.__version__}, timm {timm.__version__}\n")
    if args.part in ("pretrained", "all"):
        pretrained_tables(image_set, args.shared)
    if args.part in ("gap", "all"):
        print()
        gap_table(image_set)


if __name__ == "__main__":
    main()
