"""`finetune` as a library call: check the request, then distil the reduced model (or SuperViT's
variants) from the unreduced one and write the artifact.

    request = FinetuneRequest(model="out/evit", data=Path("train/"), val=Path("val/"), output=Path("ft/"))
    result = run_finetune(request)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from vitprune.checks import check_finite, check_whole
from vitprune.commands.common import ReducedModelSpec, check_device, check_memory, resolve_plan
from vitprune.errors import VitpruneError
from vitprune.finetune import (
    AMP_DTYPES,
    DataOptions,
    FinetuneConfig,
    FinetuneResult,
    LossWeights,
    OutputOptions,
    TrainOptions,
    Variant,
    before_after_table,
    bound_settings,
    check_auto_augment,
    check_work_dir,
    distributed_job,
    find_training_images,
    fit,
    grid_variants,
    seed_everything,
    single_variant,
)
from vitprune.source import BaseModel, load_base
from vitprune.timm_datasets import DatasetOptions

LOSS_WEIGHTS = ("distill_weight", "label_weight", "hard_distill", "feature_distill")

__all__ = ["FinetuneRecipe", "FinetuneRequest", "FinetuneResult", "before_after_table", "run_finetune"]


@dataclass(kw_only=True)
class FinetuneRecipe:
    """How the reduced model is trained: the optimisation, the loss and the augmentation. The
    defaults are the measured recipe (docs/finetune.md); `finetune` and calibrate's fine-tuning
    stage take the same fields."""

    epochs: int = 8
    batch_size: int = 32  # per process
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    warmup_lr: float = 1e-6
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    temperature: float = 1.0
    distill_weight: float = 1.0
    label_weight: float = 0.0
    hard_distill: float = 0.0  # weight of cross-entropy with the teacher's top-1 (DeiT's hard distillation)
    feature_distill: float = 1.0  # weight of the relative MSE to the teacher's pre-logits features
    crop_scale: float = 0.5  # smallest random-resized-crop area (timm's default is 0.08)
    augment: bool = True  # False: timm's un-augmented train transform (resize + centre crop)
    auto_augment: str | None = None  # a timm AutoAugment/RandAugment policy, e.g. "rand-m9-mstd0.5"
    trainable: tuple[str, ...] = ("*norm*", "*bias")  # parameter-name patterns to train (fnmatch); "*" for all
    dtype: str = "float32"  # bfloat16 / float16: mixed precision (autocast), CUDA only
    ema: float | None = None  # EMA decay; the EMA weights are validated and saved

    def check_recipe(self) -> None:
        """Every number of the recipe, before any model is built or image read."""
        self._check_optimisation()
        self._check_losses()
        check_finite(self.crop_scale, "crop_scale", low=0, high=1, low_open=True, rule="in (0, 1]")
        if self.auto_augment is not None:
            if not self.augment:
                raise VitpruneError("auto_augment is an augmentation: it cannot go with augment off",
                                    param="auto_augment")
            check_auto_augment(self.auto_augment)
        if self.dtype not in AMP_DTYPES:
            raise VitpruneError(f"dtype must be one of {', '.join(AMP_DTYPES)}, got {self.dtype!r}", param="dtype")

    def recipe(self) -> dict:
        """The recipe's fields and values (to build another request with the same recipe)."""
        return {item.name: getattr(self, item.name) for item in fields(FinetuneRecipe)}

    def _check_optimisation(self) -> None:
        check_whole(self.epochs, "epochs", 1)
        check_whole(self.batch_size, "batch_size", 1)
        check_finite(self.lr, "lr", low=0, low_open=True, rule="a finite number > 0")
        for name in ("min_lr", "warmup_lr", "weight_decay"):
            check_finite(getattr(self, name), name, low=0, rule="a finite number >= 0")
        check_finite(self.warmup_epochs, "warmup_epochs", low=0, high=self.epochs, high_open=True,
                     rule=f"a finite number >= 0 and < epochs ({self.epochs})")
        check_finite(self.clip_grad, "clip_grad", low=0, rule="a finite number >= 0 (0 turns clipping off)")
        if self.ema is not None:
            check_finite(self.ema, "ema", low=0, high=1, low_open=True, high_open=True, rule="a decay in (0, 1), e.g. 0.999")
        if not self.trainable:
            raise VitpruneError("trainable needs at least one parameter-name pattern", param="trainable")

    def _check_losses(self) -> None:
        check_finite(self.temperature, "temperature", low=0, low_open=True, rule="a finite number > 0")
        for name in LOSS_WEIGHTS:
            check_finite(getattr(self, name), name, low=0, rule="a finite number >= 0")
        if not any(getattr(self, name) > 0 for name in LOSS_WEIGHTS):
            raise VitpruneError(f"the loss weights ({', '.join(LOSS_WEIGHTS)}) cannot all be 0", param=tuple(LOSS_WEIGHTS))


@dataclass(kw_only=True)
class FinetuneRequest(ReducedModelSpec, DatasetOptions, FinetuneRecipe):
    """Everything `vitprune finetune` takes; the same fields as its options.

    The model and reduction fields are `apply`'s (an apply artifact folder brings its own plan); the
    training fields are the recipe's (`FinetuneRecipe`)."""

    data: Path | str  # an image folder or a dataset timm reads (hfds/..., wds/... held in memory: bound it with limit)
    output: Path | None = None
    # SuperViT: every size x keep rate trained at once
    supervit: bool = False
    sizes: tuple[int, ...] = ()
    keeps: tuple[float, ...] = ()
    # data
    val: Path | str | None = None  # read like data (the same split, label_field, image_field)
    val_split: float | None = None  # hold out this fraction of `data` for validation
    limit: int | None = None
    seed: int = 0
    # running
    workers: int = 2
    eval_batch_size: int = 64
    device: str = "cpu"
    force: bool = False
    resume: bool = False
    keep_checkpoint: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every number and combination of options, before any model is built or image read."""
        self.check_reduction()
        self.check_recipe()
        self._check_data()
        self._check_running()
        self._check_supervit()

    def _check_data(self) -> None:
        check_whole(self.seed, "seed")
        self.check_data_options(self.data)
        if self.features:
            raise VitpruneError("finetune distils a classifier's logits; features (an embedding model) is for "
                                "apply, calibrate and export", param="features")
        if self.limit is not None:
            check_whole(self.limit, "limit", 1)
        if self.val_split is not None:
            check_finite(self.val_split, "val_split", low=0, high=1, low_open=True, high_open=True,
                         rule="a fraction in (0, 1)")
            if self.val is not None:
                raise VitpruneError("give val or val_split, not both", param="val_split")

    def _check_running(self) -> None:
        check_whole(self.workers, "workers", 0)
        check_whole(self.eval_batch_size, "eval_batch_size", 1)
        check_device(self.device)
        if self.dtype != "float32" and not self.device.startswith("cuda"):
            raise VitpruneError(f"dtype {self.dtype} (mixed precision) is for CUDA GPUs; on the CPU train in float32",
                                param="dtype")
        if self.resume and self.output is None:
            raise VitpruneError("resume continues the run writing to output: give an output", param=("resume", "output"))

    def _check_supervit(self) -> None:
        if not self.supervit:
            if self.sizes or self.keeps:
                raise VitpruneError("sizes and keeps are for supervit", param=("sizes", "keeps", "supervit"))
            return
        if self.method is not None or self.plan_file is not None:
            raise VitpruneError("supervit builds its own EViT plans from sizes and keeps: drop the method or "
                                "plan_file", param=("supervit", "method", "plan_file"))
        for name, example in (("sizes", "160,192,224"), ("keeps", "0.5,0.7,1.0")):
            values = getattr(self, name)
            if not values:
                raise VitpruneError(f"supervit needs {name} (e.g. {example})", param=name)
            if len(set(values)) != len(values):
                raise VitpruneError(f"{name} must not repeat a value, got {values}", param=name)
        for size in self.sizes:
            check_whole(size, "sizes", 1)
        for keep in self.keeps:
            check_finite(keep, "keeps", low=0, high=1, low_open=True, rule="keep rates in (0, 1]")
        if len(self.sizes) * len(self.keeps) < 2:
            raise VitpruneError("SuperViT trains several configurations: give at least two sizes or two keeps",
                                param="sizes")

    def config(self) -> FinetuneConfig:
        """The feature's view of the request: the same fields, grouped by the step that uses them."""
        return FinetuneConfig(data=_pick(DataOptions, self), train=_pick(TrainOptions, self),
                              losses=_pick(LossWeights, self), output=_pick(OutputOptions, self),
                              supervit=self.supervit, settings=bound_settings(asdict(self)))


def run_finetune(request: FinetuneRequest) -> FinetuneResult:
    """Train the reduced model (or the SuperViT variants) by distillation; write the artifact on rank 0."""
    request.check()
    config = request.config()
    with distributed_job(request.device) as job:
        images = find_training_images(config.data)
        work = check_work_dir(request.output, force=request.force, resume=request.resume)
        seed_everything(request.seed)  # the same random init on every rank (no_pretrained)
        base = load_base(request.model, request.checkpoint, request.no_pretrained, request.img_size)
        check_memory(base.model, request.device, eval_batch_size=request.eval_batch_size)
        return fit(config, base, _variants(request, base), images, job, work)


def _variants(request: FinetuneRequest, base: BaseModel) -> list[Variant]:
    """SuperViT's grid, or the one plan the request (or the artifact it names) asks for."""
    if request.supervit:
        return grid_variants(base.model, request.sizes, request.keeps)
    return [single_variant(resolve_plan(request, base), base.model)]


def _pick(options: type, request: FinetuneRequest):
    """An options dataclass filled from the request's fields of the same names."""
    return options(**{field.name: getattr(request, field.name) for field in fields(options)})
