"""`vitprune cascade`: a DVT cascade of stages on one model, thresholds calibrated to a GMACs budget."""
from __future__ import annotations

from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    BatchSizeOpt,
    CheckpointOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    ImageFieldOpt,
    JsonOpt,
    LabelFieldOpt,
    LimitOpt,
    ModelArg,
    NoPretrainedOpt,
    OutOpt,
    SplitOpt,
    ThreadsOpt,
    WorkersOpt,
    console,
    emit_json,
    set_threads,
)


@app.command()
def cascade(
    model: ModelArg,
    stages: Annotated[str, typer.Option("--stages", "-s", help="Stages, cheapest first, separated by ';' (',' when no stage has a comma): each a plan as --method writes it, its SIZEpx term (or a leading SIZE:) the input size; e.g. '112,160,224', 'evit:0.5,evit:0.7,none' or 'tome:r=8@0-5+160px;224px'.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Images to calibrate on (and hold out): ImageFolder, a folder with labels.csv, plain images, or a dataset timm reads (hfds/..., wds/..., .tar). Held in memory, preprocessed: 0.6 MB per image at 224 px, for each input size searched; bound it with --limit.")],
    target_gmacs: Annotated[float | None, typer.Option("--target-gmacs", help="Budget: mean GMACs per image.")] = None,
    target_ratio: Annotated[float | None, typer.Option("--target-ratio", help="Budget: a fraction of the base model's GMACs, e.g. 0.6.")] = None,
    criterion: Annotated[str, typer.Option("--criterion", help="Confidence: maxprob (largest softmax probability) or entropy.")] = "maxprob",
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of the images held out from calibration for the report.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the calibration / held-out split.")] = 0,
    frontier: Annotated[bool, typer.Option("--frontier/--no-frontier", help="Also measure fixed EViT/ToMe single models for comparison.")] = True,
    onnx: Annotated[bool, typer.Option("--onnx", help="Also export onnx/ in the output folder: one graph per stage + thresholds (run with vitprune.cascade.OnnxCascade).")] = False,
    checkpoint: CheckpointOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    limit: LimitOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 2,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    output: OutOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Dynamic inference (DVT): easy images leave at a cheap stage, hard ones go on; calibrated to a budget."""
    # torch loads only when the command runs: --help stays fast
    from vitprune.cascade import console_table
    from vitprune.commands.cascade import CascadeRequest, run_cascade

    request = CascadeRequest(
        model=model, stages=stages, data=data, target_gmacs=target_gmacs, target_ratio=target_ratio,
        criterion=criterion, checkpoint=checkpoint, no_pretrained=no_pretrained, holdout=holdout, seed=seed,
        limit=limit, split=split, label_field=label_field, image_field=image_field, batch_size=batch_size,
        workers=workers, frontier=frontier, onnx=onnx, device=device, dtype=dtype,
        output=output, force=force, progress=not json_out,
    )
    set_threads(threads)
    result = run_cascade(request)
    if json_out:
        emit_json(result.report)
        return
    console.print(console_table(result.report))
    comparison = result.report["comparison"]
    if comparison.get("best_single"):
        console.print(f"best single model at no more GMACs: {comparison['best_single']} "
                      f"({comparison['best_single_gmacs']:.3f} GMACs, {comparison['metric']} "
                      f"{comparison['best_single_value']:.2f}); cascade {comparison['cascade']:.2f} "
                      f"({comparison['margin']:+.2f})")
    if output is not None:
        console.print(f"wrote [bold]{output}[/] (cascade.json, model.safetensors, report.json, report.md, curve.png"
                      + (", onnx/)" if onnx else ")"))

