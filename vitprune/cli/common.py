"""What several commands share: reading the model argument and images, options, rendering."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from vitprune.errors import VitpruneError

console = Console(stderr=True)  # tables and progress on stderr keep stdout clean for --json

ModelArg = Annotated[str, typer.Argument(help="timm model name or alias (deit_small), or a vitprune artifact folder / .safetensors.")]
CheckpointOpt = Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="Local weights: .pth/.bin/.safetensors, a state_dict or one under 'model'/'state_dict'.")]
NoPretrainedOpt = Annotated[bool, typer.Option("--no-pretrained", help="Random weights (mechanics only).")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input resolution (timm resamples the position embedding).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", "-d", help="Images: ImageFolder (wnid or index folders), a folder with labels.csv, or plain images.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Use at most this many images (a fixed random subset).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Batch size for evaluation.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Image decoding workers.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's choice).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
OutOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the artifact folder here.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]
ProtectOpt = Annotated[float, typer.Option("--protect", help="tome: weight of the class token's attention against merging a token (0: plain ToMe; 0.2 is a good start).")]
HeadOnlyOpt = Annotated[bool, typer.Option("--head-only", help="The last block computes only the class token the head reads: exact with class-token pooling, about 7% fewer GMACs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise VitpruneError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise VitpruneError(f"unknown device '{device}'; use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitpruneError("--device cuda asked for, but torch sees no CUDA GPU")
    return device


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise VitpruneError(f"cannot read batch sizes '{text}': use e.g. 1,32") from None
    if not batches or any(b < 1 for b in batches):
        raise VitpruneError(f"batch sizes must be positive whole numbers, got '{text}'")
    return batches


def report_table(report: dict, title: str) -> Table:
    """The report as a rich table: base vs reduced."""
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("base", justify="right")
    table.add_column("reduced", justify="right")
    table.add_row("GMACs / image", f"{report['gmacs_base']:.3f}",
                  f"{report['gmacs']:.3f} ([green]-{report['gmacs_reduction']:.1%}[/])")
    if "top1" in report:
        table.add_row("top-1 %", f"{report['top1_base']:.2f}", f"{report['top1']:.2f} ({-report['top1_drop']:+.2f})")
        table.add_row("top-5 %", f"{report['top5_base']:.2f}", f"{report['top5']:.2f}")
    if "agreement" in report:
        table.add_row("agreement with base %", "100", f"{report['agreement']:.2f}")
        table.add_row("mean KL(base‖reduced)", "0", f"{report['kl']:.4f}")
    for batch, timing in report.get("latency_ms", {}).items():
        table.add_row(f"ms / image @ batch {batch}", f"{timing['base']:.2f}",
                      f"{timing['reduced']:.2f} ([bold]{timing['speedup']:.2f}x[/])")
    return table


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
