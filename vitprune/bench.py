"""Latency: median milliseconds per image, models measured side by side in one run."""
from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn


def fill_batch(images: Tensor, batch_size: int) -> Tensor:
    """A batch of `batch_size` built from `images` (repeated if there are fewer)."""
    repeats = -(-batch_size // images.shape[0])
    return images.repeat(repeats, 1, 1, 1)[:batch_size].contiguous()


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

    The models take turns within every repeat, so drift in the machine's speed (thermal, other
    load) hits all of them alike and the ratios stay fair. Use real images where the token count
    depends on the image (ATS); a dict gives each model its own images (other input sizes). Returns {"ms_per_image": {name: {batch: ms}}, "threads", "device",
    "repeats", "warmup"}.
    """
    device = torch.device(device)
    results: dict[str, dict[int, float]] = {name: {} for name in models}
    for model in models.values():
        model.eval().to(device)
    inputs = images if isinstance(images, dict) else {name: images for name in models}
    for batch_size in batch_sizes:
        batches = {name: fill_batch(inputs[name], batch_size).to(device) for name in models}
        for name, model in models.items():
            for _ in range(warmup):
                model(batches[name])
        timings: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                _sync(device)
                start = time.perf_counter()
                model(batches[name])
                _sync(device)
                timings[name].append(time.perf_counter() - start)
        for name, values in timings.items():
            results[name][batch_size] = statistics.median(values) * 1000 / batch_size
    return {
        "ms_per_image": results,
        "threads": torch.get_num_threads(),
        "device": device_name(device),
        "warmup": warmup,
        "repeats": repeats,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
