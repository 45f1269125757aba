"""Runtimes side by side on one machine: float32 eager, bfloat16 eager, float32 compiled, for the
base model, EViT 0.7 and ToMe r=13, all timed in ONE interleaved run (`measure_latency`).

    python benchmarks/runtimes.py                                  # vit_tiny, batch 1 and 32
    python benchmarks/runtimes.py --model deit_small_patch16_224 --repeats 20

Random weights and images. Every figure is a speed-up over the float32 eager base at the same
batch size; "vs same runtime" is the reduced model over the base of its own runtime (compiled vs
compiled). Compilation (torch.compile, default mode, static shapes) happens in the first call at
each batch size and is printed apart; inductor's on-disk cache makes a second run compile faster.
"""
from __future__ import annotations

import argparse
import copy
import platform

import timm
import torch

import vitprune
from vitprune.bench import measure_latency
from vitprune.report import count_gmacs
from vitprune.runtime import Runtime
from vitprune.tables import ReportTable

PLANS = {"base": None, "evit 0.7": {"method": "evit", "keep": 0.7}, "tome r=13": {"method": "tome", "r": 13}}
RUNTIMES = {"float32 eager": Runtime(), "bfloat16 eager": Runtime(dtype="bfloat16"),
            "float32 compiled": Runtime(compile=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    plain = {label: base if settings is None else vitprune.apply(copy.deepcopy(base), **settings)
             for label, settings in PLANS.items()}
    gmacs = {label: count_gmacs(model, images) for label, model in plain.items()}
    runners = {(run, label): runtime.prepare(copy.deepcopy(model))
               for run, runtime in RUNTIMES.items() for label, model in plain.items()}
    timing = measure_latency({f"{run} / {label}": model for (run, label), model in runners.items()}, images,
                             batches, warmup=3, repeats=args.repeats)
    ms = timing["ms_per_image"]
    table = ReportTable(["batch", "runtime", "plan", "ms / image", "speed-up vs float32 eager base",
                         "vs same runtime's base", "GMACs ratio"])
    for batch in batches:
        reference = ms["float32 eager / base"][batch]
        for run, label in runners:
            own = ms[f"{run} / {label}"][batch]
            table.add(batch, run, label, f"{own:.2f}", f"{reference / own:.2f}x",
                      f"{ms[f'{run} / base'][batch] / own:.2f}x", f"{gmacs['base'] / gmacs[label]:.2f}x")
    print(f"\n{args.model}, random weights, {platform.machine()} CPU, {timing['device']}, torch {torch.__version__}, "
          f"median of {args.repeats} runs after 3 warm-up runs, all nine interleaved in one run\n")
    print(table.markdown())
    print("\ncompilation (first call at each batch size, not in the timings): "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timing["compile_s"].items()))


if __name__ == "__main__":
    main()
