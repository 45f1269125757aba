"""`show` as a library call: the token maps of a reduced model, or a cascade's exits, as one PNG."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from vitprune.api import load
from vitprune.cascade import CASCADE_FILE, CascadeModel
from vitprune.checks import check_whole
from vitprune.commands.common import ReducedModelSpec, build_reduced, check_device
from vitprune.data import IMAGE_EXTENSIONS, ImageSet, find_images, load_images, transform_for
from vitprune.errors import VitpruneError
from vitprune.io import atomic_output_file, writable_parent
from vitprune.show import cascade_exits_png, token_maps_png

NAME_CHARS = 28  # file names in the image titles are cut to this length


@dataclass(kw_only=True)
class ShowRequest(ReducedModelSpec):
    """Everything `vitprune show` takes; the same fields as its options. `model` may also be a
    cascade folder (written by `vitprune cascade`): then its exits are drawn."""

    images: Path
    output: Path
    limit: int = 8
    workers: int = 2
    device: str = "cpu"
    force: bool = False

    @property
    def is_cascade(self) -> bool:
        return (Path(self.model) / CASCADE_FILE).is_file()

    def check(self) -> None:
        """Every setting, before any model is built or image read."""
        if self.is_cascade:
            self._check_cascade_options()
        else:
            self.check_reduction()
        check_whole(self.limit, "limit", 1)
        check_whole(self.workers, "workers", 0)
        check_device(self.device)
        if not Path(self.images).exists():
            raise VitpruneError(f"images {self.images} not found", param="images")
        if Path(self.images).is_file() and Path(self.images).suffix.lower() not in IMAGE_EXTENSIONS:
            raise VitpruneError(f"{self.images} is not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))})",
                                param="images")
        output = Path(self.output)
        if output.suffix.lower() != ".png":
            raise VitpruneError(f"output {output} must be a .png file", param="output")
        if output.is_dir():
            raise VitpruneError(f"output {output} is a folder; give a .png file", param="output")
        if output.exists() and not self.force:
            raise VitpruneError(f"output file {output} already exists; pass force to replace it", param=("output", "force"))
        writable_parent(output)

    def _check_cascade_options(self) -> None:
        given = {"method": self.method, "plan_file": self.plan_file, "checkpoint": self.checkpoint,
                 "img_size": self.img_size, **self.settings()}
        given.update({"layers": self.layers, "head_only": self.head_only or None,
                      "no_pretrained": self.no_pretrained or None})
        name = next((key for key, value in given.items() if value is not None), None)
        if name is not None:
            raise VitpruneError(f"{name} does not apply to a cascade folder: it carries its stages and weights",
                                param=name)


@dataclass
class ShowResult:
    output: Path
    kind: str  # 'tokens' or 'cascade'
    images: int
    model: nn.Module


def run_show(request: ShowRequest) -> ShowResult:
    """Draw the token maps (a model or artifact) or the exit grid (a cascade folder) into `output`."""
    request.check()
    if request.is_cascade:
        model = load(request.model, device=request.device)
        transform, draw, kind = model.transform(), cascade_exits_png, "cascade"
    else:
        _, _, model = build_reduced(request)
        model = model.to(request.device).eval()
        transform, draw, kind = transform_for(model), token_maps_png, "tokens"
    image_set = image_files(Path(request.images), request.limit)
    images, _ = load_images(image_set, transform, num_workers=request.workers, progress=False)  # a few images
    png = draw(model, images, [_short(file.stem) for file in image_set.files])
    with atomic_output_file(request.output, force=request.force) as tmp:
        tmp.write_bytes(png)
    return ShowResult(output=Path(request.output), kind=kind, images=len(images), model=model)


def image_files(path: Path, limit: int | None) -> ImageSet:
    """One image file, or the images of a folder (a fixed random subset of `limit`, as everywhere)."""
    if path.is_file():
        return ImageSet([path], None, "unlabelled")
    return find_images(path, limit=limit)


def describe_result(result: ShowResult) -> str:
    if isinstance(result.model, CascadeModel):
        return f"{result.images} images by exit stage of {result.model.describe()}"
    return f"{result.images} images, token maps of {result.model.vitprune_plan.describe()}"


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "~"
