"""`vitprune export`: a reduced model to ONNX (reduction inside the graph), verified on ONNX Runtime."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    OUTPUT_PANEL,
    REDUCTION_RULES,
    RUN_PANEL,
    BenchBatchOpt,
    BenchRepeatsOpt,
    CheckpointOpt,
    DataOpt,
    FeaturesOpt,
    ForceOpt,
    HeadOnlyOpt,
    ImageFieldOpt,
    ImgSizeOpt,
    JsonOpt,
    KeepOpt,
    LabelFieldOpt,
    LayersOpt,
    LimitOpt,
    MethodOpt,
    ModelArg,
    NoFuseOpt,
    NoPretrainedOpt,
    PlanOpt,
    ProtectOpt,
    ROpt,
    SplitOpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    emit_json,
    parse_batches,
    progress_rule,
    report_table,
    set_threads,
)
from vitprune.cli.options import Alias, make_request

GRAPH_PANEL = "Graph"


@app.command()
def export(
    model: ModelArg,
    onnx: Annotated[Path, typer.Option("--onnx", help="Write the ONNX graph here (e.g. model.onnx).", rich_help_panel=OUTPUT_PANEL)],
    safetensors: Annotated[Path | None, typer.Option("--safetensors", help="Also write the one-file artifact (weights + plan) here.", rich_help_panel=OUTPUT_PANEL)] = None,
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
    batch: Annotated[str, typer.Option("--onnx-batch", help="The graph's batch dimension: 'dynamic' (any batch size) or a fixed batch size.", rich_help_panel=GRAPH_PANEL)] = "dynamic",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset, 17 to 20.", rich_help_panel=GRAPH_PANEL)] = 17,
    dtype: Annotated[str, typer.Option("--dtype", help="The graph's precision: float32 or float16 (float16 weights and compute, float32 input/output); the PyTorch reference stays float32.", rich_help_panel=GRAPH_PANEL)] = "float32",
    ats_padding: Annotated[str, typer.Option("--ats-padding", help="ats: pad each batch to its largest kept count ('batch', fastest) or to the cap ('cap', static shapes).", rich_help_panel=GRAPH_PANEL)] = "batch",
    old_batch: Annotated[str | None, typer.Option("--batch", hidden=True)] = None,
    fp16: Annotated[bool, typer.Option("--fp16", hidden=True)] = False,
    data: DataOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    limit: LimitOpt = None,
    workers: WorkersOpt = 2,
    bench: Annotated[bool, typer.Option("--bench", help="Time base and reduced ONNX graphs on ONNX Runtime, side by side.", rich_help_panel=RUN_PANEL)] = False,
    bench_batch: BenchBatchOpt = "1,32",
    bench_repeats: BenchRepeatsOpt = 10,
    provider: Annotated[str, typer.Option("--provider", help="ONNX Runtime provider: auto (CUDA when onnxruntime-gpu sees a GPU), cpu, cuda or tensorrt (vitprune[tensorrt]).", rich_help_panel=RUN_PANEL)] = "auto",
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a reduced ViT to ONNX with the reduction in the graph; verify it on ONNX Runtime."""
    # torch loads only when the command runs: --help stays fast
    from vitprune.commands.export import ExportRequest, run_export

    request = make_request(ExportRequest, locals(), aliases=(
        Alias("old_batch", "batch"), Alias("fp16", "dtype", lambda on: "float16" if on else "float32")), derive={
        **REDUCTION_RULES, "progress": progress_rule,
        "bench_batch": lambda values: parse_batches(values["bench_batch"])})
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
    console.print(f"verified on {parity['n_images']} {parity['images']} images with {parity['provider']}"
                  + (" (pass --data for real images)" if parity["images"] == "random" else ""))
    folder = onnx.parent
    written = [str(onnx)] + ([str(safetensors)] if safetensors else [])
    written += [str(folder / "report.json"), str(folder / "report.md")]
    console.print(f"wrote {', '.join(written)}")
