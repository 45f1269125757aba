"""How a model runs when it is evaluated or timed: device, precision (autocast) and torch.compile.

`Runtime` is the one description every command carries (`--device`, `--dtype`, `--compile`,
`--compile-mode`). Precision is autocast: the weights stay float32, matrix products run in
bfloat16/float16 on CUDA and on the CPU alike (torch's CPU autocast takes both; float16 is slow
on CPUs without native fp16 arithmetic). The reducers compute their choices in float32 inside
(`vitprune.reducers`), so half precision changes only the rounding of the activations.
Compilation is `torch.compile` with static shapes (`dynamic=False`: one graph per batch size, the
token counts of EViT and ToMe are constants in it, and `reduce-overhead` can capture CUDA graphs).
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.models import check_image_fits, device_memory_bytes, image_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise VitpruneError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", param="dtype")
    return DTYPES[dtype]


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise VitpruneError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}",
                            param="compile_mode")
    return mode


@contextlib.contextmanager
def autocast(device: str | torch.device, dtype: str) -> Iterator[None]:
    """Autocast to `dtype` on `device`'s type; nothing for float32."""
    torch_dtype = check_dtype(dtype)
    if torch_dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=torch_dtype):
        yield


class Autocast(nn.Module):
    """`model` run under autocast, float32 logits out (the metrics and the export compare floats)."""

    def __init__(self, model: nn.Module, device: str, dtype: str) -> None:
        super().__init__()
        self.model, self.device, self.dtype = model, device, dtype

    def forward(self, images: Tensor) -> Tensor:
        with autocast(self.device, self.dtype):
            return self.model(images).float()


class Compiled(nn.Module):
    """A `torch.compile`d model; with CUDA graphs (reduce-overhead) each output is copied out of
    the graph's memory, which the next run overwrites."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, mode=mode, dynamic=False)
        self.copy_out = mode == "reduce-overhead"

    def forward(self, images: Tensor) -> Tensor:
        out = self.compiled(images)
        return out.clone() if self.copy_out else out


@dataclass(frozen=True)
class Runtime:
    """Where and how models are evaluated and timed."""

    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str = "default"

    def check(self) -> None:
        check_dtype(self.dtype)
        check_compile_mode(self.compile_mode)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`model` on the device in eval mode, under autocast, compiled when asked. The weights are
        shared with `model` (nothing is copied)."""
        model = model.to(self.device).eval()
        wrapped: nn.Module = Autocast(model, self.device, self.dtype) if self.dtype != "float32" else model
        return Compiled(wrapped, self.compile_mode) if self.compile else wrapped

    def describe(self) -> str:
        """'eager PyTorch, float32' / 'torch.compile (reduce-overhead), bfloat16 autocast'."""
        runner = f"torch.compile ({self.compile_mode})" if self.compile else "eager PyTorch"
        return f"{runner}, {self.dtype}" + ("" if self.dtype == "float32" else " autocast")

    def to_dict(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "compile": self.compile,
                "compile_mode": self.compile_mode if self.compile else None}


def first_call_seconds(model: nn.Module, images: Tensor) -> float:
    """Wall seconds of one call (for a compiled model at a new shape: the compilation)."""
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    start = time.perf_counter()
    model(images)
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return time.perf_counter() - start


def check_fits(model: nn.Module, *, batch: int, img_size: int, device: str | torch.device, batch_param: str,
               size_param: str | None = None) -> None:
    """Refuse a batch of `batch` images at `img_size` whose activations alone exceed all of `device`'s
    memory: `batch_param` (or, when one image cannot fit, `size_param`) is named with its largest
    value that could."""
    memory = device_memory_bytes(device)
    check_image_fits(model, img_size, memory, size_param or batch_param, f"the {torch.device(device).type.upper()}")
    one = image_bytes(model, img_size)
    if batch * one > memory:
        raise VitpruneError(f"{batch_param} {batch} cannot fit in memory: {batch} images at {img_size} px need "
                            f"about {batch * one / 2**30:.1f} GiB of activations, more than the "
                            f"{torch.device(device).type.upper()}'s {memory / 2**30:.1f} GiB; the largest that fits "
                            f"is about {max(memory // one, 1)}", param=batch_param)
