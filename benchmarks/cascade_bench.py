"""Does a calibrated cascade's wall-clock follow its GMACs saving? (issue 6, batch 32)

    .venv/bin/python benchmarks/cascade_bench.py CASCADE_DIR --data ../shared/data/images/imagenet-sample-images

CASCADE_DIR is a folder written by `vitprune cascade ... -o CASCADE_DIR`. The base model (its
own weights, unreduced, at its own size) and the cascade each process the same images in batches
of --batch, whole sweeps timed and interleaved (base, cascade, base, ...) so drift in the machine's
speed hits both alike (vitprune.bench.interleaved_timing); the median sweep gives ms/image. Eager
PyTorch, then ONNX Runtime (the base exported with vitprune.onnx_runtime.export_onnx, the cascade as
one graph per stage run by OnnxCascade).

The cascade's cost depends on which images are in a batch (easy ones leave early), so the images
are a fixed random subset (--limit, --seed) and the GMACs are those the cascade really spent on
them. "follows within 15%" means |time ratio / GMACs ratio - 1| <= 0.15, ratios cascade / base.
Run it on an idle machine: other load distorts the timings.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import vitprune
from vitprune.bench import interleaved_timing
from vitprune.cascade import CascadeModel, OnnxCascade, export_cascade_onnx
from vitprune.data import predict, resize_images
from vitprune.flops import count_macs
from vitprune.metrics import classification_metrics
from vitprune.onnx_runtime import export_onnx, onnx_session, run_session
from vitprune.patch import model_img_size
from vitprune.source import load_images_for

TOLERANCE = 0.15


def sweeps(runners: dict, images, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median ms/image of each runner over whole sweeps of `images` in batches, interleaved."""
    batches = [images[i:i + batch] for i in range(0, len(images), batch)]

    def sweep(runner):
        return lambda: [runner(chunk) for chunk in batches]

    # One "batch size": the whole sweep, so interleaved_timing's ms / batch is ms / image.
    timed = interleaved_timing(lambda _: {name: sweep(runner) for name, runner in runners.items()}, (len(images),),
                               warmup=warmup, repeats=repeats)
    return {name: timed[name][len(images)] for name in runners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cascade_dir", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=256, help="images timed (a fixed random subset)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--resize-check", action="store_true",
                        help="instead of timing: each stage's top-1 with per-size preprocessing vs the in-cascade resize")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.resize_check:
        resize_check(args)
        return

    cascade = vitprune.load(args.cascade_dir)
    assert isinstance(cascade, CascadeModel), f"{args.cascade_dir} is not a cascade"
    base = cascade.base.eval()
    base_size = model_img_size(base)
    images, _, _ = load_images_for(base, args.data, limit=args.limit, workers=2, img_size=cascade.input_size,
                                   progress=False)

    with torch.inference_mode():
        spent = torch.cat([cascade.run(images[i:i + args.batch], count_macs=True).gmacs_per_image
                           for i in range(0, len(images), args.batch)])
        exits = torch.cat([cascade.run(images[i:i + args.batch]).exit_stage for i in range(0, len(images), args.batch)])
    base_gmacs = count_macs(base).gmacs
    gmacs_ratio = float(spent.mean()) / base_gmacs
    histogram = torch.bincount(exits, minlength=len(cascade.stages)).tolist()

    rows = []
    with torch.inference_mode():
        eager = sweeps({"base": lambda x: base(resize_images(x, base_size)), "cascade": cascade}, images, args.batch,
                       args.repeats, args.warmup)
    rows.append(("eager PyTorch", eager["base"], eager["cascade"]))
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(base, Path(tmp) / "base.onnx", batch="dynamic")
            export_cascade_onnx(cascade, Path(tmp) / "cascade")
            threads = args.threads or torch.get_num_threads()
            base_session = onnx_session(Path(tmp) / "base.onnx", provider="cpu", threads=threads)
            runner = OnnxCascade(Path(tmp) / "cascade", provider="cpu", threads=threads)
            onnx = sweeps({"base": lambda x: run_session(base_session, resize_images(torch.from_numpy(x), base_size)),
                           "cascade": runner}, images.numpy(), args.batch, args.repeats, args.warmup)
        rows.append(("ONNX Runtime (CPU)", onnx["base"], onnx["cascade"]))

    print(f"cascade: {cascade.describe()}")
    print(f"thresholds: {[round(t, 4) for t in cascade.thresholds]}; exits per stage on {len(images)} images: {histogram}")
    print(f"GMACs / image: base {base_gmacs:.3f}, cascade {float(spent.mean()):.3f} (ratio {gmacs_ratio:.3f})")
    print(f"batch {args.batch}, {torch.get_num_threads()} threads, median of {args.repeats} sweeps after {args.warmup} warm-up")
    print()
    print(f"| runtime | base ms/img | cascade ms/img | time ratio | GMACs ratio | time/GMACs - 1 | within {TOLERANCE:.0%} |")
    print("|---|---|---|---|---|---|---|")
    for runtime, base_ms, cascade_ms in rows:
        time_ratio = cascade_ms / base_ms
        deviation = time_ratio / gmacs_ratio - 1
        print(f"| {runtime} | {base_ms:.2f} | {cascade_ms:.2f} | {time_ratio:.3f} | {gmacs_ratio:.3f} | "
              f"{deviation:+.1%} | {'yes' if abs(deviation) <= TOLERANCE else 'no'} |")


def resize_check(args: argparse.Namespace) -> None:
    """Accuracy is what matters here, not time: the figures hold on a busy machine too."""
    cascade = vitprune.load(args.cascade_dir)
    full, labels, _ = load_images_for(cascade.base, args.data, limit=args.limit, workers=2,
                                      img_size=cascade.input_size, progress=False)
    print(f"{len(full)} images; per-size: timm's eval transform at the stage size (resize + center crop);")
    print("in-cascade: the input-size batch resized on the tensor (bicubic, antialiased)")
    print()
    print("| stage | top-1 per-size % | top-1 in-cascade % | agreement of the two % | max |logit diff| |")
    print("|---|---|---|---|---|")
    for index, (stage, size) in enumerate(zip(cascade.stages, cascade.stage_sizes, strict=True)):
        own, _, _ = load_images_for(stage, args.data, limit=args.limit, workers=2, img_size=size, progress=False)
        with torch.inference_mode():
            per_size = predict(stage, own, batch_size=args.batch, progress=False)
            resized = predict(stage, resize_images(full, size), batch_size=args.batch, progress=False)
        top1 = [classification_metrics(logits, labels, None)["top1"] for logits in (per_size, resized)]
        agree = classification_metrics(resized, None, per_size)["agreement"]
        print(f"| {index + 1}: {size}px | {top1[0]:.2f} | {top1[1]:.2f} | {agree:.2f} | "
              f"{float((per_size - resized).abs().max()):.3f} |")


if __name__ == "__main__":
    main()
