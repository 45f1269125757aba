"""Latency: median milliseconds per image, models measured side by side in one run.

`interleaved_timing` is the one timing loop: eager PyTorch models (`measure_latency`) and ONNX
Runtime sessions (`vitprune.export.bench_onnx`) are both timed by it, with their own runners.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vitprune.runtime import Compiled, first_call_seconds

Runner = Callable[[], object]  # one timed run of one model on its prepared batch


def fill_batch(images: Tensor, batch_size: int) -> Tensor:
    """A batch of `batch_size` built from `images` (repeated if there are fewer)."""
    repeats = -(-batch_size // images.shape[0])
    return images.repeat(repeats, 1, 1, 1)[:batch_size].contiguous()


def _no_sync() -> None:
    return None


def interleaved_timing(
    runners_for: Callable[[int], dict[str, Runner]],
    batch_sizes: tuple[int, ...],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = _no_sync,
) -> dict[str, dict[int, float]]:
    """Median ms/image of each runner at each batch size, after `warmup` untimed runs each.

    `runners_for(batch_size)` gives the runners to time at that size (a model may sit one out).
    The runners take turns within every repeat, so drift in the machine's speed (thermal, other
    load) hits all of them alike and the ratios stay fair. `sync` waits for queued device work
    (CUDA) before a clock is read. Returns {name: {batch: ms}} for the runners that ran.
    """
    results: dict[str, dict[int, float]] = {}
    for batch_size in batch_sizes:
        runners = runners_for(batch_size)
        for run in runners.values():
            for _ in range(warmup):
                run()
        timings: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(repeats):
            for name, run in runners.items():
                sync()
                start = time.perf_counter()
                run()
                sync()
                timings[name].append(time.perf_counter() - start)
        for name, values in timings.items():
            results.setdefault(name, {})[batch_size] = statistics.median(values) * 1000 / batch_size
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(
    models: dict[str, nn.Module],
    images: Tensor | dict[str, Tensor],
    batch_sizes: tuple[int, ...] = (1, 32),
    *,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
) -> dict:
    """Median ms/image of each model at each batch size, after `warmup` untimed runs.

    The models take turns within every repeat (`interleaved_timing`). Use real images where the
    token count depends on the image (ATS); a dict gives each model its own images (other input
    sizes). A compiled model's first call at each batch size (its compilation) is timed apart,
    before the warm-up. Returns {"ms_per_image": {name: {batch: ms}}, "compile_s": {name: seconds,
    summed over the batch sizes} (compiled models only), "threads", "device", "repeats", "warmup"}.
    """
    device = torch.device(device)
    for model in models.values():
        model.eval().to(device)
    inputs = images if isinstance(images, dict) else {name: images for name in models}
    compile_s = {name: 0.0 for name, model in models.items() if isinstance(model, Compiled)}

    def runners_for(batch_size: int) -> dict[str, Runner]:
        batches = {name: fill_batch(inputs[name], batch_size).to(device) for name in models}
        for name in compile_s:
            compile_s[name] += first_call_seconds(models[name], batches[name])
        return {name: (lambda model=model, batch=batches[name]: model(batch)) for name, model in models.items()}

    timed = interleaved_timing(runners_for, batch_sizes, warmup=warmup, repeats=repeats,
                               sync=lambda: _sync(device))
    return {
        "ms_per_image": {name: timed.get(name, {}) for name in models},
        "compile_s": {name: round(seconds, 2) for name, seconds in compile_s.items()},
        "threads": torch.get_num_threads(),
        "device": device_name(device),
        "warmup": warmup,
        "repeats": repeats,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
