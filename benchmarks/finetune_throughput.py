"""Training throughput of `vitprune finetune` (images/s), one process, synthetic images.

Times `vitprune.finetune.Trainer.step` (teacher forward, student forward + backward, clip, AdamW
step) on random batches, so disk and JPEG decoding are left out. Random weights: the speed does
not depend on them. Prints one table row per mode.

    python benchmarks/finetune_throughput.py --model deit_small_patch16_224 --device cuda --amp bf16 --batch-size 128
    python benchmarks/finetune_throughput.py --model vit_tiny_patch16_224 --batch-size 16 --steps 5   # CPU
"""
from __future__ import annotations

import argparse
import time

import torch
from timm.optim import create_optimizer_v2

from vitprune.finetune import Trainer, Variant, supervit_variants
from vitprune.finetune.supervit import make_student
from vitprune.finetune.train import make_scaler
from vitprune.models import create_model
from vitprune.patch import model_img_size
from vitprune.plan import Plan, make_plan


def images_per_second(name: str, variants: list[Variant], supervit: bool, args: argparse.Namespace) -> float:
    device = torch.device(args.device)
    teacher, _ = create_model(name, pretrained=False)
    student = make_student(teacher, variants[0].plan, supervit)
    teacher.eval().requires_grad_(False).to(device)
    student.to(device).train()
    optimizer = create_optimizer_v2(student, opt="adamw", lr=1e-5, weight_decay=0.05)
    trainer = Trainer(teacher=teacher, student=student, runner=student, variants=variants, optimizer=optimizer,
                      amp=args.amp, supervit=supervit, scaler=make_scaler(args.amp), device=device,
                      train_params=[p for p in student.parameters() if p.requires_grad])
    size = model_img_size(teacher)
    images = torch.randn(args.batch_size, 3, size, size)
    labels = torch.randint(0, teacher.num_classes, (args.batch_size,))
    for _ in range(args.warmup):
        trainer.step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = create_model(args.model, pretrained=False)
    depth, size, patch = len(model.blocks), model_img_size(model), model.patch_embed.patch_size[0]
    modes = [
        ("unreduced student", [Variant("val", "none", Plan(), size)], False),
        ("EViT keep 0.7 @ 3,6,9", [Variant("val", "evit", make_plan("evit", depth, keep=0.7), size)], False),
        ("EViT keep 0.5 @ 3,6,9", [Variant("val", "evit", make_plan("evit", depth, keep=0.5), size)], False),
        ("SuperViT 3 sizes x 3 keeps",
         supervit_variants(depth, size, (size - 4 * patch, size - 2 * patch, size), (0.5, 0.7, 1.0), patch), True),
    ]
    device = args.device if args.device == "cpu" else f"cuda ({torch.cuda.get_device_name()})"
    print(f"{args.model}, batch {args.batch_size}, {device}, amp {args.amp}, {args.steps} timed steps")
    print(f"{'mode':32s} {'images/s':>10s}")
    for label, variants, supervit in modes:
        print(f"{label:32s} {images_per_second(args.model, variants, supervit, args):10.1f}", flush=True)


if __name__ == "__main__":
    main()
