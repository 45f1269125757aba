"""`vitprune apply`: reduce a model, measure it against the unreduced one, write the artifact."""
from __future__ import annotations

from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    BatchSizeOpt,
    CheckpointOpt,
    CompileModeOpt,
    CompileOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
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
    OutOpt,
    PlanOpt,
    ProtectOpt,
    ROpt,
    SplitOpt,
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
def apply(
    model: ModelArg,
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
    data: DataOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    limit: LimitOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    bench: Annotated[bool, typer.Option("--bench", help="Measure latency, base and reduced side by side.")] = False,
    bench_batch: Annotated[str, typer.Option("--bench-batch", help="Batch sizes to time.")] = "1,32",
    bench_repeats: Annotated[int, typer.Option("--bench-repeats", help="Timed runs per batch size (median reported).")] = 10,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "float32",
    compile: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    output: OutOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Insert token reduction into a ViT; report GMACs, accuracy and latency against the base."""
    from vitprune.commands.apply import (  # torch loads only when the command runs: --help stays fast
        ApplyRequest,
        run_apply,
    )

    request = ApplyRequest(
        model=model, method=method, keep=keep, r=r, protect=protect, layers=parse_layers(layers),
        fuse=False if no_fuse else None, head_only=head_only, plan_file=plan_file, checkpoint=checkpoint,
        no_pretrained=no_pretrained, img_size=img_size, features=features, data=data, split=split,
        label_field=label_field, image_field=image_field, limit=limit, batch_size=batch_size,
        workers=workers, bench_batches=parse_batches(bench_batch) if bench else (), bench_repeats=bench_repeats,
        device=device, dtype=dtype, compile=compile, compile_mode=compile_mode, output=output, force=force,
        progress=not json_out,
    )
    set_threads(threads)
    result = run_apply(request)
    if not result.is_main:
        return  # torchrun: rank 0 prints
    if json_out:
        emit_json(result.report)
        return
    console.print(report_table(result.report, f"{result.report['model']}: {result.report['plan']}"))
    if output is not None:
        files = "model.safetensors, vitprune.json, report.json, report.md" + (
            ", tokens.png" if (output / "tokens.png").exists() else "")
        console.print(f"wrote [bold]{output}[/] ({files})")
