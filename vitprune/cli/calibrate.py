"""`vitprune calibrate`: search the best reduction plan for a budget on the user's own images."""
from __future__ import annotations

from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    DATA_PANEL,
    RUN_PANEL,
    BenchRepeatsOpt,
    CheckpointOpt,
    ConfigOpt,
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
    progress_rule,
    report_table,
    set_threads,
)
from vitprune.cli.options import Alias, make_request
from vitprune.errors import VitpruneError

BUDGET_PANEL, SEARCH_PANEL, FINETUNE_PANEL = "Budget", "Search", "Fine-tuning"
BUDGET_OPTIONS = ("target_gmacs", "target_ratio", "target_latency_ms", "max_drop", "batch")


@app.command()
def calibrate(
    model: ModelArg,
    data: Annotated[str | None, typer.Option("--data", "-d", rich_help_panel=DATA_PANEL, help="Images to calibrate on (part is held out): ImageFolder, a folder with labels.csv, plain images, or a dataset timm reads (hfds/..., wds/..., .tar). Held in memory, preprocessed: 0.6 MB per image at 224 px, for each input size searched; bound it with --limit.")] = None,
    target_gmacs: Annotated[float | None, typer.Option("--target-gmacs", rich_help_panel=BUDGET_PANEL, help="Budget: at most this many GMACs per image.")] = None,
    target_ratio: Annotated[float | None, typer.Option("--target-ratio", rich_help_panel=BUDGET_PANEL, help="Budget: at most this fraction of the base GMACs, in (0, 1].")] = None,
    target_latency_ms: Annotated[float | None, typer.Option("--target-latency-ms", rich_help_panel=BUDGET_PANEL, help="Budget: at most this many ms per image at --bench-batch, measured here.")] = None,
    max_drop: Annotated[float | None, typer.Option("--max-drop", rich_help_panel=BUDGET_PANEL, help="Budget: the cheapest plan within this many top-1 points (agreement points when unlabelled).")] = None,
    batch: Annotated[int, typer.Option("--bench-batch", help="Batch size the latency is measured at.", rich_help_panel=RUN_PANEL)] = 32,
    objective: Annotated[str, typer.Option("--objective", rich_help_panel=SEARCH_PANEL, help="Search objective on the calibration images: kl, agreement or top1 (a classifier); cosine or retrieval (an embedding model); auto: kl or cosine.")] = "auto",
    head_only: Annotated[bool, typer.Option("--head-only/--no-head-only", rich_help_panel=SEARCH_PANEL, help="Plans compute only the class token in the last block (exact with class-token pooling); --no-head-only keeps every token there.")] = True,
    holdout: Annotated[float, typer.Option("--holdout", rich_help_panel=SEARCH_PANEL, help="Fraction of the images held out to report the figures on.")] = 0.5,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=SEARCH_PANEL, help="Seed of the split and of the search.")] = 0,
    protect: Annotated[float | None, typer.Option("--protect", rich_help_panel=SEARCH_PANEL, help="Fix ToMe's protect weight (the class token's attention against merging a token; 0: plain ToMe). Default: the best of 0, 0.1, 0.2, 0.3 on the validation images (calibration images outside the search subset).")] = None,
    swap_split: Annotated[bool, typer.Option("--swap-split", rich_help_panel=SEARCH_PANEL, help="Calibrate on the part that is otherwise held out, and hold out the rest: with --holdout 0.5, the second fold of a 2-fold cross-check.")] = False,
    img_sizes: Annotated[str | None, typer.Option("--img-sizes", rich_help_panel=SEARCH_PANEL, help="Input sizes to search, e.g. 224,208,192 (default: the model's size and up to 3 smaller, down to 3/4).")] = None,
    search_images: Annotated[int, typer.Option("--search-images", rich_help_panel=SEARCH_PANEL, help="Calibration images the inner search scores on; the finalists are re-ranked on the others (all, if fewer than 100 are left).")] = 128,
    search: Annotated[str, typer.Option("--search", rich_help_panel=SEARCH_PANEL, help="How plans are searched: evolutionary (sensitivity-weighted shapes, refined by mutation) or gradient (per-block counts learned on the frozen model).")] = "evolutionary",
    refine_steps: Annotated[int, typer.Option("--refine-steps", rich_help_panel=SEARCH_PANEL, help="Evolutionary refinement steps at the budget.")] = 16,
    gradient_steps: Annotated[int, typer.Option("--gradient-steps", rich_help_panel=SEARCH_PANEL, help="Optimiser steps of the gradient search.")] = 60,
    bench_repeats: BenchRepeatsOpt = 5,
    finetune: Annotated[bool, typer.Option("--finetune", rich_help_panel=FINETUNE_PANEL, help="Then fine-tune the chosen plan by distillation from the unreduced model on the calibration images (finetune's recipe), and report it on the held-out images against that model: one artifact.")] = False,
    epochs: Annotated[int, typer.Option("--epochs", rich_help_panel=FINETUNE_PANEL, help="--finetune: training epochs.")] = 8,
    lr: Annotated[float, typer.Option("--lr", rich_help_panel=FINETUNE_PANEL, help="--finetune: peak learning rate (AdamW, cosine schedule).")] = 5e-4,
    trainable: Annotated[str, typer.Option("--trainable", rich_help_panel=FINETUNE_PANEL, help="--finetune: parameters to train, comma-separated name patterns ('*' for all).")] = "*norm*,*bias",
    device: Annotated[str, typer.Option("--device", rich_help_panel=FINETUNE_PANEL, help="--finetune: where the fine-tuning stage runs, cpu or cuda (the search runs on the CPU).")] = "cpu",
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=FINETUNE_PANEL, help="--finetune: continue the interrupted run in OUTPUT.partial/ (the search is not run again).")] = False,
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
    config: ConfigOpt = None,
    old_batch: Annotated[int | None, typer.Option("--batch", hidden=True)] = None,
) -> None:
    """Find the reduction plan that fits a budget best on your images; report its frontier on held-out images."""
    # torch loads only when the command runs: --help stays fast
    from vitprune.commands.calibrate import Budget, CalibrateRequest, FinetuneRecipe, before_after_table, run_calibrate

    request = make_request(CalibrateRequest, locals(), aliases=(Alias("old_batch", "batch"),), required=("data",), derive={
        "progress": progress_rule, "img_sizes": lambda values: _parse_sizes(values["img_sizes"]),
        "budget": lambda values: Budget.from_targets(**{name: values[name] for name in BUDGET_OPTIONS}),
        "finetune": lambda values: _finetune_stage(values, FinetuneRecipe)})
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


def _finetune_stage(values: dict, recipe_type: type):
    """The recipe of --finetune from its options (command line or --config file); without --finetune,
    those options left at the recipe's defaults and no --resume."""
    recipe = recipe_type(epochs=values["epochs"], lr=values["lr"], trainable=_parse_patterns(values["trainable"]))
    if values["finetune"]:
        return recipe
    if values["resume"] or recipe != recipe_type():
        raise VitpruneError("--epochs, --lr, --trainable and --resume go with --finetune", param="finetune")
    return None


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
