"""`vitprune apply`: reduce a model, measure it against the unreduced one, write the artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vitprune.cli import app
from vitprune.cli.common import (
    BatchSizeOpt, CheckpointOpt, DataOpt, DeviceOpt, ForceOpt, HeadOnlyOpt, ProtectOpt, ImgSizeOpt, JsonOpt, LimitOpt, ModelArg,
    NoPretrainedOpt, OutOpt, ThreadsOpt, WorkersOpt, check_device, console, emit_json, parse_batches,
    report_table, set_threads,
)


@app.command()
def apply(
    model: ModelArg,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="evit, ats or tome.")] = None,
    keep: Annotated[Optional[float], typer.Option("--keep", "-k", help="evit: keep rate in (0, 1]; ats: cap K as a ratio of the input tokens or a count.")] = None,
    r: Annotated[Optional[int], typer.Option("--r", help="tome: tokens merged per layer.")] = None,
    protect: ProtectOpt = 0.0,
    layers: Annotated[Optional[str], typer.Option("--layers", "-l", help="Blocks to reduce in, e.g. 3,6,9 or 3-11 (default: per method and depth).")] = None,
    no_fuse: Annotated[bool, typer.Option("--no-fuse", help="evit: drop inattentive tokens instead of fusing them.")] = False,
    head_only: HeadOnlyOpt = False,
    plan_file: Annotated[Optional[Path], typer.Option("--plan", help="A plan (vitprune.json from apply/calibrate) instead of --method.")] = None,
    checkpoint: CheckpointOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    data: DataOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    bench: Annotated[bool, typer.Option("--bench", help="Measure latency, base and reduced side by side.")] = False,
    bench_batch: Annotated[str, typer.Option("--bench-batch", help="Batch sizes to time.")] = "1,32",
    bench_repeats: Annotated[int, typer.Option("--bench-repeats", help="Timed runs per batch size (median reported).")] = 10,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    output: OutOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Insert token reduction into a ViT; report GMACs, accuracy and latency against the base."""
    from vitprune.pipeline import ApplyRequest, run_apply
    from vitprune.plan import parse_layers

    request = ApplyRequest(
        model=model, method=method, keep=keep, r=r, protect=protect, layers=parse_layers(layers) if layers else None,
        fuse=not no_fuse, head_only=head_only, plan_file=plan_file, checkpoint=checkpoint, no_pretrained=no_pretrained,
        img_size=img_size, data=data, limit=limit, batch_size=batch_size, workers=workers,
        bench_batches=parse_batches(bench_batch) if bench else (), bench_repeats=bench_repeats,
        device=check_device(device), output=output, force=force, progress=not json_out,
    )
    set_threads(threads)
    result = run_apply(request)
    if json_out:
        emit_json(result.report)
        return
    console.print(report_table(result.report, f"{result.report['model']}: {result.report['plan']}"))
    if output is not None:
        console.print(f"wrote [bold]{output}[/] (model.safetensors, vitprune.json, report.json, report.md)")
