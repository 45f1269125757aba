"""Image folders, timm preprocessing, the image dataset and batched prediction."""

from __future__ import annotations

import csv
import io
import random
import re
import signal
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitprune.checks import is_whole
from vitprune.errors import VitpruneError
from vitprune.progress import progress_bar

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LABELS_CSV_NAME = "labels.csv"
LABELS_CSV_COLUMNS = ("file", "class_index")
WNID_PATTERN = re.compile(r"n\d{8}")


class StoredImage:
    """An image held by a dataset rather than a file of its own (vitprune.timm_datasets): str()
    names it in messages, open() decodes it."""

    def open(self) -> Image.Image:
        raise NotImplementedError


@dataclass(frozen=True)
class ImageSet:
    """Image files in a fixed order, with their class indices when the folder layout gives them."""

    files: list[Path | StoredImage]
    labels: list[int] | None
    layout: str  # 'imagefolder', 'labels_csv', 'unlabelled', or the kind of dataset (vitprune.timm_datasets)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> ImageSet:
        labels = [self.labels[i] for i in indices] if self.labels is not None else None
        return ImageSet([self.files[i] for i in indices], labels, self.layout)


def find_images(path: str | Path, limit: int | None = None, seed: int = 0) -> ImageSet:
    """List the images under ``path`` (ImageFolder, flat folder with labels.csv, or plain images).

    With ``limit``, keep a random subset of that size chosen by ``seed``, in the original order.
    """
    root = Path(path)
    if not root.exists():
        raise VitpruneError(f"image folder not found: {root}")
    if not root.is_dir():
        raise VitpruneError(f"image folder not found: {root} is a file, not a folder")
    image_set = _scan_folder(root)
    if not image_set.files:
        raise VitpruneError(f"no images found in {root}")
    return random_subset(image_set, limit, seed)


def _scan_folder(root: Path) -> ImageSet:
    labels_csv = root / LABELS_CSV_NAME
    if labels_csv.is_file():
        return _read_labels_csv(root, labels_csv)
    class_dirs = sorted(entry for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    loose_images = _images_in(root, recursive=False)
    class_images = {class_dir: _images_in(class_dir, recursive=True) for class_dir in class_dirs}
    if not any(class_images.values()):
        return ImageSet(loose_images, None, "unlabelled")
    if loose_images:
        raise VitpruneError(
            f"{root} mixes loose images (e.g. {loose_images[0].name}) with class sub-folders; "
            "use one layout: class sub-folders, labels.csv, or only loose images"
        )
    return _image_folder(root, class_images)


def _images_in(folder: Path, *, recursive: bool) -> list[Path]:
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        file
        for file in candidates
        if file.suffix.lower() in IMAGE_EXTENSIONS and not file.name.startswith(".") and file.is_file()
    )


def _image_folder(root: Path, class_images: dict[Path, list[Path]]) -> ImageSet:
    index_by_name = class_indices(root, [class_dir.name for class_dir in class_images])
    files: list[Path] = []
    labels: list[int] = []
    for class_dir, images in class_images.items():
        files.extend(images)
        labels.extend([index_by_name[class_dir.name]] * len(images))
    return ImageSet(files, labels, "imagefolder")


def class_indices(root: Path | str, names: list[str]) -> dict[str, int]:
    """ImageNet-1k index for wnid folders, the number for '0'..'999' folders, else sorted order (torchvision)."""
    imagenet_index = {wnid: index for index, wnid in enumerate(timm.data.ImageNetInfo().label_names())}
    if all(name in imagenet_index for name in names):
        return {name: imagenet_index[name] for name in names}
    if all(name.isascii() and name.isdigit() for name in names):
        return {name: int(name) for name in names}
    wnid_like = [name for name in names if WNID_PATTERN.fullmatch(name)]
    if wnid_like:
        # A stray folder among wnid folders would silently shift every label to sorted order.
        other = next(name for name in names if name not in imagenet_index)
        raise VitpruneError(
            f"{root} has ImageNet wnid class folders but {other!r} is not an ImageNet-1k wnid; "
            "name every class folder by wnid, by class index, or none of them"
        )
    return {name: index for index, name in enumerate(sorted(names))}


def _read_labels_csv(root: Path, labels_csv: Path) -> ImageSet:
    try:
        reader = csv.DictReader(io.StringIO(labels_csv.read_text(encoding="utf-8-sig")))
        columns = reader.fieldnames or []
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise VitpruneError(f"cannot read {labels_csv}: {_first_line(error)}") from error
    if not set(LABELS_CSV_COLUMNS) <= set(columns):
        found = ", ".join(name for name in columns if name) or "none"
        raise VitpruneError(f"{labels_csv} needs the columns {','.join(LABELS_CSV_COLUMNS)} (found: {found})")
    if not rows:
        raise VitpruneError(f"no images listed in {labels_csv}")
    entries: dict[Path, tuple[int, int]] = {}  # file (resolved) -> (class, the line that first listed it)
    files: dict[Path, Path] = {}
    for line, row in enumerate(rows, start=2):
        file, label = _labels_csv_entry(root, labels_csv, line, row)
        key = file.resolve()
        if key in entries and entries[key][0] != label:
            raise VitpruneError(f"{labels_csv} line {line} lists {file.name} as class {label}, but line "
                                f"{entries[key][1]} lists it as class {entries[key][0]}: give each file one class")
        # An exact repeat (same file, same class) says the same thing twice: the image counts once.
        entries.setdefault(key, (label, line))
        files.setdefault(key, file)
    ordered = sorted(entries, key=lambda key: files[key])
    return ImageSet([files[key] for key in ordered], [entries[key][0] for key in ordered], "labels_csv")


def _labels_csv_entry(root: Path, labels_csv: Path, line: int, row: dict[str, Any]) -> tuple[Path, int]:
    name = (row.get("file") or "").strip()
    class_index = (row.get("class_index") or "").strip()
    if not class_index.isascii() or not class_index.isdigit():
        raise VitpruneError(f"{labels_csv} line {line}: class_index {class_index!r} is not a non-negative integer")
    file = root / name
    if not name or not file.is_file():
        raise VitpruneError(f"{labels_csv} line {line} names a missing file: {name!r}")
    return file, int(class_index)


def random_subset(image_set: ImageSet, limit: int | None, seed: int) -> ImageSet:
    if limit is None:
        return image_set
    if not is_whole(limit, 1):
        raise VitpruneError(f"image limit must be a positive integer, got {limit!r}")
    if limit >= len(image_set):
        return image_set
    chosen = sorted(random.Random(seed).sample(range(len(image_set)), limit))
    return image_set.subset(chosen)


def check_labels(image_set: ImageSet, num_classes: int) -> None:
    """Every label names one of the model's classes (checked when the images are listed)."""
    if image_set.labels is None or num_classes <= 0:
        return
    worst = max(range(len(image_set)), key=lambda index: image_set.labels[index])
    if image_set.labels[worst] >= num_classes:
        raise VitpruneError(f"{image_set.files[worst]} is labelled class {image_set.labels[worst]}, but the model "
                            f"has {num_classes} classes (0..{num_classes - 1})")


def split(image_set: ImageSet, holdout_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Deterministic random split into (calibration, holdout); both keep the original order."""
    if not 0.0 < holdout_fraction < 1.0:
        raise VitpruneError(f"holdout fraction must be between 0 and 1, got {holdout_fraction!r}")
    count = len(image_set)
    if count < 2:
        raise VitpruneError(f"need at least 2 images to split into calibration and holdout, got {count}")
    holdout_count = min(max(round(count * holdout_fraction), 1), count - 1)
    shuffled = random.Random(seed).sample(range(count), count)
    holdout = sorted(shuffled[:holdout_count])
    calibration = sorted(shuffled[holdout_count:])
    return image_set.subset(calibration), image_set.subset(holdout)


def data_config_for(model: nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing config for ``model``, with input_size matching the size it was built at."""
    config = dict(timm.data.resolve_model_data_config(model))
    # the size it was built at: a ViT's patch embedding's, a NaFlexVit's img_size (None: any size, the cfg's)
    built_size = (getattr(getattr(model, "patch_embed", None), "img_size", None)
                  or getattr(getattr(model, "embeds", None), "default_img_size", None))
    if built_size is not None:
        # timm keeps the pretrained cfg's input_size (224) when a model is built with img_size=160.
        config["input_size"] = (config["input_size"][0], *built_size)
    return config


def transform_for(model: nn.Module, img_size: int | None = None) -> Callable[[Image.Image], Tensor]:
    """timm's eval transform for ``model``; ``img_size`` changes the crop size, keeping timm's crop_pct."""
    config = data_config_for(model)
    if img_size is not None:
        if not is_whole(img_size, 1):
            raise VitpruneError(f"img_size must be a positive integer, got {img_size!r}", param="img_size")
        config["input_size"] = (config["input_size"][0], img_size, img_size)
    return timm.data.create_transform(**config, is_training=False)


class ImageDataset(Dataset):
    """The one image dataset: decodes (and transforms) one image per item; unlabelled images get
    label -1. A bad file yields an error message instead of raising in a worker, whose exception
    DataLoader would re-raise with a multi-line traceback."""

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
            with warnings.catch_warnings():
                # a decompression-bomb warning is refused as an error, not printed as a warning
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with open_image(file) as image:
                    rgb = image.convert("RGB")
        except Exception as error:  # PIL raises many types for corrupt, truncated or non-image files
            return None, label, f"cannot read image {file}: {_first_line(error)}"
        try:
            return self.transform(rgb), label, None
        except Exception as error:  # e.g. a random augmentation op Pillow refuses
            return None, label, f"cannot transform image {file}: {_first_line(error)}"


def leave_stops_to_main(_worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker ignores Ctrl-C and SIGTERM (a terminal sends them to every
    process of the job), so that only the main process answers with its one line and stops the
    workers; a worker keeping the CLI's handler would print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def open_image(file: Path | StoredImage) -> Image.Image:
    """A file of the image set, opened (not yet decoded for a file)."""
    return file.open() if isinstance(file, StoredImage) else Image.open(file)


def collate_images(samples: list[tuple[Tensor | None, int, str | None]]) -> tuple[Tensor | None, Tensor | None, str | None]:
    """(images, labels, None), or (None, None, the first error) when an image failed."""
    errors = [error for _, _, error in samples if error is not None]
    if errors:
        return None, None, errors[0]
    return torch.stack([image for image, _, _ in samples]), torch.tensor([label for _, label, _ in samples]), None


def resize_images(images: Tensor, size: int) -> Tensor:
    """A preprocessed batch at another input size, unchanged when it fits. Bicubic with
    antialiasing, timm's eval interpolation for these models (cascade stages, SuperViT sizes)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def load_images(
    image_set: ImageSet,
    transform: Callable[[Image.Image], Tensor],
    *,
    num_workers: int = 2,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Decode and preprocess every image into one float tensor [N, 3, H, W], plus the labels tensor or None."""
    loader = DataLoader(
        ImageDataset(image_set, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_images,
        worker_init_fn=leave_stops_to_main,
    )
    images: Tensor | None = None
    filled = 0
    with progress_bar(progress) as bar:
        task = bar.add_task("Loading images", total=len(image_set))
        for batch, _, error in loader:
            if error is not None:
                raise VitpruneError(error)
            if images is None:
                images = torch.empty((len(image_set), *batch.shape[1:]), dtype=batch.dtype)
            images[filled : filled + len(batch)] = batch
            filled += len(batch)
            bar.advance(task, len(batch))
    if images is None:
        raise VitpruneError("no images to load")
    labels = torch.tensor(image_set.labels, dtype=torch.long) if image_set.labels is not None else None
    return images, labels


def predict(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "Predicting",
) -> Tensor:
    """Logits of ``model`` on ``images`` (float32, on the CPU), computed in batches without autograd."""
    if len(images) == 0:
        raise VitpruneError("no images to predict")
    device = next(model.parameters()).device
    outputs = []
    with torch.inference_mode(), progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            logits = model(batch).float().cpu()
            if not torch.isfinite(logits).all():
                raise VitpruneError(f"the model gives non-finite logits (NaN or infinity) on images {start}.."
                                    f"{start + len(batch) - 1}: its weights or inputs are broken")
            outputs.append(logits)
            bar.advance(task, len(batch))
    return torch.cat(outputs)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
