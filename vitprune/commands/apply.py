"""`apply` as a library call: build the reduced model, measure it against the base, write the artifact."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from vitprune.artifact import model_identity, versions, write_artifact
from vitprune.checks import check_whole
from vitprune.commands.common import ReducedModelSpec, build_reduced, check_device, check_memory, reference_section
from vitprune.evaluation import Evidence, evaluate
from vitprune.finetune.distributed import Distributed, distributed_job
from vitprune.io import check_output_dir
from vitprune.report import make_report, render_markdown
from vitprune.runtime import Runtime
from vitprune.show import token_maps_png
from vitprune.source import stream_eval_images
from vitprune.teacher import reference_markdown
from vitprune.timm_datasets import DatasetOptions, ImageStream

TOKEN_MAP_IMAGES = 4  # images drawn in the artifact's tokens.png


@dataclass(kw_only=True)
class ApplyRequest(ReducedModelSpec, DatasetOptions):
    """Everything `vitprune apply` takes; the same fields as its options."""

    data: Path | str | None = None  # an image folder, or a dataset timm reads (hfds/..., wds/..., .tar), streamed
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    bench_batch: tuple[int, ...] = ()  # the batch sizes timed (the --bench-batch option)
    bench_repeats: int = 10
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    compile_mode: str = "default"
    output: Path | None = None
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        """Every setting, before any model is built or image read."""
        self.check_reduction()
        self.check_data_options(self.data)
        check_whole(self.batch_size, "batch_size", 1)
        check_whole(self.workers, "workers", 0)
        check_whole(self.bench_repeats, "bench_repeats", 1)
        if self.limit is not None:
            check_whole(self.limit, "limit", 1)
        for batch in self.bench_batch:
            check_whole(batch, "bench_batch", 1)
        check_device(self.device)
        Runtime(self.device, self.dtype, self.compile, self.compile_mode).check()
        if self.output is not None:
            check_output_dir(self.output, self.force)


@dataclass
class ApplyResult:
    base: nn.Module
    reduced: nn.Module
    info: dict
    report: dict
    images: Tensor | None = None  # the first batch of images (the reduced model's input size)
    extra: dict = field(default_factory=dict)
    is_main: bool = True  # False on the other processes of a torchrun job: rank 0 reports and writes


TOKEN_MAPS_SECTION = f"""
## Token maps

![Token maps of the first {TOKEN_MAP_IMAGES} images](tokens.png)

The first images, as the model sees them, and the tokens at the output of each reducing block
(`vitprune show`, docs/show.md): kept patches clear, dropped ones dimmed, fused ones orange;
merged groups one colour each.
"""


def run_apply(request: ApplyRequest) -> ApplyResult:
    """Build the reduced model, measure it against the base, and write the artifact if asked. Under
    torchrun each process evaluates its part of the images; rank 0 gathers, reports and writes."""
    request.check()
    with distributed_job(request.device) as job:
        return _apply(request, job)


def _apply(request: ApplyRequest, job: Distributed) -> ApplyResult:
    if job.world_size > 1:
        torch.manual_seed(0)  # the same random init on every process (no_pretrained)
    base, plan, reduced = build_reduced(request)
    device = str(job.device)
    check_memory(reduced, device, batch_size=request.batch_size, bench_batch=request.bench_batch)
    base_model, reduced = base.reference.to(device), reduced.to(device)  # the teacher of a fine-tuned artifact

    def stream(base_model: nn.Module, reduced: nn.Module) -> ImageStream:
        return stream_eval_images(base_model, reduced, request.data, request, limit=request.limit,
                                  workers=request.workers, batch_size=request.batch_size,
                                  shard=(job.rank, job.world_size), pin_memory=job.device.type == "cuda")

    evidence = Evidence(batches=stream(base_model, reduced) if request.data is not None else None,
                        data_path=str(request.data) if request.data else None,
                        bench_batches=request.bench_batch if job.is_main else (),
                        bench_repeats=request.bench_repeats, batch_size=request.batch_size, device=device,
                        dtype=request.dtype, compile=request.compile, compile_mode=request.compile_mode,
                        progress=request.progress and job.is_main, gather=job.gather)
    evaluation = evaluate(base_model, reduced, evidence)
    report = make_report(model_identity(reduced, base.info), plan, evaluation.figures, versions())
    reference = reference_section(base, evidence, stream)
    if reference is not None:
        report["reference"] = reference
    if request.output is not None and job.is_main:
        report_md = render_markdown(report) + reference_markdown(reference)
        info, extra = base.info_for(reduced.cpu())
        if evaluation.sample is not None and plan.reductions:
            extra["tokens.png"] = token_maps_png(reduced, evaluation.sample[:TOKEN_MAP_IMAGES])
            report_md += TOKEN_MAPS_SECTION
        write_artifact(request.output, reduced.cpu(), info, report=report, report_md=report_md,
                       force=request.force, extra_files=extra)
    return ApplyResult(base=base_model, reduced=reduced, info=base.info, report=report, images=evaluation.sample,
                       is_main=job.is_main)
