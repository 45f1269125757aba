"""The images: split into calibration and held-out parts, preprocessed once per input size, the base
model's logits on both, and the three evaluators (search subset, validation, held-out)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from vitprune.calibrate.evaluate import Evaluator
from vitprune.calibrate.prepare import Setup
from vitprune.data import ImageSet, load_images, predict, split, transform_for
from vitprune.errors import VitpruneError
from vitprune.timm_datasets import DatasetOptions, find_image_set

# Finalists are re-ranked, and guarded, on the calibration images outside the search subset: plans
# the search selected on its subset look better there than they are. With fewer left than this,
# all calibration images are used (small image sets).
MIN_VALIDATION_IMAGES = 100


@dataclass
class ImageSplit:
    """The calibration and held-out images at every input size, and the base model's logits on them."""

    image_set: ImageSet
    calibration_set: ImageSet
    holdout_set: ImageSet
    calib_images: dict[int, Tensor]
    holdout_images: dict[int, Tensor]
    labels: Tensor | None
    holdout_labels: Tensor | None
    base_calib_logits: Tensor
    base_holdout_logits: Tensor

    @property
    def labelled(self) -> bool:
        """Labels in use (an embedding model's images are compared with the base only)."""
        return self.holdout_labels is not None


@dataclass
class Evaluators:
    search: Evaluator  # the search subset of the calibration images
    validation: Evaluator  # the other calibration images (all of them when too few are left)
    holdout: Evaluator  # the held-out images: every reported figure
    search_index: list[int]
    validation_index: list[int]


def split_images(data: Path | str, *, limit: int | None, holdout: float, seed: int, swap_split: bool,
                 options: DatasetOptions | None = None) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(all images, calibration part, held-out part); `swap_split` swaps the parts. From a dataset
    timm reads, the images (at most `limit`) are held while the search runs over them."""
    image_set = find_image_set(data, options or DatasetOptions(), limit=limit, seed=seed)
    calibration_set, holdout_set = split(image_set, holdout, seed)
    if swap_split:
        calibration_set, holdout_set = holdout_set, calibration_set
    return image_set, calibration_set, holdout_set


def check_objective(objective: str, image_set: ImageSet, data: Path) -> None:
    """The objective's data: top1 needs labels (an embedding objective needs none)."""
    if objective == "top1" and image_set.labels is None:
        raise VitpruneError(f"objective top1 needs labelled images, and {data} has no labels", param="objective")


def load_split(setup: Setup, sets: tuple[ImageSet, ImageSet, ImageSet], *, workers: int,
               progress: bool) -> ImageSplit:
    """Both parts preprocessed at every input size, and the base model's logits at its own size."""
    image_set, calibration_set, holdout_set = sets
    calib_images: dict[int, Tensor] = {}
    holdout_images: dict[int, Tensor] = {}
    labels = holdout_labels = None
    for size in setup.sizes:
        transform = transform_for(setup.base_model, img_size=None if size == setup.base_size else size)
        calib_images[size], labels = load_images(calibration_set, transform, num_workers=workers, progress=progress)
        holdout_images[size], holdout_labels = load_images(holdout_set, transform, num_workers=workers,
                                                           progress=progress)
    if setup.embedding:
        labels = holdout_labels = None
    base_calib_logits = predict(setup.base_model, calib_images[setup.base_size], progress=progress,
                                description="Base model, calibration images")
    base_holdout_logits = predict(setup.base_model, holdout_images[setup.base_size], progress=progress,
                                  description="Base model, held-out images")
    return ImageSplit(image_set=image_set, calibration_set=calibration_set, holdout_set=holdout_set,
                      calib_images=calib_images, holdout_images=holdout_images, labels=labels,
                      holdout_labels=holdout_labels, base_calib_logits=base_calib_logits,
                      base_holdout_logits=base_holdout_logits)


def make_evaluators(setup: Setup, images: ImageSplit, search_images: int, seed: int) -> Evaluators:
    """The search subset (a seeded sample of the calibration images), the validation images, the held-out ones."""
    count = len(images.calibration_set)
    search_index = sorted(random.Random(seed).sample(range(count), min(search_images, count)))
    searched = set(search_index)
    validation_index = [i for i in range(count) if i not in searched]
    if len(validation_index) < MIN_VALIDATION_IMAGES:
        validation_index = list(range(count))
    return Evaluators(search=_subset(setup, images, search_index, keep_all_sizes=True),
                      validation=_subset(setup, images, validation_index, keep_all_sizes=False),
                      holdout=Evaluator(setup.models, images.holdout_images, images.holdout_labels,
                                        images.base_holdout_logits, setup.macs, keep_all_sizes=False,
                                        embedding=setup.embedding),
                      search_index=search_index, validation_index=validation_index)


def _subset(setup: Setup, images: ImageSplit, index: list[int], *, keep_all_sizes: bool) -> Evaluator:
    labels = None if images.labels is None else images.labels[index]
    return Evaluator(setup.models, {size: tensor[index] for size, tensor in images.calib_images.items()}, labels,
                     images.base_calib_logits[index], setup.macs, keep_all_sizes=keep_all_sizes,
                     embedding=setup.embedding)
