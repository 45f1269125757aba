"""Recover the accuracy token reduction loses: distil the reduced model from its unreduced self.

The teacher is the base model without reduction; the student is a copy running the plan. The
loss is KL(teacher || student) on temperature-softened predictions, plus cross-entropy when the
images are labelled. SuperViT mode trains one set of weights for several input sizes x EViT keep
rates at once: the largest variant learns from the teacher, the others from the largest.

Runs as one process (CPU by default) or unchanged under `torchrun` (DDP, one process per GPU).
Checkpoints go to `<output>.partial/` every epoch; at the end the artifact is written to
`<output>` in one rename and the work folder is removed, so `--resume` continues from the
partial folder and `<output>` never holds a half-trained model.

    request = FinetuneRequest(model="out/evit", data=Path("train/"), val=Path("val/"), output=Path("ft/"))
    result = run_finetune(request)
"""
from __future__ import annotations

import copy
import csv
import io
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vitprune.data import ImageSet
from vitprune.errors import VitpruneError
from vitprune.pipeline import ReducedModelSpec
from vitprune.plan import Plan

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "training.png"
CHECKPOINT_FORMAT = 1
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rank 0 validates and writes while the other ranks wait at a barrier: allow for a large --val.
DIST_TIMEOUT = timedelta(minutes=60)
# Options that may change between a run and its --resume; every other one must match the checkpoint.
RESUMABLE_FIELDS = ("output", "force", "resume", "keep_checkpoint", "progress", "workers", "eval_batch_size", "device")


@dataclass(kw_only=True)
class FinetuneRequest(ReducedModelSpec):
    """Everything `vitprune finetune` takes; the same fields as its options.

    The model and reduction fields are `apply`'s (an apply artifact folder brings its own plan)."""

    data: Path
    output: Path | None = None
    # SuperViT: every size x keep rate trained at once
    supervit: bool = False
    sizes: tuple[int, ...] = ()
    keeps: tuple[float, ...] = ()
    # data
    val: Path | None = None
    val_split: float | None = None  # hold out this fraction of `data` for validation
    limit: int | None = None
    seed: int = 0
    # optimisation
    epochs: int = 3
    batch_size: int = 32  # per process
    lr: float = 5e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    warmup_lr: float = 1e-6
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    temperature: float = 1.0
    distill_weight: float = 1.0
    label_weight: float = 1.0
    hard_distill: float = 0.0  # weight of cross-entropy with the teacher's top-1 (DeiT's hard distillation)
    feature_distill: float = 0.0  # weight of the relative MSE to the teacher's pre-logits features
    crop_scale: float = 0.08  # smallest random-resized-crop area (timm's default)
    augment: bool = True  # False: timm's un-augmented train transform (resize + centre crop)
    auto_augment: str | None = None  # a timm AutoAugment/RandAugment policy, e.g. "rand-m9-mstd0.5"
    trainable: tuple[str, ...] = ("*",)  # parameter-name patterns to train (fnmatch)
    amp: str = "none"  # none, bf16 or fp16 (CUDA only)
    ema: float | None = None  # EMA decay; the EMA weights are validated and saved
    # running
    workers: int = 2
    eval_batch_size: int = 64
    device: str = "cpu"
    force: bool = False
    resume: bool = False
    keep_checkpoint: bool = False
    progress: bool = True


@dataclass
class Variant:
    """One configuration the student serves: a plan at an input size."""

    key: str  # column prefix in metrics.csv
    label: str  # what people read
    plan: Plan  # with img_size (None: the model's own size), as users apply it
    img_size: int
    keep: float | None = None  # SuperViT keep rate


@dataclass
class FinetuneResult:
    model: nn.Module  # the trained student running its (default) plan, on the CPU
    report: dict | None  # None on ranks other than 0
    metrics: list[dict]
    output: Path | None
    rank: int = 0


@dataclass
class Distributed:
    """This process's place in a torchrun job (world size 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# --------------------------------------------------------------------------- data


class TrainImages(Dataset):
    """Decodes and augments one image per item, freshly every epoch (`data.load_images`
    preloads fixed eval tensors instead). Unlabelled images get label -1."""

    def __init__(self, image_set: ImageSet, transform: Callable[[Image.Image], Tensor]) -> None:
        self.files = image_set.files
        self.labels = image_set.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, str | None]:
        file = self.files[index]
        label = self.labels[index] if self.labels is not None else -1
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except Exception as error:  # PIL raises many types; errors travel as data, not worker tracebacks
            return None, label, f"cannot read image {file}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        try:
            return self.transform(rgb), label, None
        except Exception as error:  # e.g. a random augmentation op Pillow refuses
            return None, label, f"cannot augment image {file}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"


def collate_train(samples: list[tuple[Tensor | None, int, str | None]]) -> tuple[Tensor | None, Tensor | None, str | None]:
    errors = [error for _, _, error in samples if error is not None]
    if errors:
        return None, None, errors[0]
    return torch.stack([image for image, _, _ in samples]), torch.tensor([label for _, label, _ in samples]), None


def train_transform(model: nn.Module, crop_scale: float, augment: bool = True,
                    auto_augment: str | None = None) -> Callable[[Image.Image], Tensor]:
    """timm's training augmentation (random resized crop, flip, colour jitter or an AutoAugment /
    RandAugment policy) at the model's size. The teacher labels whatever the augmentation makes, so
    stronger augmentation turns a few images into many distinct training samples."""
    import timm.data

    from vitprune.data import data_config_for

    return timm.data.create_transform(**data_config_for(model), is_training=True, no_aug=not augment,
                                      scale=(crop_scale, 1.0), auto_augment=auto_augment)


def check_auto_augment(policy: str) -> None:
    """A policy timm understands ('rand-m9-mstd0.5', 'augmix-m5', 'original', 'v0', ...)."""
    import timm.data

    try:
        timm.data.create_transform(32, is_training=True, auto_augment=policy)
    except Exception as error:
        raise VitpruneError(f"unknown --auto-augment policy '{policy}' ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                            "use e.g. rand-m9-mstd0.5") from None


def resized(images: Tensor, size: int) -> Tensor:
    """The batch at `size` x `size` (SuperViT's smaller inputs come from the same augmented crop)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


# --------------------------------------------------------------------------- losses


def hard_distill_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Cross-entropy with the teacher's top-1 class as the label (DeiT's hard distillation).
    Agreement with the teacher is exactly top-1 match, so this term aims at it directly."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


def feature_distill_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Squared error to the teacher's pre-logits features (the classifier's input), relative to
    their mean square. Unlike the logits it asks nothing about classes, so what it teaches carries
    over to classes the training images do not show."""
    teacher = teacher_features.float()
    return F.mse_loss(student_features.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def forward_with_features(model: nn.Module, runner: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """runner(images) (the model, or its DDP wrapper) and the input of `model.head` during that call."""
    captured: list[Tensor] = []
    handle = model.head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        logits = runner(images)
    finally:
        handle.remove()
    return logits, captured[-1]


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened predictions, times T^2 so that the
    gradient scale does not depend on T (Hinton et al.)."""
    t = temperature
    student = F.log_softmax(student_logits.float() / t, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * (t * t)


# --------------------------------------------------------------------------- variants


def supervit_variants(depth: int, model_size: int, sizes: tuple[int, ...], keeps: tuple[float, ...],
                      patch_size: int) -> list[Variant]:
    """Every size x keep rate, largest first: EViT top-k at the default layers (3, 6, 9 of 12);
    keep 1.0 is the plain model. Sizes must be multiples of the patch size, the largest the
    model's own size (the weights are stored at that size; smaller ones are resampled from it)."""
    from vitprune.plan import make_plan

    if not sizes or not keeps:
        raise VitpruneError("--supervit needs --sizes (e.g. 160,192,224) and --keeps (e.g. 0.5,0.7,1.0)")
    if len(set(sizes)) != len(sizes) or len(set(keeps)) != len(keeps):
        raise VitpruneError("--sizes and --keeps must not repeat a value")
    if len(sizes) * len(keeps) < 2:
        raise VitpruneError("SuperViT trains several configurations: give at least two sizes or two keep rates")
    for size in sizes:
        if size < patch_size or size % patch_size:
            raise VitpruneError(f"SuperViT sizes must be multiples of the patch size {patch_size}, got {size}")
    if max(sizes) != model_size:
        raise VitpruneError(f"the largest SuperViT size must be the model's input size {model_size} (got {max(sizes)}); "
                            "use --img-size to change the model's size")
    for keep in keeps:
        if not 0 < keep <= 1:
            raise VitpruneError(f"SuperViT keep rates must be in (0, 1], got {keep}")
    variants = []
    for size in sorted(sizes, reverse=True):
        for keep in sorted(keeps, reverse=True):
            img_size = None if size == model_size else size
            plan = Plan(img_size=img_size) if keep == 1 else make_plan("evit", depth, keep=keep, img_size=img_size)
            variants.append(Variant(key=f"{size}_k{keep:g}", label=f"{size}px keep {keep:g}", plan=plan,
                                    img_size=size, keep=keep))
    return variants


def served_model(trained: nn.Module, plan: Plan) -> nn.Module:
    """A copy of the trained weights running `plan` exactly as `vitprune.load` + `vitprune.apply`
    would serve it (a fixed input size, the position embedding resampled once)."""
    from vitprune.patch import apply_plan, remove_plan, set_dynamic_img_size

    model = copy.deepcopy(trained)
    set_dynamic_img_size(model, False)
    remove_plan(model)
    return apply_plan(model, plan).eval()


def list_variants(path: str | Path) -> list[dict]:
    """The SuperViT configurations stored in a finetune artifact: name, img_size, keep, plan, GMACs, accuracy."""
    from vitprune.artifact import read_metadata

    notes = read_metadata(path).get("plan", {}).get("notes") or {}
    if "supervit" not in notes:
        raise VitpruneError(f"{path} was not trained with --supervit: it serves only its own plan")
    return notes["supervit"]["variants"]


def load_variant(path: str | Path, img_size: int, keep: float, *, device: str | torch.device = "cpu") -> nn.Module:
    """The SuperViT artifact at `path` running its configuration (img_size, keep)."""
    from vitprune.artifact import load
    from vitprune.patch import apply_plan

    variants = list_variants(path)
    chosen = next((v for v in variants if v["img_size"] == img_size and math.isclose(v["keep"], keep)), None)
    if chosen is None:
        available = ", ".join(f"{v['img_size']}:{v['keep']:g}" for v in variants)
        raise VitpruneError(f"no configuration {img_size}px keep {keep:g} in {path}; it has (size:keep) {available}")
    model = load(path, device=device)
    return apply_plan(model, Plan.from_dict(chosen["plan"]))


# --------------------------------------------------------------------------- distributed


def init_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else run alone.
    Each process drives the GPU of its LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda")
    target = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
    if cuda:
        torch.cuda.set_device(target)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
        initialized_here = True
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, initialized_here), target


# --------------------------------------------------------------------------- checks


def check_request(request: FinetuneRequest) -> None:
    """Every number and combination of options, before anything is loaded or written."""
    numbers = [
        (request.epochs >= 1, f"--epochs must be at least 1, got {request.epochs}"),
        (request.batch_size >= 1, f"--batch-size must be at least 1, got {request.batch_size}"),
        (request.eval_batch_size >= 1, f"the evaluation batch size must be at least 1, got {request.eval_batch_size}"),
        (request.lr > 0, f"--lr must be positive, got {request.lr}"),
        (request.min_lr >= 0, f"--min-lr must not be negative, got {request.min_lr}"),
        (request.warmup_lr >= 0, f"--warmup-lr must not be negative, got {request.warmup_lr}"),
        (request.weight_decay >= 0, f"--weight-decay must not be negative, got {request.weight_decay}"),
        (0 <= request.warmup_epochs < request.epochs,
         f"--warmup-epochs must be at least 0 and less than --epochs ({request.epochs}), got {request.warmup_epochs}"),
        (request.clip_grad >= 0, f"--clip-grad must not be negative (0 turns it off), got {request.clip_grad}"),
        (request.temperature > 0, f"--temperature must be positive, got {request.temperature}"),
        (min(request.distill_weight, request.label_weight, request.hard_distill, request.feature_distill) >= 0,
         "loss weights must not be negative"),
        (request.distill_weight + request.label_weight + request.hard_distill + request.feature_distill > 0,
         "the distillation, hard-distillation, feature and label weights cannot all be 0"),
        (0 < request.crop_scale <= 1, f"--crop-scale must be in (0, 1], got {request.crop_scale}"),
        (request.workers >= 0, f"--workers must not be negative, got {request.workers}"),
        (request.ema is None or 0 < request.ema < 1, f"--ema is a decay in (0, 1), e.g. 0.999, got {request.ema}"),
        (request.val_split is None or 0 < request.val_split < 1, f"--val-split must be in (0, 1), got {request.val_split}"),
        (bool(request.trainable), "--trainable needs at least one parameter-name pattern"),
    ]
    for ok, message in numbers:
        if not ok:
            raise VitpruneError(message)
    if request.amp not in AMP_DTYPES:
        raise VitpruneError(f"unknown --amp '{request.amp}'; use {', '.join(AMP_DTYPES)}")
    if request.amp != "none" and not request.device.startswith("cuda"):
        raise VitpruneError(f"--amp {request.amp} is for CUDA GPUs; on the CPU train in float32 (--amp none)")
    if request.val is not None and request.val_split is not None:
        raise VitpruneError("give --val DIR or --val-split FRACTION, not both")
    if request.supervit and (request.method is not None or request.plan_file is not None):
        raise VitpruneError("--supervit builds its own EViT plans from --sizes/--keeps; drop --method/--plan")
    if request.auto_augment is not None:
        if not request.augment:
            raise VitpruneError("--auto-augment is an augmentation: drop --no-augment")
        check_auto_augment(request.auto_augment)
    if not request.supervit and (request.sizes or request.keeps):
        raise VitpruneError("--sizes and --keeps are for --supervit")
    if request.resume and request.output is None:
        raise VitpruneError("--resume continues the run writing to --output; give -o")


def work_dir_for(output: Path) -> Path:
    """Where a run keeps its checkpoints until it finishes: `<output>.partial` beside the output."""
    return output.with_name(output.name + ".partial")


def _check_output(request: FinetuneRequest) -> Path | None:
    from vitprune.io import check_output_dir

    if request.output is None:
        return None
    check_output_dir(request.output, request.force)
    work = work_dir_for(request.output)
    if request.resume:
        if not (work / CHECKPOINT_FILE).is_file():
            raise VitpruneError(f"nothing to resume: no {CHECKPOINT_FILE} in {work}")
    elif work.exists() and not request.force:
        raise VitpruneError(f"an unfinished run is in {work}; pass --resume to continue it or --force to start over")
    return work


def _settings(request: FinetuneRequest) -> dict:
    """The options a checkpoint is bound to (see RESUMABLE_FIELDS)."""
    out = {}
    for key, value in asdict(request).items():
        if key in RESUMABLE_FIELDS:
            continue
        out[key] = str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------- evaluation


@dataclass
class Validation:
    """Held-out images preprocessed at every size the variants use, and the teacher's answers."""

    images: dict[int, Tensor]
    labels: Tensor | None
    teacher_size: int
    teacher_logits: Tensor
    teacher_metrics: dict
    path: str

    def metrics(self, model: nn.Module, variant: Variant, batch_size: int) -> dict:
        from vitprune.data import classification_metrics, predict

        logits = predict(model, self.images[variant.img_size], batch_size=batch_size, progress=False)
        found = classification_metrics(logits, self.labels, self.teacher_logits)
        return {key: found[key] for key in ("top1", "agreement", "kl") if key in found}


def prepare_validation(teacher: nn.Module, image_set: ImageSet, sizes: set[int], path: str, *,
                       workers: int, batch_size: int, progress: bool) -> Validation:
    from vitprune.data import classification_metrics, load_images, predict, transform_for
    from vitprune.patch import model_img_size

    teacher_size = model_img_size(teacher)
    images: dict[int, Tensor] = {}
    labels = None
    for size in sorted(sizes | {teacher_size}, reverse=True):
        images[size], labels = load_images(image_set, transform_for(teacher, img_size=size), num_workers=workers,
                                           batch_size=batch_size, progress=progress)
    teacher_logits = predict(teacher, images[teacher_size], batch_size=batch_size, progress=progress,
                             description="Teacher")
    teacher_metrics = classification_metrics(teacher_logits, labels, None)
    return Validation(images, labels, teacher_size, teacher_logits,
                      {key: teacher_metrics[key] for key in ("top1",) if key in teacher_metrics}, path)


def evaluate(trained: nn.Module, variants: list[Variant], validation: Validation | None, batch_size: int) -> dict:
    """{variant key: {top1, agreement, kl}} of the trained weights served at each variant."""
    if validation is None:
        return {}
    results = {}
    for variant in variants:
        model = served_model(trained, variant.plan)
        results[variant.key] = validation.metrics(model, variant, batch_size)
    return results


# --------------------------------------------------------------------------- outputs


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    from vitprune.io import atomic_output_file

    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    with atomic_output_file(path) as tmp:
        tmp.write_text(buffer.getvalue())


def plot_training(rows: list[dict], steps: list[tuple[float, float]], variants: list[Variant], path: Path) -> None:
    """Training loss per step (and per epoch), validation agreement / top-1 per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from vitprune.io import atomic_output_file

    figure = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    loss_axes, val_axes = figure.subplots(1, 2)
    if steps:
        loss_axes.plot([s for s, _ in steps], [v for _, v in steps], lw=0.8, alpha=0.45, label="per step")
    trained = [row for row in rows if "train_loss" in row]
    loss_axes.plot([row["epoch"] for row in trained], [row["train_loss"] for row in trained], "o-", label="epoch mean")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    loss_axes.legend()
    for variant in variants:
        for metric, style in (("agreement", "o-"), ("top1", "s--")):
            points = [(row["epoch"], row[f"{variant.key}_{metric}"]) for row in rows if f"{variant.key}_{metric}" in row]
            if points:
                name = f"{variant.label}: {'agreement' if metric == 'agreement' else 'top-1'}"
                val_axes.plot(*zip(*points), style, label=name if len(variants) > 1 else name.split(": ")[1])
    val_axes.set(xlabel="epoch (0 = before training)", ylabel="%", title="Validation")
    if val_axes.lines:
        val_axes.legend(fontsize=7 if len(variants) > 3 else 9)
    else:
        val_axes.text(0.5, 0.5, "no validation images (--val / --val-split)", ha="center", transform=val_axes.transAxes)
    figure.tight_layout()
    with atomic_output_file(path) as tmp:
        figure.savefig(tmp, format="png")


def _save_checkpoint(path: Path, payload: dict) -> None:
    from vitprune.io import atomic_output_file

    with atomic_output_file(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise VitpruneError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise VitpruneError(f"{path} is not a vitprune finetune checkpoint")
    return payload


# --------------------------------------------------------------------------- training


@dataclass
class Trainer:
    """One optimisation step: teacher forward, student forward(s) and backward, clip, step."""

    request: FinetuneRequest
    teacher: nn.Module
    student: nn.Module  # the module itself (DDP wraps it in `runner`)
    runner: nn.Module
    variants: list[Variant]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    device: torch.device
    distributed: Distributed
    labelled: bool
    train_params: list[nn.Parameter] = field(default_factory=list)

    def autocast(self):
        dtype = AMP_DTYPES[self.request.amp]
        return torch.autocast("cuda", dtype=dtype) if dtype is not None else nullcontext()

    def backward(self, loss: Tensor, sync: bool) -> None:
        # Gradients of all SuperViT variants add up; DDP averages them across ranks on the last one.
        context = self.runner.no_sync() if (not sync and isinstance(self.runner, nn.parallel.DistributedDataParallel)) else nullcontext()
        with context:
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def distillation(self, logits: Tensor, target_logits: Tensor) -> tuple[Tensor, float]:
        """Soft (KL) plus hard (teacher's top-1) distillation towards `target_logits`, and the KL."""
        request = self.request
        distill = distill_loss(logits, target_logits, request.temperature)
        loss = request.distill_weight * distill
        if request.hard_distill > 0:
            loss = loss + request.hard_distill * hard_distill_loss(logits, target_logits)
        return loss, distill.item()

    def objective(self, logits: Tensor, target_logits: Tensor, labels: Tensor) -> tuple[Tensor, float, float]:
        request = self.request
        loss, distill = self.distillation(logits, target_logits)
        label = 0.0
        if self.labelled and request.label_weight > 0:
            label_loss = F.cross_entropy(logits.float(), labels)
            loss = loss + request.label_weight * label_loss
            label = label_loss.item()
        return loss, distill, label

    def step(self, images: Tensor, labels: Tensor) -> dict:
        from vitprune.patch import apply_plan

        request = self.request
        images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        with torch.no_grad(), self.autocast():
            teacher_logits, teacher_features = forward_with_features(self.teacher, self.teacher, images)
        teacher_logits = teacher_logits.float()
        total, parts = 0.0, {"distill": 0.0, "label": 0.0, "feature": 0.0}
        supervit = request.supervit
        for index, variant in enumerate(self.variants):
            last = index == len(self.variants) - 1
            if supervit:
                apply_plan(self.student, replace(variant.plan, img_size=None))  # the size comes from the input
            with self.autocast():
                logits, student_features = forward_with_features(self.student, self.runner, resized(images, variant.img_size))
            if index == 0:
                loss, distill, label = self.objective(logits, teacher_logits, labels)
                parts["distill"] += distill
                parts["label"] += label
                if request.feature_distill > 0:
                    feature_loss = feature_distill_loss(student_features, teacher_features)
                    loss = loss + request.feature_distill * feature_loss
                    parts["feature"] += feature_loss.item()
                soft_targets = logits.detach()
            else:
                # In-place distillation: the smaller variants learn the largest one's predictions.
                loss, distill = self.distillation(logits, soft_targets)
                parts["distill"] += distill
            self.backward(loss, sync=last)
            total += loss.item()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if request.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.train_params, request.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, **parts}


def _train_progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:.1f} img/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled,
    )


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _select_trainable(student: nn.Module, patterns: tuple[str, ...]) -> list[nn.Parameter]:
    chosen = []
    for name, param in student.named_parameters():
        param.requires_grad_(any(fnmatch(name, pattern) for pattern in patterns))
        if param.requires_grad:
            chosen.append(param)
    if not chosen:
        example = next(name for name, _ in student.named_parameters())
        raise VitpruneError(f"--trainable {','.join(patterns)} matches no parameter (names look like '{example}')")
    return chosen


def _check_labels(image_set: ImageSet, num_classes: int, what: str) -> None:
    if image_set.labels is not None and image_set.labels and max(image_set.labels) >= num_classes:
        raise VitpruneError(f"the {what} images have class index {max(image_set.labels)} but the model has {num_classes} classes")


def run_finetune(request: FinetuneRequest) -> FinetuneResult:
    """Train the reduced model (or the SuperViT variants) by distillation; write the artifact on rank 0."""
    check_request(request)
    distributed, device = init_distributed(request.device)
    try:
        return _run(request, distributed, device)
    finally:
        if distributed.initialized_here:
            dist.destroy_process_group()


def _run(request: FinetuneRequest, distributed: Distributed, device: torch.device) -> FinetuneResult:
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from vitprune.data import find_images, split
    from vitprune.patch import apply_plan, model_img_size, set_dynamic_img_size
    from vitprune.pipeline import load_base, resolve_plan

    # ---- everything that can be wrong with the input, before anything is written
    train_set = find_images(request.data, limit=request.limit, seed=request.seed)
    val_set, val_path = None, None
    if request.val is not None:
        val_set, val_path = find_images(request.val), str(request.val)
    elif request.val_split is not None:
        train_set, val_set = split(train_set, request.val_split, request.seed)
        val_path = f"{request.data} (held-out {request.val_split:g}, seed {request.seed})"
    work = _check_output(request)
    _seed(request.seed)  # the same random init on every rank (--no-pretrained)
    base = load_base(request.model, request.checkpoint, request.no_pretrained, request.img_size)
    teacher = base.model
    depth, teacher_size = len(teacher.blocks), model_img_size(teacher)
    if request.supervit:
        variants = supervit_variants(depth, teacher_size, request.sizes, request.keeps, teacher.patch_embed.patch_size[0])
    else:
        plan = resolve_plan(request, base)
        variants = [Variant(key="val", label=plan.describe(), plan=plan, img_size=plan.img_size or teacher_size)]
    for image_set, what in ((train_set, "training"), (val_set, "validation")):
        if image_set is not None:
            _check_labels(image_set, teacher.num_classes, what)
    if len(train_set) < distributed.world_size:
        raise VitpruneError(f"{len(train_set)} training images cannot feed {distributed.world_size} processes")
    labelled = train_set.labels is not None

    student = copy.deepcopy(teacher)
    apply_plan(student, variants[0].plan)
    if request.supervit:
        set_dynamic_img_size(student, True)  # one set of weights, every input size
    train_params = _select_trainable(student, request.trainable)
    settings = _settings(request)
    checkpoint = _load_checkpoint(work / CHECKPOINT_FILE) if request.resume else None
    if checkpoint is not None and checkpoint["settings"] != settings:
        changed = sorted(k for k in settings if checkpoint["settings"].get(k) != settings[k])
        raise VitpruneError(f"the checkpoint in {work} was made with other settings ({', '.join(changed)}); "
                            "run with those, or pass --force without --resume to start over")
    distributed.barrier()  # every rank has checked the input before rank 0 touches the disk

    if distributed.is_main and work is not None and not request.resume:
        shutil.rmtree(work, ignore_errors=True)  # --force: a fresh start
        work.mkdir()
    teacher.eval().requires_grad_(False).to(device)
    student.to(device).train()

    optimizer = create_optimizer_v2(student, opt="adamw", lr=request.lr, weight_decay=request.weight_decay)
    transform = train_transform(teacher, request.crop_scale, request.augment, request.auto_augment)
    dataset = TrainImages(train_set, transform)
    sampler = DistributedSampler(dataset, num_replicas=distributed.world_size, rank=distributed.rank,
                                 shuffle=True, seed=request.seed)
    loader = DataLoader(dataset, batch_size=request.batch_size, sampler=sampler, num_workers=request.workers,
                        collate_fn=collate_train, pin_memory=device.type == "cuda",
                        persistent_workers=request.workers > 0)
    updates_per_epoch = len(loader)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=request.epochs,
                                       warmup_epochs=request.warmup_epochs, warmup_lr=request.warmup_lr,
                                       min_lr=request.min_lr, step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(student, decay=request.ema) if request.ema is not None else None
    scaler = torch.amp.GradScaler("cuda") if request.amp == "fp16" else None

    rows: list[dict] = []
    steps: list[tuple[float, float]] = []
    start_epoch = 0
    if checkpoint is not None:
        student.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint["ema"])
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        rows, steps, start_epoch = checkpoint["rows"], [tuple(s) for s in checkpoint["steps"]], checkpoint["epoch"]

    runner: nn.Module = student
    if distributed.world_size > 1:
        runner = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    trainer = Trainer(request, teacher, student, runner, variants, optimizer, scaler, device, distributed, labelled,
                      train_params)
    evaluated = lambda: ema.module if ema is not None else student  # noqa: E731  (the weights we ship)

    validation = None
    if distributed.is_main and val_set is not None:
        validation = prepare_validation(teacher, val_set, {v.img_size for v in variants}, val_path,
                                        workers=request.workers, batch_size=request.eval_batch_size,
                                        progress=request.progress)
    if start_epoch == 0 and distributed.is_main:
        rows.append({"epoch": 0, **_flat(evaluate(evaluated(), variants, validation, request.eval_batch_size))})
        _log_epoch(rows[0], variants, request.progress)
    distributed.barrier()

    started = time.perf_counter()
    for epoch in range(start_epoch, request.epochs):
        _seed(request.seed + 1000 * (epoch + 1) + distributed.rank)  # different crops per rank, reproducible on resume
        sampler.set_epoch(epoch)
        student.train()
        totals = {"loss": 0.0, "distill": 0.0, "label": 0.0, "feature": 0.0}
        seen = 0
        epoch_start = time.perf_counter()
        with _train_progress(request.progress and distributed.is_main) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{request.epochs}", total=updates_per_epoch, loss=0.0, speed=0.0)
            for index, (images, labels, error) in enumerate(loader):
                if error is not None:
                    raise VitpruneError(error)
                losses = trainer.step(images, labels)
                update = epoch * updates_per_epoch + index + 1
                scheduler.step_update(num_updates=update)
                if ema is not None:
                    ema.update(student, step=update)
                for key in totals:
                    totals[key] += losses[key] * len(images)
                seen += len(images)
                steps.append((epoch + (index + 1) / updates_per_epoch, losses["loss"]))
                speed = seen * distributed.world_size / (time.perf_counter() - epoch_start)
                bar.update(task, advance=1, loss=totals["loss"] / seen, speed=speed)
        seconds = time.perf_counter() - epoch_start
        if distributed.is_main:
            student.eval()
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": totals["loss"] / seen, "train_distill": totals["distill"] / seen}
            if labelled and request.label_weight > 0:
                row["train_label"] = totals["label"] / seen
            if request.feature_distill > 0:
                row["train_feature"] = totals["feature"] / seen
            row.update({"images_per_s": seen * distributed.world_size / seconds, "epoch_seconds": seconds})
            row.update(_flat(evaluate(evaluated(), variants, validation, request.eval_batch_size)))
            rows.append(row)
            _log_epoch(row, variants, request.progress)
            if work is not None:
                payload = {"format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "settings": settings,
                           "model": student.state_dict(), "optimizer": optimizer.state_dict(),
                           "rows": rows, "steps": steps}
                if ema is not None:
                    payload["ema"] = ema.module.state_dict()
                if scaler is not None:
                    payload["scaler"] = scaler.state_dict()
                _save_checkpoint(work / CHECKPOINT_FILE, payload)
                write_metrics_csv(rows, work / METRICS_FILE)
                plot_training(rows, steps, variants, work / PLOT_FILE)
        distributed.barrier()
    train_seconds = time.perf_counter() - started

    final = evaluated()
    default = variants[0]
    report = None
    served = served_model(final, default.plan).cpu()
    if distributed.is_main:
        report, served = _finish(request, base.info, teacher, final, served, variants, validation, rows, steps,
                                 train_set, distributed, train_seconds, work, device)
    distributed.barrier()
    set_dynamic_img_size(student, False)
    return FinetuneResult(model=served, report=report, metrics=rows, output=request.output, rank=distributed.rank)


def _flat(results: dict) -> dict:
    return {f"{key}_{metric}": value for key, metrics in results.items() for metric, value in metrics.items()}


def _log_epoch(row: dict, variants: list[Variant], enabled: bool) -> None:
    if not enabled:
        return
    from rich.console import Console

    if "train_loss" in row:
        parts = [f"epoch {row['epoch']}: loss {row['train_loss']:.4f}", f"{row['images_per_s']:.1f} img/s"]
    else:
        parts = ["before training"]
    for variant in variants:
        if f"{variant.key}_agreement" in row:
            name = "" if len(variants) == 1 else f"{variant.label} "
            top1 = f", top-1 {row[f'{variant.key}_top1']:.2f}%" if f"{variant.key}_top1" in row else ""
            parts.append(f"{name}agreement {row[f'{variant.key}_agreement']:.2f}%{top1}")
    Console(stderr=True).print(" | ".join(parts))


def _finish(request: FinetuneRequest, info: dict, teacher: nn.Module, final: nn.Module, served: nn.Module,
            variants: list[Variant], validation: Validation | None, rows: list[dict], steps: list,
            train_set: ImageSet, distributed: Distributed, train_seconds: float, work: Path | None,
            device: torch.device) -> tuple[dict, nn.Module]:
    """Rank 0: GMACs and before/after of every variant, the report, the artifact."""
    from vitprune.artifact import model_identity, versions, write_artifact
    from vitprune.patch import apply_plan
    from vitprune.report import Evidence, compare, count_gmacs, make_report, render_markdown

    before, after = rows[0], rows[-1]
    variant_reports = []
    for variant in variants:
        model = served_model(final, variant.plan)
        images = validation.images[variant.img_size] if validation is not None else None
        entry = {"name": variant.key, "label": variant.label, "img_size": variant.img_size, "plan": variant.plan.describe(),
                 "gmacs": round(count_gmacs(model, images), 4)}
        if variant.keep is not None:
            entry["keep"] = variant.keep
        for when, row in (("before", before), ("after", after)):
            found = {m: round(row[f"{variant.key}_{m}"], 4) for m in ("top1", "agreement", "kl") if f"{variant.key}_{m}" in row}
            if found:
                entry[when] = found
        variant_reports.append(entry)
    teacher_entry = {"gmacs": round(count_gmacs(teacher, None), 4)}
    if validation is not None:
        teacher_entry.update({k: round(v, 4) for k, v in validation.teacher_metrics.items()})

    finetune = {
        "supervit": request.supervit, "epochs": request.epochs, "train_images": len(train_set),
        "train_labelled": train_set.labels is not None,
        "val_images": int(validation.teacher_logits.shape[0]) if validation is not None else 0,
        "val_data": validation.path if validation is not None else None,
        "world_size": distributed.world_size, "train_seconds": round(train_seconds, 1),
        "teacher": teacher_entry, "variants": variant_reports,
        "settings": {key: value for key, value in _settings(request).items()
                     if key not in ("model", "data", "val", "checkpoint", "plan_file")},
    }
    plan = variants[0].plan
    notes = dict(plan.notes)
    notes["finetune"] = {"epochs": request.epochs, "teacher": teacher_entry, "train_images": len(train_set)}
    if request.supervit:
        notes["supervit"] = {"variants": [
            {"name": v.key, "img_size": v.img_size, "keep": v.keep, "plan": v.plan.to_dict(), **_figures(r)}
            for v, r in zip(variants, variant_reports)]}
    apply_plan(served, replace(plan, notes=notes))

    evidence = Evidence(device=str(device), batch_size=request.eval_batch_size, progress=request.progress)
    if validation is not None:
        evidence.images = validation.images[variants[0].img_size]
        evidence.labels = validation.labels
        evidence.base_images = validation.images[validation.teacher_size]
        evidence.data_path = validation.path
    measured = compare(teacher, served.to(device), evidence)
    served.cpu()
    report = make_report(model_identity(served, info), plan, measured, versions())
    report["finetune"] = finetune
    if request.output is not None:
        extra = {METRICS_FILE: _metrics_bytes(rows), PLOT_FILE: _plot_bytes(rows, steps, variants)}
        if request.keep_checkpoint and work is not None and (work / CHECKPOINT_FILE).is_file():
            extra[CHECKPOINT_FILE] = (work / CHECKPOINT_FILE).read_bytes()
        write_artifact(request.output, served, info, report=report,
                       report_md=render_markdown(report, "vitprune finetune report") + finetune_markdown(finetune),
                       force=request.force, extra_files=extra)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return report, served


def _figures(variant_report: dict) -> dict:
    after = variant_report.get("after", {})
    return {"gmacs": variant_report["gmacs"], **{k: after[k] for k in ("top1", "agreement") if k in after}}


def _metrics_bytes(rows: list[dict]) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        write_metrics_csv(rows, Path(folder) / METRICS_FILE)
        return (Path(folder) / METRICS_FILE).read_bytes()


def _plot_bytes(rows: list[dict], steps: list, variants: list[Variant]) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        plot_training(rows, steps, variants, Path(folder) / PLOT_FILE)
        return (Path(folder) / PLOT_FILE).read_bytes()


def finetune_markdown(finetune: dict) -> str:
    """The before/after table of report.md."""
    lines = ["## Fine-tuning", "",
             f"{finetune['epochs']} epochs on {finetune['train_images']} images"
             + (" (labelled)" if finetune["train_labelled"] else " (unlabelled: distillation only)")
             + f", {finetune['world_size']} process(es), {finetune['train_seconds']:.0f} s.", ""]
    if finetune["val_images"]:
        teacher = finetune["teacher"]
        lines += [f"Validation on {finetune['val_images']} images from `{finetune['val_data']}`; teacher (unreduced) "
                  f"{teacher['gmacs']:.3f} GMACs" + (f", top-1 {teacher['top1']:.2f}%" if "top1" in teacher else "") + ".", "",
                  "| configuration | GMACs | top-1 before | top-1 after | agreement before | agreement after | KL before | KL after |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in finetune["variants"]:
            b, a = v.get("before", {}), v.get("after", {})
            cell = lambda d, k, f: format(d[k], f) if k in d else "-"  # noqa: E731
            lines.append(f"| {v['label']} | {v['gmacs']:.3f} | {cell(b, 'top1', '.2f')} | {cell(a, 'top1', '.2f')} | "
                         f"{cell(b, 'agreement', '.2f')} | {cell(a, 'agreement', '.2f')} | {cell(b, 'kl', '.4f')} | {cell(a, 'kl', '.4f')} |")
    else:
        lines += ["| configuration | GMACs |", "|---|---|"] + [f"| {v['label']} | {v['gmacs']:.3f} |" for v in finetune["variants"]]
    return "\n".join(lines) + "\n"
