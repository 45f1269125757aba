"""Training and validation images: which files, timm's training augmentation, the training loader."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import timm.data
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from vitprune.data import (
    ImageDataset,
    ImageSet,
    StoredImage,
    check_labels,
    collate_images,
    data_config_for,
    leave_stops_to_main,
    open_image,
    split,
)
from vitprune.errors import VitpruneError
from vitprune.finetune.distributed import Distributed
from vitprune.timm_datasets import DatasetOptions, find_image_set

VERIFY_CHUNK = 256  # images verified per batch of threads


@dataclass(frozen=True)
class DataOptions:
    """Where the images come from and how they are batched (the request's fields of the same names)."""

    data: Path | str  # an image folder or a dataset timm reads (vitprune.timm_datasets)
    val: Path | str | None
    val_split: float | None  # hold out this fraction of `data` for validation
    limit: int | None
    seed: int
    batch_size: int  # per process
    eval_batch_size: int
    workers: int
    crop_scale: float  # smallest random-resized-crop area (timm's default)
    augment: bool  # False: timm's un-augmented train transform (resize + centre crop)
    auto_augment: str | None  # a timm AutoAugment/RandAugment policy, e.g. "rand-m9-mstd0.5"
    split: str | None = None  # how a dataset is read (vitprune.timm_datasets.DatasetOptions)
    label_field: str | None = None
    image_field: str | None = None

    def dataset_options(self) -> DatasetOptions:
        return DatasetOptions(split=self.split, label_field=self.label_field, image_field=self.image_field)


@dataclass(frozen=True)
class TrainingImages:
    """The training images and the held-out ones (None: no validation)."""

    train: ImageSet
    val: ImageSet | None = None
    val_path: str | None = None  # what the report says the validation images are

    @property
    def labelled(self) -> bool:
        return self.train.labels is not None


def find_training_images(options: DataOptions) -> TrainingImages:
    """The training images, and the validation images from `val` or held out of `data` by `val_split`."""
    read = options.dataset_options()
    train = find_image_set(options.data, read, limit=options.limit, seed=options.seed)
    if options.val is not None:
        return TrainingImages(train, find_image_set(options.val, read), str(options.val))
    if options.val_split is not None:
        train, val = split(train, options.val_split, options.seed)
        return TrainingImages(train, val, f"{options.data} (held-out {options.val_split:g}, seed {options.seed})")
    return TrainingImages(train)


def check_images(images: TrainingImages, num_classes: int, world_size: int) -> None:
    """Labels the model can predict, and at least one training image per process."""
    for image_set in (images.train, images.val):
        if image_set is not None:
            check_labels(image_set, num_classes)
    if len(images.train) < world_size:
        raise VitpruneError(f"{len(images.train)} training images cannot feed {world_size} processes")


def verify_images(images: TrainingImages, workers: int) -> None:
    """Every training and validation image opens and passes PIL's verify (a fast check, no full
    decode), before the first step: a bad file is named now, not hours into the run."""
    files = [*images.train.files, *(images.val.files if images.val is not None else [])]
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # refused by the loader too
        for start in range(0, len(files), VERIFY_CHUNK):  # in chunks: a bad file stops the pass early
            for problem in pool.map(_verify_image, files[start:start + VERIFY_CHUNK]):
                if problem is not None:
                    raise VitpruneError(problem)


def _verify_image(file: Path | StoredImage) -> str | None:
    try:
        with open_image(file) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for corrupt, truncated or non-image files
        return f"cannot read image {file}: {_first_line(error)}"
    return None


def train_transform(model: nn.Module, crop_scale: float, augment: bool = True,
                    auto_augment: str | None = None) -> Callable[[Image.Image], Tensor]:
    """timm's training augmentation (random resized crop, flip, colour jitter or an AutoAugment /
    RandAugment policy) at the model's size. The teacher labels whatever the augmentation makes, so
    stronger augmentation turns a few images into many distinct training samples."""
    return timm.data.create_transform(**data_config_for(model), is_training=True, no_aug=not augment,
                                      scale=(crop_scale, 1.0), auto_augment=auto_augment)


def check_auto_augment(policy: str) -> None:
    """A policy timm understands ('rand-m9-mstd0.5', 'augmix-m5', 'original', 'v0', ...)."""
    try:
        timm.data.create_transform(32, is_training=True, auto_augment=policy)
    except Exception as error:  # timm raises several types for a policy it cannot parse
        raise VitpruneError(f"unknown auto_augment policy '{policy}' ({_first_line(error)}); "
                            "use e.g. rand-m9-mstd0.5", param="auto_augment") from None


def train_loader(image_set: ImageSet, transform: Callable[[Image.Image], Tensor], options: DataOptions,
                 job: Distributed) -> tuple[DataLoader, DistributedSampler]:
    """Freshly decoded and augmented batches every epoch, this process's share of the images."""
    dataset = ImageDataset(image_set, transform)
    sampler = DistributedSampler(dataset, num_replicas=job.world_size, rank=job.rank, shuffle=True,
                                 seed=options.seed)
    loader = DataLoader(dataset, batch_size=options.batch_size, sampler=sampler, num_workers=options.workers,
                        collate_fn=collate_images, pin_memory=job.device.type == "cuda",
                        persistent_workers=options.workers > 0, worker_init_fn=leave_stops_to_main)
    return loader, sampler


def _first_line(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__
