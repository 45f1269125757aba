"""`vitprune apply`: reduce a model, measure it against the unreduced one, write the artifact."""
from __future__ import annotations

from vitprune.cli.app import app
from vitprune.cli.common import (
    REDUCTION_RULES,
    BatchSizeOpt,
    BenchBatchOpt,
    BenchOpt,
    BenchRepeatsOpt,
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
    progress_rule,
    report_table,
    set_threads,
)
from vitprune.cli.options import make_request


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
    bench: BenchOpt = False,
    bench_batch: BenchBatchOpt = "1,32",
    bench_repeats: BenchRepeatsOpt = 10,
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

    request = make_request(ApplyRequest, locals(), derive={
        **REDUCTION_RULES, "progress": progress_rule,
        "bench_batch": lambda values: parse_batches(values["bench_batch"]) if values["bench"] else ()})
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
