"""`vitprune finetune`: recover accuracy by distillation from the unreduced model (and SuperViT)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vitprune.cli.app import app
from vitprune.cli.common import (
    CheckpointOpt,
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
    parse_layers,
    parse_numbers,
    report_table,
    set_threads,
)
from vitprune.errors import VitpruneError

ARTIFACT_FILES = "model.safetensors, vitprune.json, report.json, report.md, metrics.csv, training.png"


@app.command()
def finetune(
    model: ModelArg,
    data: Annotated[str, typer.Option("--data", "-d", help="Training images: ImageFolder, a folder with labels.csv, plain (unlabelled) images, or a dataset timm reads (hfds/... and .tar read per step; wds/... held in memory: bound it with --limit).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the fine-tuned artifact folder here (checkpoints go to OUTPUT.partial/ until the end).")] = None,
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
    supervit: Annotated[bool, typer.Option("--supervit", help="Train one model for every --sizes x --keeps configuration (SuperViT).")] = False,
    sizes: Annotated[str | None, typer.Option("--sizes", help="SuperViT input sizes, e.g. 160,192,224 (the largest = the model's size).")] = None,
    keeps: Annotated[str | None, typer.Option("--keeps", help="SuperViT EViT keep rates at EViT's default layers (3,6,9 of 12), e.g. 0.5,0.7,1.0.")] = None,
    val: Annotated[str | None, typer.Option("--val", help="Validation images, evaluated before, after and every epoch (a dataset is read with the same --split, --label-field, --image-field).")] = None,
    val_split: Annotated[float | None, typer.Option("--val-split", help="Hold out this fraction of --data for validation instead (deterministic, by --seed).")] = None,
    limit: LimitOpt = None,
    split: SplitOpt = None,
    label_field: LabelFieldOpt = None,
    image_field: ImageFieldOpt = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, shuffling and augmentation.")] = 0,
    epochs: Annotated[int, typer.Option("--epochs", "-e", help="Training epochs.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training batch size per process.")] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW).")] = 5e-4,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Learning rate at the end of the cosine schedule.")] = 1e-6,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (not on biases/norms).")] = 0.05,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear warm-up length in epochs (fractions allowed).")] = 0.3,
    warmup_lr: Annotated[float, typer.Option("--warmup-lr", help="Learning rate at the start of the warm-up.")] = 1e-6,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="Clip the gradient norm to this (0: off).")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", "-T", help="Distillation temperature.")] = 1.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Weight of KL(teacher || student).")] = 1.0,
    label_weight: Annotated[float, typer.Option("--label-weight", help="Weight of the cross-entropy with the labels (labelled data only).")] = 0.0,
    hard_distill: Annotated[float, typer.Option("--hard-distill", help="Weight of cross-entropy with the teacher's top-1 class (hard distillation; targets agreement).")] = 0.0,
    feature_distill: Annotated[float, typer.Option("--feature-distill", help="Weight of the squared error to the teacher's pre-logits features (class-agnostic).")] = 1.0,
    crop_scale: Annotated[float, typer.Option("--crop-scale", help="Smallest random-resized-crop area.")] = 0.5,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="No random crops/flips/colour jitter (timm's resize + centre crop).")] = False,
    auto_augment: Annotated[str | None, typer.Option("--auto-augment", help="timm AutoAugment/RandAugment policy for training images, e.g. rand-m9-mstd0.5.")] = None,
    trainable: Annotated[str, typer.Option("--trainable", help="Parameters to train: comma-separated name patterns, '*' for all.")] = "*norm*,*bias",
    amp: Annotated[str, typer.Option("--amp", help="Mixed precision on CUDA: none, bf16 or fp16.")] = "none",
    ema: Annotated[float | None, typer.Option("--ema", help="Keep an EMA of the weights with this decay (e.g. 0.999); it is validated and saved.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the unfinished run in OUTPUT.partial/ from its last epoch.")] = False,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint", help="Also keep the last training checkpoint (with optimizer state) in the output.")] = False,
    workers: WorkersOpt = 2,
    threads: ThreadsOpt = None,
    device: DeviceOpt = "cpu",
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fine-tune a reduced model by distillation from the unreduced one; report before/after."""
    from vitprune.commands.finetune import (  # torch loads only when the command runs: --help stays fast
        FinetuneRequest,
        before_after_table,
        run_finetune,
    )

    if output is None:
        raise VitpruneError("give --output/-o: the folder to write the fine-tuned artifact to")
    request = FinetuneRequest(
        model=model, data=data, output=output, method=method, keep=keep, r=r, protect=protect,
        layers=parse_layers(layers), fuse=False if no_fuse else None, head_only=head_only, plan_file=plan_file,
        checkpoint=checkpoint, no_pretrained=no_pretrained, img_size=img_size, supervit=supervit,
        sizes=parse_numbers(sizes, int, "sizes", "160,192,224"),
        keeps=parse_numbers(keeps, float, "keeps", "0.5,0.7,1.0"),
        val=val, val_split=val_split, limit=limit, split=split, label_field=label_field, image_field=image_field,
        seed=seed, epochs=epochs, batch_size=batch_size, lr=lr,
        min_lr=min_lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, warmup_lr=warmup_lr,
        clip_grad=clip_grad, temperature=temperature, distill_weight=distill_weight, label_weight=label_weight,
        hard_distill=hard_distill, feature_distill=feature_distill, crop_scale=crop_scale,
        augment=not no_augment, auto_augment=auto_augment,
        trainable=tuple(p.strip() for p in trainable.split(",") if p.strip()), amp=amp, ema=ema,
        workers=workers, device=device, force=force, resume=resume, keep_checkpoint=keep_checkpoint,
        progress=not json_out,
    )
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
