"""Batch 1 against batch 32: eager speed-up of EViT 0.7, ToMe r=13 and ATS K=197 next to the GMACs
ratio they promise, on random weights (no downloads).

    PYTHONPATH=. .venv/bin/python benchmarks/batch1.py               # vit_tiny, deit_small, vit_base
    PYTHONPATH=. .venv/bin/python benchmarks/batch1.py --baseline ../old # also that checkout's reduced models
    PYTHONPATH=. .venv/bin/python benchmarks/batch1.py --models deit_small_patch16_224 --batches 1 --compile --onnx
    PYTHONPATH=. .venv/bin/python benchmarks/batch1.py --profile deit_small_patch16_224

(PYTHONPATH=. : the checkout's own vitprune, not an installed one.)

For each model, the base and every reduced variant are timed in one interleaved run
(`vitprune.bench.measure_latency`: median ms/image after warm-up, the models taking turns in every
repeat), so each speed-up is a ratio measured side by side. `--baseline` imports another vitprune
checkout into the same process under its own modules and adds its reduced models to the same
interleaved run ("before" and "after" on equal terms). `--compile` times torch.compile'd base and
reduced models (compile time reported apart); `--onnx` exports each with `vitprune.export` and times
the graphs on ONNX Runtime. `--profile` prints torch.profiler's op table of one model's reduced
forward at batch 1 and the number of operators a forward pass dispatches.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

import vitprune
from vitprune.bench import measure_latency
from vitprune.export import bench_onnx, export_onnx
from vitprune.report import count_gmacs

MODELS = ["vit_tiny_patch16_224", "deit_small_patch16_224", "vit_base_patch16_224"]
METHODS = {"tome r=13": ("tome", {"r": 13}), "evit keep=0.7": ("evit", {"keep": 0.7}), "ats K=197": ("ats", {"keep": 1.0})}
BASELINE = " (baseline)"


def load_baseline_apply(path: Path):
    """`apply` of the vitprune checkout at `path`, imported beside this one: its modules are loaded
    under the name `vitprune`, kept alive by the models they patch, and this checkout's restored."""
    ours = {name: module for name, module in sys.modules.items() if name == "vitprune" or name.startswith("vitprune.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        other = importlib.import_module("vitprune.patch")
        importlib.import_module("vitprune.methods")
    finally:
        sys.path.remove(str(path))
        for name in [name for name in sys.modules if name == "vitprune" or name.startswith("vitprune.")]:
            del sys.modules[name]
        sys.modules.update(ours)
    return other.apply


def build(name: str, methods: list[str], baseline_apply) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """{label: model} for the base and each method (and its baseline twin); {label: method label}."""
    torch.manual_seed(0)
    base = timm.create_model(name, pretrained=False).eval()
    models, method_of = {"base": base}, {"base": "base"}
    for label in methods:
        method, settings = METHODS[label]
        models[label] = vitprune.apply(copy.deepcopy(base), method=method, **settings)
        method_of[label] = label
        if baseline_apply is not None:
            models[label + BASELINE] = baseline_apply(copy.deepcopy(base), method=method, **settings)
            method_of[label + BASELINE] = label
    return models, method_of


def time_eager(models: dict, images: torch.Tensor, batches: tuple[int, ...], repeats: int) -> dict[str, dict[int, float]]:
    """ms/image per model and batch; batches above 8 take a third of the repeats (their runs are long)."""
    out: dict[str, dict[int, float]] = {name: {} for name in models}
    for batch in batches:
        count = repeats if batch <= 8 else max(3, repeats // 3)
        timing = measure_latency(models, images, (batch,), warmup=3, repeats=count)["ms_per_image"]
        for name in models:
            out[name][batch] = timing[name][batch]
    return out


@torch.inference_mode()
def time_compiled(models: dict, images: torch.Tensor, repeats: int, console: Console) -> dict[str, float]:
    """ms/image at batch 1 of each model compiled (torch.compile, default mode); compile times printed."""
    compiled = {}
    x = images[:1]
    for name, model in models.items():
        start = time.perf_counter()
        compiled[name] = torch.compile(model)
        compiled[name](x)
        console.print(f"  compiled {name} in {time.perf_counter() - start:.0f} s")
    timing = measure_latency(compiled, images, (1,), warmup=3, repeats=repeats)["ms_per_image"]
    return {name: timing[name][1] for name in compiled}


def time_onnx(models: dict, images: torch.Tensor, repeats: int, threads: int) -> dict[str, float]:
    """ms/image at batch 1 on ONNX Runtime (CPU) of each model exported with a dynamic batch."""
    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for index, (name, model) in enumerate(models.items()):
            paths[name] = Path(folder) / f"model{index}.onnx"
            export_onnx(model, paths[name])
        timing = bench_onnx(paths, images, (1,), warmup=3, repeats=repeats, provider="cpu", threads=threads)
    return {name: timing["ms_per_image"][name][1] for name in models}


def operator_count(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, Counter]:
    """Top-level operators one forward pass dispatches."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    events = [event.name for event in prof.events() if event.cpu_parent is None]
    return len(events), Counter(events)


# torch.profiler's names of the operators that do a ViT's arithmetic; every other operator is
# bookkeeping (reshapes, index building, gathers, sorts, the reducers' small ops)
ARITHMETIC = {"aten::addmm": "linear", "aten::mm": "linear", "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
              "aten::native_layer_norm": "norms", "aten::gelu": "gelu", "aten::mkldnn_convolution": "patch embed"}


@torch.inference_mode()
def print_profile(name: str, methods: list[str], console: Console, runs: int = 10) -> None:
    """Per model: operators per forward, wall time, and the profiler's self time by kind of operator."""
    models, _ = build(name, methods, None)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    table = Table(title=f"{name}, batch 1, ms per forward (torch.profiler self CPU time; wall without the profiler)")
    kinds = [*dict.fromkeys(ARITHMETIC.values()), "other ops"]
    for column in ["setting", "operators", "wall", *kinds, "outside ops"]:
        table.add_column(column, justify="left" if column == "setting" else "right")
    for label, model in models.items():
        for _ in range(5):
            model(x)
        start = time.perf_counter()
        for _ in range(runs):
            model(x)
        wall = (time.perf_counter() - start) * 1000 / runs
        count, frequent = operator_count(model, x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                model(x)
        spent = Counter()
        for event in prof.key_averages():
            spent[ARITHMETIC.get(event.key, "other ops")] += event.self_cpu_time_total / 1000 / runs
        table.add_row(label, str(count), f"{wall:.2f}", *[f"{spent[kind]:.2f}" for kind in kinds],
                      f"{wall - sum(spent.values()):.2f}")
        console.print(f"{label}: most frequent operators {frequent.most_common(10)}")
    console.print(table)


def row_cells(model: str, label: str, gmacs_ratio: float, speed: dict, batches: tuple[int, ...]) -> list[str]:
    cells = [model, label, f"{gmacs_ratio:.2f}"]
    cells += [f"{speed[batch]:.2f}x" if batch in speed else "-" for batch in batches]
    first = batches[0]
    return cells + [f"{speed[first] / gmacs_ratio:.2f}" if first in speed else "-"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another vitprune checkout, timed in the same runs")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd, batch 1")
    parser.add_argument("--onnx", action="store_true", help="also ONNX Runtime (CPU), batch 1")
    parser.add_argument("--profile", metavar="MODEL", help="print the profiler table of MODEL's forward at batch 1 and stop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    if args.profile:
        print_profile(args.profile, args.methods, console)
        return
    batches = tuple(int(b) for b in args.batches.split(","))
    baseline_apply = load_baseline_apply(args.baseline.resolve()) if args.baseline else None
    columns = ["model", "setting", "GMACs ratio", *[f"eager b{b}" for b in batches], f"eager b{batches[0]} / ratio"]
    extra = [("compiled b1", args.compile), ("ONNX Runtime b1", args.onnx)]
    columns += [column for title, wanted in extra if wanted for column in (title, f"{title} / ratio")]
    table = Table(title=f"speed-up over the base, {torch.get_num_threads()} threads, eager PyTorch {torch.__version__}, random weights")
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "setting") else "right")
    for name in args.models:
        models, method_of = build(name, args.methods, baseline_apply)
        images = torch.randn(max(batches), 3, 224, 224, generator=torch.Generator().manual_seed(1))
        # the baseline's twins do the same arithmetic (and this checkout's counter cannot read their patch)
        gmacs = {label: count_gmacs(model, images[:8]) for label, model in models.items() if not label.endswith(BASELINE)}
        console.print(f"timing {name}: {', '.join(models)} ...")
        eager = time_eager(models, images, batches, args.repeats)
        ours = {label: model for label, model in models.items() if not label.endswith(BASELINE)}
        compiled = time_compiled(ours, images, args.repeats, console) if args.compile else {}
        onnx = time_onnx(ours, images, args.repeats, args.threads) if args.onnx else {}
        for label in models:
            if label == "base":
                continue
            ratio = gmacs["base"] / gmacs[method_of[label]]
            speed = {batch: eager["base"][batch] / eager[label][batch] for batch in batches}
            cells = row_cells(name, label, ratio, speed, batches)
            for times in [times for times, wanted in ((compiled, args.compile), (onnx, args.onnx)) if wanted]:
                up = times["base"] / times[label] if label in times else None
                cells += [f"{up:.2f}x", f"{up / ratio:.2f}"] if up else ["-", "-"]
            table.add_row(*cells)
        base_ms = ", ".join(f"b{batch} {eager['base'][batch]:.2f} ms/img" for batch in batches)
        console.print(f"{name} base: {base_ms}")
    console.print(table)


if __name__ == "__main__":
    main()
