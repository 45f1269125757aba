"""ONNX Runtime latency: base and reduced graphs timed in turns by the one loop (`vitprune.bench`)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from torch import Tensor, nn

from vitprune.bench import Runner, fill_batch, interleaved_timing
from vitprune.errors import VitpruneError
from vitprune.onnx_runtime import (
    INPUT_NAME,
    OUTPUT_NAME,
    PROVIDERS,
    export_onnx,
    fixed_batch,
    onnx_session,
    parse_batch,
)


def bench_onnx(
    paths: dict[str, str | Path],
    images: Tensor | dict[str, Tensor],
    batch_sizes: tuple[int, ...] = (1, 32),
    *,
    warmup: int = 3,
    repeats: int = 10,
    provider: str = "auto",
    threads: int | None = None,
) -> dict:
    """Median ms/image of each ONNX file on ONNX Runtime at each batch size, the models taking
    turns within every repeat (as `vitprune.bench.measure_latency`). A fixed-batch graph is timed
    at its own batch size only. Returns {"ms_per_image": {name: {batch: ms}}, "provider",
    "threads", "warmup", "repeats"}."""
    if repeats < 1:
        raise VitpruneError(f"repeats must be >= 1, got {repeats}", param="repeats")
    if warmup < 0:
        raise VitpruneError(f"warmup must be >= 0, got {warmup}", param="warmup")
    sessions = {name: onnx_session(path, provider, threads) for name, path in paths.items()}
    inputs = images if isinstance(images, dict) else {name: images for name in paths}

    def runners_for(batch_size: int) -> dict[str, Runner]:
        runnable = {name: s for name, s in sessions.items() if fixed_batch(s) in (None, batch_size)}
        return {name: bound_runner(session, fill_batch(inputs[name], batch_size))
                for name, session in runnable.items()}

    timed = interleaved_timing(runners_for, batch_sizes, warmup=warmup, repeats=repeats)
    first = next(iter(sessions.values()))
    return {
        "ms_per_image": {name: timed.get(name, {}) for name in paths},
        "provider": first.get_providers()[0],
        "threads": threads if threads is not None else "onnxruntime default",
        "warmup": warmup,
        "repeats": repeats,
    }


def bound_runner(session, images: Tensor) -> Runner:
    """One timed run of `session` on `images`, the input and output bound on the provider's device
    (ONNX Runtime IO binding): on a GPU the images are copied there once, not in every timed run."""
    import onnxruntime as ort  # heavy, and only ONNX work needs it: loaded on first use

    device = "cpu" if session.get_providers()[0] == PROVIDERS["cpu"] else "cuda"
    binding = session.io_binding()
    # on the CPU the value wraps the numpy array's memory: the runner keeps both alive
    value = ort.OrtValue.ortvalue_from_numpy(images.float().contiguous().numpy(), device, 0)
    binding.bind_ortvalue_input(INPUT_NAME, value)
    binding.bind_output(OUTPUT_NAME, device)
    return lambda value=value: session.run_with_iobinding(binding)


def latency_section(timing: dict, batches: tuple[int, ...], real_images: bool) -> dict:
    """The "latency_ms" and "latency_setup" entries of the report's "onnx" section."""
    ms = timing["ms_per_image"]
    latency = {str(b): {"base": round(ms["base"][b], 3), "reduced": round(ms["reduced"][b], 3),
                        "speedup": round(ms["base"][b] / ms["reduced"][b], 3)} for b in batches}
    setup = {"runtime": "ONNX Runtime", "provider": timing["provider"], "threads": timing["threads"],
             "repeats": timing["repeats"], "warmup": timing["warmup"],
             "inputs": "real images" if real_images else "random images"}
    return {"latency_ms": latency, "latency_setup": setup}


def bench_against_base(base: nn.Module, reduced_path: Path, inputs: dict[str, Tensor], *, batch: str | int,
                       opset: int, fp16: bool, bench_batches: tuple[int, ...], repeats: int, provider: str,
                       threads: int | None, real_images: bool) -> dict:
    """Export the unreduced `base` the same way (in a scratch folder) and time it against the
    reduced graph; a fixed-batch export is timed at its batch only. The latency entries."""
    fixed = parse_batch(batch)
    batches = (fixed,) if fixed else bench_batches
    with tempfile.TemporaryDirectory(prefix="vitprune-export-") as scratch:
        base_path = Path(scratch) / "base.onnx"
        export_onnx(base, base_path, batch=batch, opset=opset, fp16=fp16)
        timing = bench_onnx({"base": base_path, "reduced": reduced_path}, inputs, batches,
                            repeats=repeats, provider=provider, threads=threads)
    return latency_section(timing, batches, real_images)
