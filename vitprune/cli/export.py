"""`vitprune export`: a reduced model to ONNX (reduction inside the graph), verified on ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    CheckpointOpt,
    DataOpt,
    FeaturesOpt,
    ForceOpt,
    HeadOnlyOpt,
    ImgSizeOpt,
    JsonOpt,
    KeepOpt,
    LayersOpt,
    LimitOpt,
    MethodOpt,
    ModelArg,
    NoFuseOpt,
    NoPretrainedOpt,
    PlanOpt,
    ProtectOpt,
    ROpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    emit_json,
    parse_batches,
    parse_layers,
    report_table,
    set_threads,
)


@app.command()
def export(
    model: ModelArg,
    onnx: Annotated[Path, typer.Option("--onnx", help="Write the ONNX graph here (e.g. model.onnx).")],
    safetensors: Annotated[Path | None, typer.Option("--safetensors", help="Also write the one-file artifact (weights + plan) here.")] = None,
    method: MethodOpt = None,
    keep: KeepOpt = None,
    r: ROpt = None,
    protect: ProtectOpt = None,
    layers: LayersOpt = None,
    no_fuse: NoFuseOpt = False,
    head_only: HeadOnlyOpt = False,
    plan_file: PlanOpt = None,
    checkpoint: CheckpointOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    features: FeaturesOpt = False,
    batch: Annotated[str, typer.Option("--batch", help="'dynamic' (any batch size) or a fixed batch size.")] = "dynamic",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 17 to 20.")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights and compute (float32 input/output).")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="The graph's precision: float32 or float16 (the same as --fp16); the PyTorch reference stays float32.")] = "float32",
    ats_padding: Annotated[str, typer.Option("--ats-padding", help="ats: pad each batch to its largest kept count ('batch', fastest) or to the cap ('cap', static shapes).")] = "batch",
    data: DataOpt = None,
    limit: LimitOpt = None,
    workers: WorkersOpt = 2,
    bench: Annotated[bool, typer.Option("--bench", help="Time base and reduced ONNX graphs on ONNX Runtime, side by side.")] = False,
    bench_batch: Annotated[str, typer.Option("--bench-batch", help="Batch sizes to time.")] = "1,32",
    bench_repeats: Annotated[int, typer.Option("--bench-repeats", help="Timed runs per batch size (median reported).")] = 10,
    provider: Annotated[str, typer.Option("--provider", help="ONNX Runtime provider: auto (CUDA when onnxruntime-gpu sees a GPU), cpu, cuda or tensorrt (vitprune[tensorrt]).")] = "auto",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a reduced ViT to ONNX with the reduction in the graph; verify it on ONNX Runtime."""
    # torch loads only when the command runs: --help stays fast
    from vitprune.commands.export import ExportRequest, run_export

    request = ExportRequest(
        model=model, onnx=onnx, safetensors=safetensors, method=method, keep=keep, r=r, protect=protect,
        layers=parse_layers(layers), fuse=False if no_fuse else None, head_only=head_only, plan_file=plan_file,
        checkpoint=checkpoint, no_pretrained=no_pretrained, img_size=img_size, features=features, batch=batch, opset=opset,
        fp16=fp16, dtype=dtype, ats_padding=ats_padding, data=data, limit=limit, workers=workers, bench=bench,
        bench_batches=parse_batches(bench_batch), bench_repeats=bench_repeats, provider=provider,
        threads=threads, force=force, progress=not json_out,
    )
    set_threads(threads)
    report = run_export(request)
    if json_out:
        emit_json(report)
        return
    _render(report, onnx, safetensors)


def _render(report: dict, onnx: Path, safetensors: Path | None) -> None:
    """The figures table with the ONNX rows, the parity line and the files written."""
    section = report["onnx"]
    parity = section["parity"]
    table = report_table(report, f"{report['model']}: {report['plan']}")
    table.add_row("ONNX top-1 agreement with PyTorch %", "", f"{parity['agreement']:.2f}")
    table.add_row("ONNX max |logit diff|", "", f"{parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:g})")
    for size, timing in section.get("latency_ms", {}).items():
        table.add_row(f"ONNX Runtime ms / image @ batch {size}", f"{timing['base']:.2f}",
                      f"{timing['reduced']:.2f} ([bold]{timing['speedup']:.2f}x[/])")
    console.print(table)
    console.print(f"verified on {parity['n_images']} {parity['images']} images with {parity['provider']}")
    folder = onnx.parent
    written = [str(onnx)] + ([str(safetensors)] if safetensors else [])
    written += [str(folder / "report.json"), str(folder / "report.md")]
    console.print(f"wrote {', '.join(written)}")
