"""The steps every command shares, as a library: get the base model, get the images, run `apply`.

Commands in `vitprune.cli` are thin wrappers around these; Python users can call them directly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.plan import Plan


@dataclass
class BaseModel:
    """The unreduced model a command starts from, and the plan of the artifact it came from."""

    model: nn.Module
    info: dict
    artifact_plan: Plan | None = None


def is_artifact(source: str) -> bool:
    path = Path(source)
    return (path.is_dir() and (path / "vitprune.json").is_file()) or (path.is_file() and path.suffix == ".safetensors")


def load_base(source: str, checkpoint: Path | None, no_pretrained: bool, img_size: int | None) -> BaseModel:
    """A model name (with --checkpoint / --no-pretrained) or an artifact (its base weights + plan)."""
    from vitprune.artifact import identity_info, load, read_metadata
    from vitprune.models import create_model
    from vitprune.patch import plan_of, remove_plan

    if checkpoint is not None and no_pretrained:
        raise VitpruneError("--checkpoint and --no-pretrained contradict each other")
    if is_artifact(source):
        if checkpoint is not None:
            raise VitpruneError("an artifact carries its own weights; --checkpoint applies to model names only")
        metadata = read_metadata(source)
        model = load(source)
        plan = plan_of(model)
        remove_plan(model)
        if img_size is not None and img_size != metadata["model"]["img_size"]:
            model.set_input_size(img_size=img_size)
        return BaseModel(model=model, info=identity_info(metadata), artifact_plan=plan)
    if Path(source).exists() and not is_artifact(source):
        raise VitpruneError(f"{source} is not a vitprune artifact (no vitprune.json); give a timm model name and --checkpoint {source}")
    model, info = create_model(source, pretrained=not no_pretrained, checkpoint=checkpoint, img_size=img_size)
    return BaseModel(model=model, info=info)


def load_images_for(model: nn.Module, data: Path, *, limit: int | None, workers: int, img_size: int | None = None,
                    batch_size: int = 64, progress: bool = True):
    """(images, labels or None, ImageSet) preprocessed with timm's data config for `model`."""
    from vitprune.data import find_images, load_images, transform_for

    image_set = find_images(data, limit=limit)
    images, labels = load_images(image_set, transform_for(model, img_size=img_size), num_workers=workers,
                                 batch_size=batch_size, progress=progress)
    return images, labels, image_set



@dataclass(kw_only=True)
class ReducedModelSpec:
    """Which base model and which reduction: the options apply, export and finetune share."""

    model: str  # a timm name/alias or an artifact folder / .safetensors
    method: str | None = None
    keep: float | None = None
    r: int | None = None
    protect: float = 0.0
    layers: list[int] | None = None
    fuse: bool = True
    head_only: bool = False
    plan_file: Path | None = None
    checkpoint: Path | None = None
    no_pretrained: bool = False
    img_size: int | None = None


@dataclass(kw_only=True)
class ApplyRequest(ReducedModelSpec):
    """Everything `vitprune apply` takes; the same fields as its options."""

    data: Path | None = None
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    bench_batches: tuple[int, ...] = ()
    bench_repeats: int = 10
    device: str = "cpu"
    output: Path | None = None
    force: bool = False
    progress: bool = True


@dataclass
class ApplyResult:
    base: nn.Module
    reduced: nn.Module
    info: dict
    report: dict
    images: Tensor | None = None
    labels: Tensor | None = None
    extra: dict = field(default_factory=dict)


def resolve_plan(request: ReducedModelSpec, base: BaseModel) -> Plan:
    """--plan FILE, or --method with its settings, or the plan of the artifact given as model."""
    from vitprune.plan import make_plan, read_plan_file

    depth = len(base.model.blocks)
    if request.plan_file is not None:
        if request.method is not None:
            raise VitpruneError("give --plan or --method, not both")
        if request.protect:
            raise VitpruneError("--protect goes with --method tome; a plan file carries its own")
        plan, _ = read_plan_file(request.plan_file)
        if request.img_size is not None:
            plan.img_size = request.img_size
        plan.head_only = plan.head_only or request.head_only
        plan.validate(depth)
        return plan
    if request.method is None:
        if request.protect:
            raise VitpruneError("--protect goes with --method tome")
        if base.artifact_plan is not None:
            return base.artifact_plan
        raise VitpruneError("choose a reduction: --method evit|ats|tome (with --keep or --r), or --plan FILE")
    if request.method in ("evit", "ats") and request.r is not None:
        raise VitpruneError(f"--r is for tome; {request.method} takes --keep")
    if request.method == "tome" and request.keep is not None:
        raise VitpruneError("--keep is for evit/ats; tome takes --r")
    return make_plan(request.method, depth, keep=request.keep, r=request.r, layers=request.layers,
                     fuse=request.fuse, img_size=None, head_only=request.head_only, protect=request.protect)


def build_reduced(spec: ReducedModelSpec) -> tuple[BaseModel, Plan, nn.Module]:
    """The base model, the plan the spec asks for, and a reduced copy of the base."""
    import copy

    from vitprune.patch import apply_plan

    base = load_base(spec.model, spec.checkpoint, spec.no_pretrained, spec.img_size)
    plan = resolve_plan(spec, base)
    return base, plan, apply_plan(copy.deepcopy(base.model), plan)


def load_eval_images(base: nn.Module, reduced: nn.Module, data: Path, *, limit: int | None, workers: int,
                     progress: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(images for the reduced model, labels, images for the base when its input size differs, else None)."""
    from vitprune.patch import model_img_size

    images, labels, _ = load_images_for(reduced, data, limit=limit, workers=workers, progress=progress)
    base_images = None
    if model_img_size(base) != model_img_size(reduced):
        base_images, _, _ = load_images_for(base, data, limit=limit, workers=workers, progress=progress)
    return images, labels, base_images


def run_apply(request: ApplyRequest) -> ApplyResult:
    """Build the reduced model, measure it against the base, and write the artifact if asked."""
    from vitprune.artifact import model_identity, versions, write_artifact
    from vitprune.io import check_output_dir
    from vitprune.report import Evidence, compare, make_report, render_markdown

    if request.bench_repeats < 1:
        raise VitpruneError(f"--bench-repeats must be at least 1, got {request.bench_repeats}")
    if request.output is not None:
        check_output_dir(request.output, request.force)  # fail before the long work, not after
    base, plan, reduced = build_reduced(request)
    base_model = base.model.to(request.device)
    reduced = reduced.to(request.device)
    images = labels = base_images = None
    if request.data is not None:
        images, labels, base_images = load_eval_images(base_model, reduced, request.data, limit=request.limit,
                                                       workers=request.workers, progress=request.progress)
    evidence = Evidence(images=images, labels=labels, base_images=base_images,
                        data_path=str(request.data) if request.data else None,
                        bench_batches=request.bench_batches, bench_repeats=request.bench_repeats,
                        batch_size=request.batch_size, device=request.device, progress=request.progress)
    measured = compare(base_model, reduced, evidence)
    report = make_report(model_identity(reduced, base.info), plan, measured, versions())
    if request.output is not None:
        write_artifact(request.output, reduced.cpu(), base.info, report=report,
                       report_md=render_markdown(report), force=request.force)
    return ApplyResult(base=base_model, reduced=reduced, info=base.info, report=report, images=images, labels=labels)
