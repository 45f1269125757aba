"""GPU throughput: base vs EViT 0.7, ToMe r=13 (r=8 on vit_large, r=16 too on vit_base) and ATS K=0.7.

    python benchmarks/gpu.py                          # one recent GPU, bf16, under 8 minutes
    python benchmarks/gpu.py --device cpu --quick     # a tiny model on the CPU, a few seconds (a test runs it)

Random weights and random images: no download. For each model (vit_small / vit_base / vit_large
at 224, vit_base at 384) and runtime (eager; torch.compile, compiled against compiled) the four
models are timed side by side at batch 1, 64 and 256 (`vitprune.bench.measure_latency`, median
after warm-up) under autocast (`vitprune.runtime.Runtime`). ONNX Runtime: vit_base 224, fp16
graphs, batch 64, on the CUDA provider and on TensorRT when ONNX Runtime has it.

Columns: throughput (images/s), speed-up over the base in the same runtime, the GMACs ratio
base/reduced, and speed-up / GMACs ratio (1.0: the whole saving in MACs shows up in time).
On random images ATS keeps the count that noise gives, not what real images give; its GMACs are
counted on the same images. Compiled ATS is left out: its per-batch kept count is a Python int
(a graph break and one recompilation per new count, see docs/deploy.md). Compilation time is
printed apart. `--budget-s` stops starting new (model, runtime) groups once the run has taken that
long, so the whole run fits its time; the cells left out say so.
"""
from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch

import vitprune
from vitprune.bench import measure_latency
from vitprune.export import bench_onnx, export_onnx
from vitprune.onnx_runtime import PROVIDERS, choose_provider
from vitprune.report import count_gmacs
from vitprune.runtime import Runtime
from vitprune.tables import ReportTable

FULL = [("vit_small_patch16_224", 224, {}), ("vit_base_patch16_224", 224, {}),
        ("vit_large_patch16_224", 224, {}), ("vit_base_patch16_384", 384, {})]
QUICK = [("vit_tiny_patch16_224", 64, {"depth": 4})]
ONNX_MODEL = {"full": "vit_base_patch16_224", "quick": "vit_tiny_patch16_224"}


def methods_for(name: str) -> dict[str, dict]:
    """EViT 0.7, ToMe r=13 (r=8 on vit_large; also r=16 on vit_base 224, the ToMe paper's ViT-B figure), ATS 0.7."""
    r = 8 if "large" in name else 13
    plans = {"evit 0.7": {"method": "evit", "keep": 0.7}, f"tome r={r}": {"method": "tome", "r": r}}
    if name == "vit_base_patch16_224":
        plans["tome r=16"] = {"method": "tome", "r": 16}
    return {**plans, "ats 0.7": {"method": "ats", "keep": 0.7}}


def build(name: str, size: int, overrides: dict) -> tuple[dict[str, torch.nn.Module], torch.Tensor, dict]:
    """The base and its reduced copies (random weights), random images, and each one's GMACs."""
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False, img_size=size, **overrides).eval()
    models = {"base": base}
    for label, settings in methods_for(name).items():
        models[label] = vitprune.apply(copy.deepcopy(base), **settings)
    images = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    gmacs = {label: count_gmacs(model, images) for label, model in models.items()}
    return models, images, gmacs


def timed_rows(label: str, models: dict, images: torch.Tensor, gmacs: dict, runtime: Runtime,
               batches: tuple[int, ...], repeats: int) -> tuple[list[list[str]], dict]:
    """One runtime's rows: every model at every batch size, timed side by side."""
    names = [name for name in models if not (runtime.compile and name.startswith("ats"))]
    prepared = {name: runtime.prepare(models[name]) for name in names}
    timing = measure_latency(prepared, images, batches, warmup=3 if repeats > 2 else 1, repeats=repeats,
                             device=runtime.device)
    run = f"compiled ({runtime.compile_mode})" if runtime.compile else "eager"
    return rows(label, run, timing["ms_per_image"], gmacs, batches), timing["compile_s"]


def rows(label: str, run: str, ms: dict, gmacs: dict, batches: tuple[int, ...]) -> list[list[str]]:
    out = []
    for batch in batches:
        for name, per_batch in ms.items():
            if batch not in per_batch:
                continue
            speedup = ms["base"][batch] / per_batch[batch]
            ratio = gmacs["base"] / gmacs[name]
            out.append([label, str(batch), run, name, f"{1000 / per_batch[batch]:.0f}",
                        f"{speedup:.2f}x", f"{ratio:.2f}x", f"{speedup / ratio:.2f}"])
    return out


def onnx_rows(label: str, models: dict, images: torch.Tensor, gmacs: dict, batch: int, fp16: bool,
              providers: list[str], repeats: int) -> list[list[str]]:
    """The models as ONNX graphs (fp16 inside on a GPU) on each ONNX Runtime provider, side by side."""
    out = []
    with tempfile.TemporaryDirectory(prefix="vitprune-gpu-") as scratch:
        paths = {}
        for name, model in models.items():
            paths[name] = Path(scratch) / f"{name.replace(' ', '_')}.onnx"
            export_onnx(model.cpu(), paths[name], fp16=fp16)
        for provider in providers:
            timing = bench_onnx(paths, images, (batch,), warmup=3 if repeats > 2 else 1, repeats=repeats,
                                provider=provider)
            run = f"ONNX Runtime {timing['provider'].removesuffix('ExecutionProvider')}" + (" fp16" if fp16 else "")
            out += rows(label, run, timing["ms_per_image"], gmacs, (batch,))
    return out


def onnx_providers(device: str) -> list[str]:
    """cpu for a CPU run; on a GPU the CUDA provider, and TensorRT when ONNX Runtime has it."""
    if device == "cpu":
        return ["cpu"]
    import onnxruntime as ort  # heavy, only the ONNX rows need it

    available = ort.get_available_providers()
    return [name for name in ("cuda", "tensorrt") if PROVIDERS[name] in available and choose_provider(name)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="a tiny model, batch 1 and 4, eager and ONNX only")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no new group after this many seconds")
    args = parser.parse_args()
    quick = args.quick
    specs, batches = (QUICK, (1, 4)) if quick else (FULL, (1, 64, 256))
    repeats = 2 if quick else args.repeats
    runtimes = [Runtime(device=args.device, dtype=args.dtype)]
    if not quick:
        runtimes.append(Runtime(device=args.device, dtype=args.dtype, compile=True, compile_mode=args.compile_mode))
    table = ReportTable(["model", "batch", "runtime", "plan", "img/s", "speed-up", "GMACs ratio", "speed-up / GMACs ratio"])
    started, compile_notes, skipped = time.perf_counter(), [], []
    for name, size, overrides in specs:
        label = f"{name.split('_patch')[0]} {size}"
        models, images, gmacs = build(name, size, overrides)
        for runtime in runtimes:
            if time.perf_counter() - started > args.budget_s:
                skipped.append(f"{label} {runtime.describe()}")
                continue
            found, compile_s = timed_rows(label, models, images, gmacs, runtime, batches, repeats)
            for row in found:
                table.add(*row)
            if compile_s:
                compile_notes.append(f"{label}: " + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items()))
        if name == ONNX_MODEL["quick" if quick else "full"]:
            fp16 = args.device != "cpu"
            for row in onnx_rows(label, models, images, gmacs, 4 if quick else 64, fp16, onnx_providers(args.device),
                                 repeats):
                table.add(*row)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    print(f"\n{device}, {args.dtype} autocast, torch {torch.__version__}, timm {timm.__version__}, "
          f"random weights and images, median of {repeats} runs\n")
    print(table.markdown())
    for note in compile_notes:
        print(f"\ncompilation (first calls, not in the timings): {note}")
    for note in skipped:
        print(f"\nleft out (time budget): {note}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
