"""`vitprune finetune`: recover accuracy by distillation from the unreduced model (and SuperViT)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    DATA_PANEL,
    OUTPUT_PANEL,
    REDUCTION_RULES,
    RUN_PANEL,
    CheckpointOpt,
    ConfigOpt,
    DeviceOpt,
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
    parse_numbers,
    progress_rule,
    report_table,
    set_threads,
)
from vitprune.cli.options import Alias, make_request

AMP_SPELLINGS = {"none": "float32", "bf16": "bfloat16", "fp16": "float16"}  # the old --amp values
SUPERVIT_PANEL, SCHEDULE_PANEL, DISTILL_PANEL, AUGMENT_PANEL = "SuperViT", "Schedule", "Distillation", "Augmentation"
ARTIFACT_FILES = "model.safetensors, vitprune.json, report.json, report.md, metrics.csv, training.png"


@app.command()
def finetune(
    model: ModelArg,
    data: Annotated[str | None, typer.Option("--data", "-d", rich_help_panel=DATA_PANEL, help="Training images: ImageFolder, a folder with labels.csv, plain (unlabelled) images, or a dataset timm reads (hfds/... and .tar read per step; wds/... held in memory: bound it with --limit).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", rich_help_panel=OUTPUT_PANEL, help="Write the fine-tuned artifact folder here (checkpoints go to OUTPUT.partial/ until the end).")] = None,
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
    supervit: Annotated[bool, typer.Option("--supervit", rich_help_panel=SUPERVIT_PANEL, help="Train one model for every --sizes x --keeps configuration (SuperViT).")] = False,
    sizes: Annotated[str | None, typer.Option("--img-sizes", rich_help_panel=SUPERVIT_PANEL, help="SuperViT input sizes, e.g. 160,192,224 (the largest = the model's size).")] = None,
    keeps: Annotated[str | None, typer.Option("--keeps", rich_help_panel=SUPERVIT_PANEL, help="SuperViT EViT keep rates at EViT's default layers (3,6,9 of 12), e.g. 0.5,0.7,1.0.")] = None,
    val: Annotated[str | None, typer.Option("--val", rich_help_panel=DATA_PANEL, help="Validation images, evaluated before, after and every epoch (a dataset is read with the same --split, --label-field, --image-field).")] = None,
    val_split: Annotated[float | None, typer.Option("--val-split", rich_help_panel=DATA_PANEL, help="Hold out this fraction of --data for validation instead (deterministic, by --seed).")] = None,
    limit: LimitOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    seed: Annotated[int, typer.Option("--seed", rich_help_panel=DATA_PANEL, help="Seed for the split, shuffling and augmentation.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", "-e", rich_help_panel=SCHEDULE_PANEL, help="Training epochs.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel=SCHEDULE_PANEL, help="Training batch size per process.")] = 32,
    lr: Annotated[float, typer.Option("--lr", rich_help_panel=SCHEDULE_PANEL, help="Peak learning rate (AdamW).")] = 5e-4,
    min_lr: Annotated[float, typer.Option("--min-lr", rich_help_panel=SCHEDULE_PANEL, help="Learning rate at the end of the cosine schedule.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", rich_help_panel=SCHEDULE_PANEL, help="AdamW weight decay (not on biases/norms).")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", rich_help_panel=SCHEDULE_PANEL, help="Linear warm-up length in epochs (fractions allowed).")] = 0.3,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", rich_help_panel=SCHEDULE_PANEL, help="Learning rate at the start of the warm-up.")] = 1e-6,
    clip_grad: Annotated[float, typer.Option("--clip-grad", rich_help_panel=SCHEDULE_PANEL, help="Clip the gradient norm to this (0: off).")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", "-T", rich_help_panel=DISTILL_PANEL, help="Distillation temperature.")] = 1.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight", rich_help_panel=DISTILL_PANEL, help="Weight of KL(teacher || student).")] = 1.0,
    label_weight: Annotated[float, typer.Option("--label-weight", rich_help_panel=DISTILL_PANEL, help="Weight of the cross-entropy with the labels (labelled data only).")] = 0.0,
    hard_distill: Annotated[float, typer.Option("--hard-distill", rich_help_panel=DISTILL_PANEL, help="Weight of cross-entropy with the teacher's top-1 class (hard distillation; targets agreement).")] = 0.0,
    feature_distill: Annotated[float, typer.Option("--feature-distill", rich_help_panel=DISTILL_PANEL, help="Weight of the squared error to the teacher's pre-logits features (class-agnostic).")] = 1.0,
    crop_scale: Annotated[float, typer.Option("--crop-scale", rich_help_panel=AUGMENT_PANEL, help="Smallest random-resized-crop area.")] = 0.5,
    no_augment: Annotated[bool, typer.Option("--no-augment", rich_help_panel=AUGMENT_PANEL, help="No random crops/flips/colour jitter (timm's resize + centre crop).")] = False,
    auto_augment: Annotated[str | None, typer.Option("--auto-augment", rich_help_panel=AUGMENT_PANEL, help="timm AutoAugment/RandAugment policy for training images, e.g. rand-m9-mstd0.5.")] = None,
    trainable: Annotated[str, typer.Option("--trainable", rich_help_panel=SCHEDULE_PANEL, help="Parameters to train: comma-separated name patterns, '*' for all.")] = "*norm*,*bias",
    dtype: Annotated[str, typer.Option("--dtype", rich_help_panel=RUN_PANEL, help="Training precision: float32, or bfloat16 / float16 mixed precision on CUDA (float16 with a gradient scaler).")] = "float32",
    ema: Annotated[float | None, typer.Option("--ema", rich_help_panel=SCHEDULE_PANEL, help="Keep an EMA of the weights with this decay (e.g. 0.999); it is validated and saved.")] = None,
    resume: Annotated[bool, typer.Option("--resume", rich_help_panel=OUTPUT_PANEL, help="Continue the unfinished run in OUTPUT.partial/ from its last epoch.")] = False,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint", rich_help_panel=OUTPUT_PANEL, help="Also keep the last training checkpoint (with optimizer state) in the output.")] = False,
    workers: WorkersOpt = 2,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    config: ConfigOpt = None,
    old_sizes: Annotated[str | None, typer.Option("--sizes", hidden=True)] = None,
    amp: Annotated[str | None, typer.Option("--amp", hidden=True)] = None,
) -> None:
    """Fine-tune a reduced model by distillation from the unreduced one; report before/after."""
    from vitprune.commands.finetune import (  # torch loads only when the command runs: --help stays fast
        FinetuneRequest,
        before_after_table,
        run_finetune,
    )

    request = make_request(FinetuneRequest, locals(), required=("data", "output"), aliases=(
        Alias("old_sizes", "sizes"), Alias("amp", "dtype", lambda amp: AMP_SPELLINGS.get(amp, amp))), derive={
        **REDUCTION_RULES, "progress": progress_rule,
        "sizes": lambda values: parse_numbers(values["sizes"], int, "sizes", "160,192,224"),
        "keeps": lambda values: parse_numbers(values["keeps"], float, "keeps", "0.5,0.7,1.0"),
        "augment": lambda values: not values["no_augment"],
        "trainable": lambda values: tuple(p.strip() for p in values["trainable"].split(",") if p.strip())})
    output = request.output
    set_threads(threads)
    result = run_finetune(request)
    if result.report is None:  # ranks other than 0 under torchrun
        return
    if json_out:
        emit_json(result.report)
        return
    report = result.report
    console.print(report_table(report, f"{report['model']}: {report['plan']} (after fine-tuning)"))
    console.print(before_after_table(report["finetune"]).rich())
    console.print(f"wrote [bold]{output}[/] ({ARTIFACT_FILES})")
