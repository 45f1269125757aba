"""Images from the datasets timm reads: Hugging Face datasets (`hfds/NAME`), WebDataset shards
(`wds/FOLDER` with a split), and .tar files of images, through `timm.data.create_dataset` and its
readers. A folder of images stays vitprune.data's.

Random-access datasets (hfds, .tar) become an ImageSet whose entries read one item each when
decoded: nothing is held in memory. WebDataset shards are streams. `stream_batches` reads any of
them, and image folders, batch by batch (every evaluation); an ImageSet of a stream (calibrate,
cascade, finetune) holds the decoded images, bounded by the image limit.
"""
from __future__ import annotations

import io
import itertools
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm.data
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

from vitprune.data import (
    ImageDataset,
    ImageSet,
    StoredImage,
    check_labels,
    class_indices,
    find_images,
    leave_stops_to_main,
    random_subset,
)
from vitprune.errors import VitpruneError

HFDS, WDS, TAR = "hfds", "wds", "tar"
PREFIXES = (f"{HFDS}/", f"{WDS}/")
HFDS_DEFAULT_SPLIT = "train"  # what datasets names the one split of local files
EXTRA_HINT = "pip install 'vitprune[data]'"

Batch = tuple[Tensor, Tensor | None, Tensor | None]  # images, images at the base model's size, labels


def dataset_kind(data: str | Path | None) -> str | None:
    """hfds, wds or tar for what timm's dataset readers read; None for a folder (or nothing)."""
    if data is None:
        return None
    text = str(data)
    for prefix in PREFIXES:
        if text.lower().startswith(prefix):
            return prefix[:-1]
    return TAR if text.lower().endswith(".tar") else None


@dataclass(kw_only=True)
class DatasetOptions:
    """How a dataset given as `data` is read (request fields of the commands that take images)."""

    split: str | None = None  # hfds: a split name (default train); wds: a split of _info.json or shard names
    label_field: str | None = None  # hfds: the label column (default label); wds: a field of the .json sidecar
    image_field: str | None = None  # hfds: the image column (default image); wds: the image extensions

    def check_data_options(self, data: str | Path | None) -> None:
        """The options fit the kind of data given (checked before any model is built)."""
        kind = dataset_kind(data)
        given = [name for name in ("split", "label_field", "image_field") if getattr(self, name) is not None]
        if kind in (None, TAR) and given:
            what = "a .tar file" if kind == TAR else "an image folder"
            raise VitpruneError(f"{given[0]} is for hfds/ and wds/ datasets, not {what}", param=given[0])
        if kind == WDS and self.split is None:
            raise VitpruneError("a wds/ dataset needs a split: a split named in its _info.json, or shard names "
                                "such as 'val-{000..009}.tar'", param="split")


def find_image_set(data: str | Path, options: DatasetOptions, *, limit: int | None = None,
                   seed: int = 0) -> ImageSet:
    """The images of a folder or a dataset, in a fixed order; `limit` keeps a seeded random subset
    (a folder or hfds/.tar) or the first images of the stream (wds)."""
    kind = dataset_kind(data)
    if kind is None:
        return find_images(data, limit=limit, seed=seed)
    options.check_data_options(data)
    if kind == WDS:
        return _held_images(str(data), options, limit)
    dataset = _create(str(data), options)
    reader = dataset.reader
    labels = _hfds_labels(str(data), reader, options) if kind == HFDS else _tar_labels(str(data), reader)
    files: list[Path | StoredImage] = [DatasetImage(reader, index, str(data)) for index in range(len(reader))]
    if not files:
        raise VitpruneError(f"no images in {data}", param="data")
    return random_subset(ImageSet(files, labels, kind), limit, seed)


class DatasetImage(StoredImage):
    """One item of a random-access timm reader, read when decoded."""

    def __init__(self, reader: Any, index: int, source: str) -> None:
        self.reader, self.index, self.source = reader, index, source

    def open(self) -> Image.Image:
        file, *_ = self.reader[self.index]
        with file:
            return Image.open(io.BytesIO(file.read()))

    def __str__(self) -> str:
        return f"{self.source} item {self.index}"


class HeldImage(StoredImage):
    """One decoded image of a stream, held in memory."""

    def __init__(self, image: Image.Image, name: str) -> None:
        self.image, self.name = image, name

    def open(self) -> Image.Image:
        return self.image.copy()  # the caller closes what it opens; the held image stays

    def __str__(self) -> str:
        return self.name


@dataclass
class ImageStream:
    """Batches read once as they are used, and how many images they hold when known before reading
    (not for a wds/ stream)."""

    batches: Iterator[Batch]
    count: int | None

    def __iter__(self) -> Iterator[Batch]:
        return self.batches


def stream_batches(data: str | Path, options: DatasetOptions, transforms: list[Callable[[Image.Image], Tensor]], *,
                   limit: int | None, seed: int = 0, batch_size: int, workers: int, num_classes: int = 0,
                   shard: tuple[int, int] = (0, 1), pin_memory: bool = False) -> ImageStream:
    """Preprocessed batches of an image folder or a dataset, one transform per model input size (one
    or two), decoded by `workers` DataLoader processes while the caller computes: (images, images for
    the second transform or None, labels or None). Nothing but the batches in flight is held.

    `shard` (rank, processes) gives this process a contiguous part of the images, without padding
    or repeats: the parts in rank order are the images in order (torchrun's evaluation)."""
    options.check_data_options(data)
    pair = _Pair(transforms)
    rank, processes = shard
    if dataset_kind(data) == WDS:
        if processes > 1:
            raise VitpruneError("a wds/ stream has no random access to split across processes: evaluate it in "
                                "one process, or give the images as a folder, hfds/ or .tar", param="data")
        dataset = _create(str(data), options)
        dataset.transform = pair
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate_stream,
                            pin_memory=pin_memory, worker_init_fn=leave_stops_to_main)
        return ImageStream(_checked(str(data), _first_images(loader, limit), must_yield=True), None)
    image_set = find_image_set(data, options, limit=limit, seed=seed)
    check_labels(image_set, num_classes)
    count = len(image_set)
    image_set = image_set.subset(range(count * rank // processes, count * (rank + 1) // processes))
    loader = DataLoader(ImageDataset(image_set, pair), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_items, pin_memory=pin_memory, worker_init_fn=leave_stops_to_main)
    batches = _unlabelled(loader) if image_set.labels is None else loader
    return ImageStream(_checked(str(data), batches, must_yield=False), len(image_set))


class _Pair:
    """The transform of each input size, applied to one image."""

    def __init__(self, transforms: list[Callable[[Image.Image], Tensor]]) -> None:
        self.transforms = transforms

    def __call__(self, image: Image.Image) -> tuple[Tensor, ...]:
        return tuple(transform(image) for transform in self.transforms)


def _collate_items(samples: list[tuple[tuple[Tensor, ...] | None, int, str | None]]) -> Batch | str:
    """vitprune.data.ImageDataset items: a batch, or the first error message."""
    error = next((error for _, _, error in samples if error is not None), None)
    if error is not None:
        return error
    return _stack([pair for pair, _, _ in samples], [label for _, label, _ in samples])


def _collate_stream(samples: list[tuple[tuple[Tensor, ...], int]]) -> Batch:
    return _stack([pair for pair, _ in samples], [label for _, label in samples])


def _stack(pairs: list[tuple[Tensor, ...]], labels: list[int]) -> Batch:
    images = torch.stack([pair[0] for pair in pairs])
    second = torch.stack([pair[1] for pair in pairs]) if len(pairs[0]) > 1 else None
    return images, second, torch.tensor(labels, dtype=torch.long)


def _unlabelled(batches: Iterable[Batch | str]) -> Iterator[Batch | str]:
    for batch in batches:
        yield batch if isinstance(batch, str) else (batch[0], batch[1], None)


def _first_images(batches: Iterable[Batch], limit: int | None) -> Iterator[Batch]:
    seen = 0
    for images, second, labels in batches:
        if limit is not None and seen + len(images) >= limit:
            keep = limit - seen
            yield images[:keep], None if second is None else second[:keep], labels[:keep]
            return
        seen += len(images)
        yield images, second, labels


def _checked(data: str, batches: Iterable[Batch | str], *, must_yield: bool) -> Iterator[Batch]:
    """The batches, with a reader's failure or a bad image as one VitpruneError (a bad image stops the
    run where it is met: docs/inputs.md); a stream that yields nothing is one too."""
    count = 0
    try:
        for batch in batches:
            if isinstance(batch, str):
                raise VitpruneError(batch)
            count += len(batch[0])
            yield batch
    except VitpruneError:
        raise
    except Exception as error:  # readers and DataLoader workers raise many types for bad shards and records
        raise VitpruneError(f"cannot read {data}: {_reason(error)}", param="data") from None
    if count == 0 and must_yield:
        raise VitpruneError(f"no images read from {data} (timm's WebDataset reader skips samples without an image "
                            "or without a label: a .cls file, or the label_field of the .json)", param="data")


def _create(data: str, options: DatasetOptions) -> Any:
    """timm's dataset for `data`, its errors as one VitpruneError."""
    kind = dataset_kind(data)
    if kind == TAR:
        if not Path(data).is_file():
            raise VitpruneError(f"dataset not found: {data}", param="data")
        name, root, kwargs = "", data, {"cache_tarfiles": False}  # an open tar shared by forked workers mixes reads
    elif kind == WDS:
        name, root, kwargs = f"{WDS}/", data[len(WDS) + 1:], {"split": options.split}
        if not Path(root).is_dir():
            raise VitpruneError(f"WebDataset folder not found: {root}", param="data")
    else:
        name, root, kwargs = data, None, {"split": options.split or HFDS_DEFAULT_SPLIT}
    try:
        if kind == HFDS:
            import datasets  # why: the optional data extra; its progress bars would break the one-line errors

            datasets.disable_progress_bars()
        dataset = timm.data.create_dataset(name, root=root, input_key=options.image_field,
                                           target_key=options.label_field, **kwargs)
    except ImportError as error:
        raise VitpruneError(f"reading {data} needs the {error.name or 'datasets/webdataset'} package: {EXTRA_HINT}",
                            param="data") from None
    except Exception as error:  # timm and datasets raise many types for unknown names, splits and columns
        param = "split" if "split" in str(error).lower() else "data"
        raise VitpruneError(f"cannot read {data}: {_reason(error)}", param=param) from None
    if kind == WDS:
        _check_shards(root, dataset.reader.split_info.filenames)
    return dataset


def _check_shards(root: str, names: Iterable[str]) -> None:
    """Every shard is a readable tar: timm's WebDataset reader would skip a bad one with a warning."""
    for name in names:
        shard = os.path.join(root, name)
        if not os.path.isfile(shard) or not tarfile.is_tarfile(shard):
            raise VitpruneError(f"unreadable WebDataset shard {shard}: "
                                + ("no such file" if not os.path.isfile(shard) else "not a tar file"), param="data")


def _hfds_labels(data: str, reader: Any, options: DatasetOptions) -> list[int] | None:
    field = options.label_field or "label"
    columns = reader.dataset.column_names
    if field.split("/")[0] not in columns:
        if options.label_field is None:
            return None  # no label column: unlabelled images (agreement and KL only)
        raise VitpruneError(f"{data} has no label field {field!r} (its fields: {', '.join(columns)})",
                            param="label_field")
    labels = list(reader.iter_targets())
    if not all(isinstance(label, int) for label in labels):
        raise VitpruneError(f"{data}: label field {field!r} does not hold class indices (e.g. {labels[0]!r})",
                            param="label_field")
    return labels


def _tar_labels(data: str, reader: Any) -> list[int] | None:
    """Class folders inside the tar name the classes as in an image folder (ImageNet wnids, indices, sorted)."""
    names = reader.class_idx_to_name
    if list(names.values()) == [""]:
        return None  # loose images: unlabelled
    index = class_indices(data, list(names.values()))
    return [index[names[int(target)]] for target in reader.targets]


def _held_images(data: str, options: DatasetOptions, limit: int | None) -> ImageSet:
    """The first `limit` images of a stream, decoded and held."""
    dataset = _create(data, options)
    files: list[Path | StoredImage] = []
    labels: list[int] = []
    try:
        for index, (image, label) in enumerate(itertools.islice(dataset, limit)):
            files.append(HeldImage(image, f"{data} sample {index}"))
            labels.append(int(label))
    except Exception as error:  # readers raise many types for bad shards and records
        raise VitpruneError(f"cannot read {data}: {_reason(error)}", param="data") from None
    if not files:
        raise VitpruneError(f"no images read from {data} (timm's WebDataset reader skips samples without an image "
                            "or without a label: a .cls file, or the label_field of the .json)", param="data")
    return ImageSet(files, labels, WDS)


def _reason(error: BaseException) -> str:
    """The useful line of an error; a DataLoader worker's error is its last line (the original error)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "DataLoader worker" in lines[0] else lines[0]
