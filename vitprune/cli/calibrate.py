"""`vitprune calibrate`: search the best reduction plan for a budget on the user's own images."""
from __future__ import annotations

from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    CheckpointOpt,
    DtypeOpt,
    FeaturesOpt,
    ForceOpt,
    ImageFieldOpt,
    ImgSizeOpt,
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
    parse_numbers,
    report_table,
    set_threads,
)
from vitprune.errors import VitpruneError


@app.command()
def calibrate(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", help="Images to calibrate on (part is held out): ImageFolder, a folder with labels.csv, plain images, or a dataset timm reads (hfds/..., wds/..., .tar). Held in memory, preprocessed: 0.6 MB per image at 224 px, for each input size searched; bound it with --limit.")],
    target_gmacs: Annotated[float | None, typer.Option("--target-gmacs", help="Budget: at most this many GMACs per image.")] = None,
    target_ratio: Annotated[float | None, typer.Option("--target-ratio", help="Budget: at most this fraction of the base GMACs, in (0, 1].")] = None,
    target_latency_ms: Annotated[float | None, typer.Option("--target-latency-ms", help="Budget: at most this many ms per image at --batch, measured here.")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", help="Budget: the cheapest plan within this many top-1 points (agreement points when unlabelled).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Batch size the latency is measured at.")] = 32,
    objective: Annotated[str, typer.Option("--objective", help="Search objective on the calibration images: kl, agreement or top1 (a classifier); cosine or retrieval (an embedding model); auto: kl or cosine.")] = "auto",
    no_head_only: Annotated[bool, typer.Option("--no-head-only", help="Keep every token in the last block (by default plans compute only the class token there, exact with class-token pooling).")] = False,
    holdout: Annotated[float, typer.Option("--holdout", help="Fraction of the images held out to report the figures on.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split and of the search.")] = 0,
    protect: Annotated[float | None, typer.Option("--protect", help="Fix ToMe's protect weight (the class token's attention against merging a token; 0: plain ToMe). Default: the best of 0, 0.1, 0.2, 0.3 on the validation images (calibration images outside the search subset).")] = None,
    swap_split: Annotated[bool, typer.Option("--swap-split", help="Calibrate on the part that is otherwise held out, and hold out the rest: with --holdout 0.5, the second fold of a 2-fold cross-check.")] = False,
    img_sizes: Annotated[str | None, typer.Option("--img-sizes", help="Input sizes to search, e.g. 224,208,192 (default: the model's size and up to 3 smaller, down to 3/4).")] = None,
    search_images: Annotated[int, typer.Option("--search-images", help="Calibration images the inner search scores on; the finalists are re-ranked on the others (all, if fewer than 100 are left).")] = 128,
    search: Annotated[str, typer.Option("--search", help="How plans are searched: evolutionary (sensitivity-weighted shapes, refined by mutation) or gradient (per-block counts learned on the frozen model).")] = "evolutionary",
    refine_steps: Annotated[int, typer.Option("--refine-steps", help="Evolutionary refinement steps at the budget.")] = 16,
    gradient_steps: Annotated[int, typer.Option("--gradient-steps", help="Optimiser steps of the gradient search.")] = 60,
    bench_repeats: Annotated[int, typer.Option("--bench-repeats", help="Timed runs per model (median reported).")] = 5,
    finetune: Annotated[bool, typer.Option("--finetune", help="Then fine-tune the chosen plan by distillation from the unreduced model on the calibration images (finetune's recipe), and report it on the held-out images against that model: one artifact.")] = False,
    epochs: Annotated[int, typer.Option("--epochs", help="--finetune: training epochs.")] = 8,
    lr: Annotated[float, typer.Option("--lr", help="--finetune: peak learning rate (AdamW, cosine schedule).")] = 5e-4,
    trainable: Annotated[str, typer.Option("--trainable", help="--finetune: parameters to train, comma-separated name patterns ('*' for all).")] = "*norm*,*bias",
    resume: Annotated[bool, typer.Option("--resume", help="--finetune: continue the interrupted run in OUTPUT.partial/ (the search is not run again).")] = False,
    checkpoint: CheckpointOpt = None,
    no_pretrained: NoPretrainedOpt = False,
    img_size: ImgSizeOpt = None,
    features: FeaturesOpt = False,
    limit: LimitOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    workers: WorkersOpt = 2,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    output: OutOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Find the reduction plan that fits a budget best on your images; report its frontier on held-out images."""
    # torch loads only when the command runs: --help stays fast
    from vitprune.commands.calibrate import Budget, CalibrateRequest, FinetuneRecipe, before_after_table, run_calibrate

    budget = Budget.from_targets(target_gmacs=target_gmacs, target_ratio=target_ratio,
                                 target_latency_ms=target_latency_ms, max_drop=max_drop, batch=batch)
    request = CalibrateRequest(
        model=model, data=data, budget=budget, checkpoint=checkpoint, no_pretrained=no_pretrained, img_size=img_size, features=features,
        img_sizes=_parse_sizes(img_sizes), limit=limit, split=split, label_field=label_field,
        image_field=image_field, holdout=holdout, seed=seed, swap_split=swap_split,
        objective=objective, head_only=not no_head_only, protect=protect, search_images=search_images,
        search=search, refine_steps=refine_steps, gradient_steps=gradient_steps, bench_repeats=bench_repeats,
        workers=workers, dtype=dtype, output=output, force=force,
        progress=not json_out, resume=resume,
        finetune=FinetuneRecipe(epochs=epochs, lr=lr, trainable=_parse_patterns(trainable)) if finetune else None,
    )
    if not finetune and (resume or (epochs, lr, trainable) != (8, 5e-4, "*norm*,*bias")):
        raise VitpruneError("--epochs, --lr, --trainable and --resume go with --finetune", param="finetune")
    set_threads(threads)
    result = run_calibrate(request)
    if json_out:
        emit_json(result.report)
        return
    cal = result.report["calibration"]
    after = " after fine-tuning" if finetune else ""
    console.print(report_table(result.report, f"{result.report['model']}: {result.report['plan']} "
                                              f"(held-out {cal['images']['holdout']} images{after})"))
    console.print(f"objective: {cal['objective_text']}; search took {cal['search_seconds']:.0f} s")
    if finetune:
        console.print(before_after_table(result.report["finetune"]).rich())
        console.print(f"fine-tuning took {result.report['finetune']['train_seconds']:.0f} s; compared with the "
                      "unreduced model it started from (the teacher)")
    if output is not None:
        tuned = ", metrics.csv, training.png, teacher.safetensors" if finetune else ""
        console.print(f"wrote [bold]{output}[/] (model.safetensors, vitprune.json, report.json, report.md, pareto.png{tuned})")


def _parse_patterns(text: str) -> tuple[str, ...]:
    """'*norm*,*bias' -> ('*norm*', '*bias')."""
    return tuple(pattern.strip() for pattern in text.split(",") if pattern.strip())


def _parse_sizes(text: str | None) -> list[int] | None:
    """'224,208,192' -> [224, 208, 192]; None when not given."""
    if text is None:
        return None
    sizes = list(parse_numbers(text, int, "img_sizes", "224,208,192"))
    if not sizes:
        raise VitpruneError("img_sizes is empty: give e.g. 224,208,192", param="img_sizes")
    return sizes
