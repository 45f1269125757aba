"""Image folders, timm preprocessing, batched prediction and classification metrics."""

from __future__ import annotations

import csv
import io
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.data
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from vitprune.errors import VitpruneError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LABELS_CSV_NAME = "labels.csv"
LABELS_CSV_COLUMNS = ("file", "class_index")
WNID_PATTERN = re.compile(r"n\d{8}")
TOP5 = 5


@dataclass(frozen=True)
class ImageSet:
    """Image files in a fixed order, with their class indices when the folder layout gives them."""

    files: list[Path]
    labels: list[int] | None
    layout: str  # 'imagefolder', 'labels_csv' or 'unlabelled'

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
    return _random_subset(image_set, limit, seed)


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
    index_by_name = _class_indices(root, [class_dir.name for class_dir in class_images])
    files: list[Path] = []
    labels: list[int] = []
    for class_dir, images in class_images.items():
        files.extend(images)
        labels.extend([index_by_name[class_dir.name]] * len(images))
    return ImageSet(files, labels, "imagefolder")


def _class_indices(root: Path, names: list[str]) -> dict[str, int]:
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
    entries = [_labels_csv_entry(root, labels_csv, line, row) for line, row in enumerate(rows, start=2)]
    entries.sort(key=lambda entry: entry[0])
    return ImageSet([file for file, _ in entries], [label for _, label in entries], "labels_csv")


def _labels_csv_entry(root: Path, labels_csv: Path, line: int, row: dict[str, Any]) -> tuple[Path, int]:
    name = (row.get("file") or "").strip()
    class_index = (row.get("class_index") or "").strip()
    if not class_index.isascii() or not class_index.isdigit():
        raise VitpruneError(f"{labels_csv} line {line}: class_index {class_index!r} is not a non-negative integer")
    file = root / name
    if not name or not file.is_file():
        raise VitpruneError(f"{labels_csv} line {line} names a missing file: {name!r}")
    return file, int(class_index)


def _random_subset(image_set: ImageSet, limit: int | None, seed: int) -> ImageSet:
    if limit is None:
        return image_set
    if not _is_positive_int(limit):
        raise VitpruneError(f"image limit must be a positive integer, got {limit!r}")
    if limit >= len(image_set):
        return image_set
    chosen = sorted(random.Random(seed).sample(range(len(image_set)), limit))
    return image_set.subset(chosen)


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
    patch_embed = getattr(model, "patch_embed", None)
    built_size = getattr(patch_embed, "img_size", None)
    if built_size is not None:
        # timm keeps the pretrained cfg's input_size (224) when a model is built with img_size=160.
        config["input_size"] = (config["input_size"][0], *built_size)
    return config


def transform_for(model: nn.Module, img_size: int | None = None) -> Callable[[Image.Image], Tensor]:
    """timm's eval transform for ``model``; ``img_size`` changes the crop size, keeping timm's crop_pct."""
    config = data_config_for(model)
    if img_size is not None:
        if not _is_positive_int(img_size):
            raise VitpruneError(f"img_size must be a positive integer, got {img_size!r}")
        config["input_size"] = (config["input_size"][0], img_size, img_size)
    return timm.data.create_transform(**config, is_training=False)


class _DecodedImages(Dataset):
    """Decodes one image per item; a bad file yields an error message instead of raising in a worker."""

    def __init__(self, files: list[Path], transform: Callable[[Image.Image], Tensor]) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, str | None]:
        file = self.files[index]
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except Exception as error:  # PIL raises many types for corrupt, truncated or non-image files
            return None, f"cannot read image {file}: {_first_line(error)}"
        return self.transform(rgb), None


def _collate_decoded(samples: list[tuple[Tensor | None, str | None]]) -> tuple[Tensor | None, str | None]:
    # DataLoader re-raises worker exceptions with a multi-line traceback, so errors travel as data instead.
    errors = [error for _, error in samples if error is not None]
    if errors:
        return None, errors[0]
    return torch.stack([image for image, _ in samples]), None


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
        _DecodedImages(image_set.files, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate_decoded,
    )
    images: Tensor | None = None
    filled = 0
    with _progress_bar(progress) as bar:
        task = bar.add_task("Loading images", total=len(image_set))
        for batch, error in loader:
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
    with torch.inference_mode(), _progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(images))
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device)
            outputs.append(model(batch).float().cpu())
            bar.advance(task, len(batch))
    return torch.cat(outputs)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )


def classification_metrics(
    logits: Tensor,
    labels: Tensor | None,
    reference_logits: Tensor | None,
) -> dict[str, float | int]:
    """top1/top5 (percent) against labels; agreement (percent) and mean KL(reference || model) against a reference."""
    _check_metric_inputs(logits, labels, reference_logits)
    metrics: dict[str, float | int] = {"n_images": len(logits)}
    if labels is not None:
        metrics.update(_accuracy(logits, labels))
    if reference_logits is not None:
        metrics.update(_agreement_and_kl(logits, reference_logits))
    return metrics


def _check_metric_inputs(logits: Tensor, labels: Tensor | None, reference_logits: Tensor | None) -> None:
    if logits.ndim != 2 or len(logits) == 0:
        raise VitpruneError(f"logits must be a non-empty [N, classes] tensor, got shape {list(logits.shape)}")
    if labels is not None:
        if labels.shape != (len(logits),):
            raise VitpruneError(f"labels shape {list(labels.shape)} does not match {len(logits)} logits")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise VitpruneError(
                f"labels range {int(labels.min())}..{int(labels.max())} "
                f"is outside the model's {logits.shape[1]} classes"
            )
    if reference_logits is not None and reference_logits.shape != logits.shape:
        raise VitpruneError(
            f"reference logits shape {list(reference_logits.shape)} does not match logits shape {list(logits.shape)}"
        )


def _accuracy(logits: Tensor, labels: Tensor) -> dict[str, float]:
    top_k = logits.topk(min(TOP5, logits.shape[1]), dim=1).indices
    hits = top_k == labels.unsqueeze(1)
    return {
        "top1": hits[:, 0].double().mean().item() * 100.0,
        "top5": hits.any(dim=1).double().mean().item() * 100.0,
    }


def _agreement_and_kl(logits: Tensor, reference_logits: Tensor) -> dict[str, float]:
    agreement = (logits.argmax(dim=1) == reference_logits.argmax(dim=1)).double().mean().item() * 100.0
    return {"agreement": agreement, "kl": kl_per_image(logits, reference_logits).mean().item()}


def kl_per_image(logits: Tensor, reference_logits: Tensor) -> Tensor:
    """KL(reference || model) of each image's predicted distribution: (N,) float64."""
    model_log_probs = F.log_softmax(logits.double(), dim=1)
    reference_log_probs = F.log_softmax(reference_logits.double(), dim=1)
    return F.kl_div(model_log_probs, reference_log_probs, log_target=True, reduction="none").sum(dim=1)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
