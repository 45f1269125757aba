"""`export` as a library call: the reduced model to ONNX, verified on ONNX Runtime, optionally
timed against the unreduced graph and saved as one .safetensors file, with the report beside it."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from vitprune.artifact import model_identity, report_json, versions
from vitprune.checks import check_whole
from vitprune.commands.common import ReducedModelSpec, build_reduced, check_memory, reference_section
from vitprune.errors import VitpruneError
from vitprune.evaluation import Evidence, compare
from vitprune.export import (
    RANDOM_VERIFY_IMAGES,
    bench_against_base,
    check_outputs,
    existing_report,
    export_verified,
    onnx_section,
    random_images,
    render_onnx_markdown,
    save_checked_weights,
)
from vitprune.io import atomic_output_file
from vitprune.onnx_runtime import check_ats_padding, check_opset, choose_provider, parse_batch
from vitprune.plan import Plan
from vitprune.report import make_report, render_markdown
from vitprune.source import BaseModel, load_eval_images
from vitprune.teacher import reference_markdown


@dataclass(kw_only=True)
class ExportRequest(ReducedModelSpec):
    """Everything `vitprune export` takes; the same fields as its options."""

    onnx: Path
    safetensors: Path | None = None
    batch: str | int = "dynamic"
    opset: int = 17
    fp16: bool = False
    dtype: str = "float32"  # the graph's precision: float16 is the same as fp16
    ats_padding: str = "batch"
    data: Path | None = None
    limit: int | None = None
    workers: int = 2
    verify_batch: int = 32
    bench: bool = False
    bench_batch: tuple[int, ...] = (1, 32)  # the batch sizes timed (the --bench-batch option)
    bench_repeats: int = 10
    provider: str = "auto"
    threads: int | None = None
    force: bool = False
    progress: bool = True

    @property
    def graph_fp16(self) -> bool:
        return self.fp16 or self.dtype == "float16"

    def check(self) -> None:
        """Every setting and the outputs, before any model is built or image read."""
        self.check_reduction()
        parse_batch(self.batch)
        check_opset(self.opset)
        check_ats_padding(self.ats_padding)
        if self.dtype not in ("float32", "float16"):
            raise VitpruneError(f"an ONNX graph is float32 or float16 (ONNX Runtime's CPU and CUDA providers run "
                                f"few bfloat16 ops), got dtype {self.dtype!r}", param="dtype")
        check_whole(self.workers, "workers", 0)
        check_whole(self.verify_batch, "verify_batch", 1)
        check_whole(self.bench_repeats, "bench_repeats", 1)
        for batch in self.bench_batch:
            check_whole(batch, "bench_batch", 1)
        if self.limit is not None:
            check_whole(self.limit, "limit", 1)
        if self.threads is not None:
            check_whole(self.threads, "threads", 1)
        choose_provider(self.provider)
        check_outputs(self.onnx, self.safetensors, self.force)


def run_export(request: ExportRequest) -> dict:
    """`vitprune export`: the reduced model of an artifact (or of a model name + method) to ONNX,
    verified on ONNX Runtime, optionally timed against the unreduced ONNX graph, optionally also
    saved as one .safetensors file; the report beside the ONNX file gets an "onnx" section.
    Nothing is written unless every step succeeds. Returns the report."""
    request.check()
    base, plan, reduced = build_reduced(request)
    check_memory(reduced, "cpu", batch=parse_batch(request.batch), verify_batch=request.verify_batch,
                 bench_batch=request.bench_batch)
    reduced.eval()
    report_path = Path(request.onnx).resolve().parent / "report.json"
    identity = model_identity(reduced, base.info)
    previous = existing_report(report_path, identity["name"], plan.describe(), request.force)
    evidence = _evidence(request, base, reduced)
    images = evidence.images if evidence.images is not None else random_images(reduced)
    with ExitStack() as outputs:
        onnx_tmp = outputs.enter_context(atomic_output_file(request.onnx, force=True))
        outputs.enter_context(_named_as(onnx_tmp, Path(request.onnx)))
        section = _export_and_verify(request, reduced, plan, onnx_tmp, images, evidence.images is not None)
        if request.safetensors is not None:
            weights_tmp = outputs.enter_context(atomic_output_file(request.safetensors, force=True))
            info = base.info_for(reduced)[0]  # the one-file form names a fine-tuned artifact's teacher, without its tensors
            save_checked_weights(reduced, weights_tmp, info, plan, images[:RANDOM_VERIFY_IMAGES])
        if previous is not None:
            report = previous
        else:  # judged against the teacher of a fine-tuned artifact, saying so
            report = make_report(identity, plan, compare(base.reference, reduced, evidence), versions())
            reference = reference_section(base, evidence)
            if reference is not None:
                report["reference"] = reference
        if request.bench:
            section.update(_bench(request, base.reference, onnx_tmp, evidence, images))
            section["gmacs_speedup"] = round(report["gmacs_base"] / report["gmacs"], 3)
        report["onnx"] = section
        _write_reports(outputs, report_path, report)
    return report


@contextmanager
def _named_as(tmp: Path, final: Path) -> Iterator[None]:
    """An error about the temporary file (a full disk, a graph ONNX Runtime refuses) names the output it becomes."""
    try:
        yield
    except VitpruneError as error:
        if str(tmp) not in str(error):
            raise
        raise VitpruneError(str(error).replace(str(tmp), str(final)), param=error.param) from None


def _evidence(request: ExportRequest, base: BaseModel, reduced: nn.Module) -> Evidence:
    """The images of `data` (none without it), preprocessed for each model's input size."""
    images = labels = base_images = None
    if request.data is not None:
        images, labels, base_images = load_eval_images(base.reference, reduced, request.data, limit=request.limit,
                                                       workers=request.workers, progress=request.progress)
    return Evidence(images=images, labels=labels, base_images=base_images,
                    data_path=str(request.data) if request.data else None, progress=request.progress)


def _export_and_verify(request: ExportRequest, reduced: nn.Module, plan: Plan, path: Path, images: Tensor,
                       real_images: bool) -> dict:
    """The graph written to `path` and checked against PyTorch: the report's "onnx" section."""
    parity = export_verified(reduced, path, images, real_images=real_images, batch=request.batch,
                             opset=request.opset, fp16=request.graph_fp16, ats_padding=request.ats_padding,
                             verify_batch=request.verify_batch, provider=request.provider,
                             threads=request.threads, progress=request.progress)
    return onnx_section(Path(request.onnx).name, path, plan, request.ats_padding, parity, request.safetensors)


def _bench(request: ExportRequest, base: nn.Module, reduced_path: Path, evidence: Evidence,
           images: Tensor) -> dict:
    """The unreduced graph timed against the reduced one on ONNX Runtime: the latency entries."""
    inputs = {"base": evidence.base_images if evidence.base_images is not None else images, "reduced": images}
    return bench_against_base(base, reduced_path, inputs, batch=request.batch, opset=request.opset,
                              fp16=request.graph_fp16, bench_batches=request.bench_batch,
                              repeats=request.bench_repeats, provider=request.provider,
                              threads=request.threads, real_images=evidence.images is not None)


def _write_reports(outputs: ExitStack, report_path: Path, report: dict) -> None:
    """report.json and report.md (with its ONNX part), kept when every output is."""
    json_tmp = outputs.enter_context(atomic_output_file(report_path, force=True))
    json_tmp.write_text(report_json(report))  # strict JSON: absent figures are null, never NaN
    md_tmp = outputs.enter_context(atomic_output_file(report_path.with_name("report.md"), force=True))
    md_tmp.write_text(render_markdown(report) + reference_markdown(report.get("reference"))
                      + render_onnx_markdown(report["onnx"]))
