"""What several commands share: the base model and the reduction a request asks for."""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from vitprune import methods
from vitprune.cascade import CASCADE_FILE
from vitprune.checks import check_whole
from vitprune.errors import VitpruneError
from vitprune.evaluation import Evidence, compare
from vitprune.patch import apply_plan, model_img_size
from vitprune.plan import PLAN_GRAMMAR, Plan, make_plan, read_plan_file, read_plan_text
from vitprune.runtime import check_fits
from vitprune.source import BaseModel, load_base
from vitprune.teacher import TEACHER_FILE

UNREDUCED_FIGURES = ("gmacs", "top1", "top5", "agreement", "kl", "cosine_mean", "retrieval_agreement")


@dataclass(kw_only=True)
class ReducedModelSpec:
    """Which base model and which reduction: the options apply, export and finetune share."""

    model: str  # a timm name/alias or an artifact folder / .safetensors
    method: str | None = None  # a plan in the plan grammar (vitprune.plan.PLAN_GRAMMAR), e.g. tome:r=13@0-10
    # shorthand for a one-method plan's settings (None: not given): the command line's --keep, --r, ...
    keep: float | None = None
    r: int | None = None
    protect: float | None = None
    layers: list[int] | None = None
    fuse: bool | None = None
    head_only: bool = False
    plan_file: Path | None = None
    checkpoint: Path | None = None
    no_pretrained: bool = False
    img_size: int | None = None
    features: bool = False  # the classifier's pre-logits embedding (head removed): an embedding model

    def settings(self) -> dict:
        """The shorthand settings given: this class's fields named as some method's parameter (not a
        command's own option that shares a name, e.g. finetune's distillation temperature); the
        method's defaults fill the rest."""
        declared = {param.name for name in methods.names() for param in methods.get(name).params}
        return {field.name: getattr(self, field.name) for field in fields(ReducedModelSpec)
                if field.name in declared and getattr(self, field.name) is not None}

    def check_reduction(self) -> None:
        """The reduction's settings, checked before any model is built."""
        if (Path(self.model) / CASCADE_FILE).is_file():
            raise VitpruneError(f"model {self.model} is a cascade folder ({CASCADE_FILE}), not one model to reduce: "
                                "load it with vitprune.load, or give a timm model name or a vitprune artifact",
                                param="model")
        if self.plan_file is not None and self.method is not None:
            raise VitpruneError("give plan_file or method, not both", param=("plan_file", "method"))
        if self.method is None and self.settings():
            name = next(iter(self.settings()))
            raise VitpruneError(f"{name} goes with a method; a plan carries its own settings", param=name)
        if self.img_size is not None:
            check_whole(self.img_size, "img_size", 1)
        if self.method is not None:
            read_plan_text(self.method, layers=self.layers, head_only=self.head_only, **self.settings())


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, and a GPU torch can see for cuda."""
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise VitpruneError(f"device must be cpu, cuda or cuda:N, got {device!r}", param="device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VitpruneError(f"device {device} asked for, but torch sees no CUDA GPU", param="device")


def check_memory(model: nn.Module, device: str, **batches: int | tuple[int, ...] | None) -> None:
    """Refuse, before any work, a batch setting (by its parameter name: the largest when several) or the
    model's input size that cannot fit in the device's memory (`runtime.check_fits`)."""
    for name, batch in batches.items():
        largest = max(batch, default=None) if isinstance(batch, tuple) else batch
        if largest is not None:
            check_fits(model, batch=largest, img_size=model_img_size(model), device=device, batch_param=name,
                       size_param="img_size")


def resolve_plan(spec: ReducedModelSpec, base: BaseModel) -> Plan:
    """A plan file, or the method with its settings, or the plan of the artifact given as model."""
    depth = len(base.model.blocks)
    if spec.plan_file is not None:
        plan, _ = read_plan_file(spec.plan_file)
        plan = replace(plan, img_size=plan.img_size if spec.img_size is None else spec.img_size,
                       head_only=plan.head_only or spec.head_only)
        plan.validate(depth)
        return plan
    if spec.method is None:
        if base.artifact_plan is not None:  # img_size given: the artifact's plan at that size
            return base.artifact_plan if spec.img_size is None else replace(base.artifact_plan, img_size=spec.img_size)
        raise VitpruneError(f"choose a reduction: a method ({', '.join(methods.names())}) with its settings, "
                            f"or a plan file; {PLAN_GRAMMAR}", param="method")
    return make_plan(spec.method, depth, layers=spec.layers, img_size=spec.img_size, head_only=spec.head_only,
                     **spec.settings())


def reference_section(base: BaseModel, evidence: Evidence,
                      restream: Callable[[nn.Module, nn.Module], Iterable] | None = None) -> dict | None:
    """What a report on `base` is judged against, when `base` is a fine-tuned artifact: its teacher
    (`base.reference`), with the fine-tuned weights unreduced measured against it as a second, labelled
    baseline on the same images: the held ones, or, when `evidence` streams (read once), a second stream
    from `restream(teacher, fine-tuned)`. None otherwise."""
    if base.teacher_record is None:
        return None
    if base.teacher is None:
        return {"compared_with": "fine-tuned weights unreduced", "teacher": base.teacher_record,
                "note": f"the teacher's tensors ({TEACHER_FILE}) are not with this artifact"}
    section: dict = {"compared_with": "teacher", "teacher": base.teacher_record}
    if evidence.batches is not None and restream is None:
        return section
    teacher, finetuned = base.teacher.to(evidence.device), base.model.to(evidence.device)
    # base.model runs at the reduced model's input size, the teacher at its own
    batches = restream(teacher, finetuned) if evidence.batches is not None else None
    measured = compare(teacher, finetuned, replace(evidence, batches=batches, bench_batches=()))
    section["finetuned_unreduced"] = {key: measured[key] for key in UNREDUCED_FIGURES if key in measured}
    return section


def build_reduced(spec: ReducedModelSpec) -> tuple[BaseModel, Plan, nn.Module]:
    """The base model, the plan the spec asks for, and a reduced copy of the base."""
    spec.check_reduction()
    base = load_base(spec.model, spec.checkpoint, spec.no_pretrained, spec.img_size, spec.features)
    plan = resolve_plan(spec, base)
    return base, plan, apply_plan(copy.deepcopy(base.model), plan)
