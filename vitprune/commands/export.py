"""`export` as a library call: the reduced model to ONNX, verified on ONNX Runtime, optionally
timed against the unreduced graph and saved as one .safetensors file, with the report beside it."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from vitprune.artifact import model_identity, report_json, versions
from vitprune.checks import check_whole
from vitprune.commands.common import ReducedModelSpec, build_reduced, check_memory, reference_section
from vitprune.errors import VitpruneError
from vitprune.evaluation import Evaluation, Evidence, evaluate
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
from vitprune.source import BaseModel, stream_eval_images
from vitprune.teacher import reference_markdown
from vitprune.timm_datasets import DatasetOptions, ImageStream


@dataclass(kw_only=True)
class ExportRequest(ReducedModelSpec, DatasetOptions):
    """Everything `vitprune export` takes; the same fields as its options."""

    onnx: Path
    safetensors: Path | None = None
    batch: str | int = "dynamic"
    opset: int = 17
    fp16: bool = False
    dtype: str = "float32"  # the graph's precision: float16 is the same as fp16
    ats_padding: str = "batch"
    data: Path | str | None = None  # an image folder, or a dataset timm reads (hfds/..., wds/..., .tar), streamed
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
        self.check_data_options(self.data)
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
    stream = _streamer(request)
    with ExitStack() as outputs:
        onnx_tmp = outputs.enter_context(atomic_output_file(request.onnx, force=True))
        outputs.enter_context(_named_as(onnx_tmp, Path(request.onnx)))
        section = _export_and_verify(request, reduced, plan, onnx_tmp, stream)  # a graph that fails stops first
        report, sample = previous, None
        if previous is None:  # judged against the teacher of a fine-tuned artifact, saying so
            report, sample = _measured_report(request, identity, plan, base, reduced, stream)
        images, base_images = _sample_images(sample, stream, base, reduced)
        if request.safetensors is not None:
            weights_tmp = outputs.enter_context(atomic_output_file(request.safetensors, force=True))
            save_checked_weights(reduced, weights_tmp, base.teacher_info(), plan, images[:RANDOM_VERIFY_IMAGES])
        if request.bench:
            section.update(_bench(request, base.reference, onnx_tmp, images, base_images, stream is not None))
            section["gmacs_speedup"] = round(report["gmacs_base"] / report["gmacs"], 3)
        report["onnx"] = section
        _write_reports(outputs, report_path, report)
    return report


Stream = Callable[..., ImageStream]  # (base model, reduced model[, batch_size]) -> the images of `data`, decoded as read


def _streamer(request: ExportRequest) -> Stream | None:
    """The images of `data` for two models' input sizes, streamed (none without `data`): a large folder is
    never held."""
    if request.data is None:
        return None

    def stream(base_model: nn.Module, reduced: nn.Module, batch_size: int = request.verify_batch) -> ImageStream:
        return stream_eval_images(base_model, reduced, request.data, request, limit=request.limit,
                                  workers=request.workers, batch_size=batch_size)
    return stream


def _measured_report(request: ExportRequest, identity: dict, plan: Plan, base: BaseModel, reduced: nn.Module,
                     stream: Stream | None) -> tuple[dict, Evaluation]:
    """The reduced model against the base (a fine-tuned artifact's teacher), on the images of `data` or,
    without them, GMACs only."""
    evidence = Evidence(batches=stream(base.reference, reduced) if stream is not None else None,
                        data_path=str(request.data) if request.data is not None else None,
                        batch_size=request.verify_batch, progress=request.progress)
    evaluation = evaluate(base.reference, reduced, evidence)
    report = make_report(identity, plan, evaluation.figures, versions())
    reference = reference_section(base, evidence, stream)
    if reference is not None:
        report["reference"] = reference
    return report, evaluation


@contextmanager
def _named_as(tmp: Path, final: Path) -> Iterator[None]:
    """An error about the temporary file (a full disk, a graph ONNX Runtime refuses) names the output it becomes."""
    try:
        yield
    except VitpruneError as error:
        if str(tmp) not in str(error):
            raise
        raise VitpruneError(str(error).replace(str(tmp), str(final)), param=error.param) from None


def _sample_images(evaluation: Evaluation | None, stream: Stream | None, base: BaseModel,
                   reduced: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(images for the reduced model, for the base when its input size differs): the first batch of
    `data`, else fixed noise; the round trip of the weights and the timing run on them."""
    if evaluation is not None and evaluation.sample is not None:
        return evaluation.sample, evaluation.base_sample
    if stream is not None:
        for images, base_images, _ in stream(base.reference, reduced):
            return images, base_images
    return random_images(reduced), None


def _export_and_verify(request: ExportRequest, reduced: nn.Module, plan: Plan, path: Path,
                       stream: Stream | None) -> dict:
    """The graph written to `path` and checked against PyTorch (on every image of `data`, streamed in
    the graph's batches, else on fixed noise images): the report's "onnx" section."""
    checked: Tensor | Iterable[Tensor]
    if stream is None:
        checked, count = random_images(reduced), None
    else:
        batches = stream(reduced, reduced, parse_batch(request.batch) or request.verify_batch)
        checked, count = (batch for batch, _, _ in batches), batches.count
    parity = export_verified(reduced, path, checked, real_images=stream is not None, batch=request.batch,
                             opset=request.opset, fp16=request.graph_fp16, ats_padding=request.ats_padding,
                             verify_batch=request.verify_batch, provider=request.provider,
                             threads=request.threads, progress=request.progress, count=count)
    return onnx_section(Path(request.onnx).name, path, plan, request.ats_padding, parity, request.safetensors)


def _bench(request: ExportRequest, base: nn.Module, reduced_path: Path, images: Tensor, base_images: Tensor | None,
           real_images: bool) -> dict:
    """The unreduced graph timed against the reduced one on ONNX Runtime: the latency entries."""
    inputs = {"base": base_images if base_images is not None else images, "reduced": images}
    return bench_against_base(base, reduced_path, inputs, batch=request.batch, opset=request.opset,
                              fp16=request.graph_fp16, bench_batches=request.bench_batch,
                              repeats=request.bench_repeats, provider=request.provider,
                              threads=request.threads, real_images=real_images)


def _write_reports(outputs: ExitStack, report_path: Path, report: dict) -> None:
    """report.json and report.md (with its ONNX part), kept when every output is."""
    json_tmp = outputs.enter_context(atomic_output_file(report_path, force=True))
    json_tmp.write_text(report_json(report))  # strict JSON: absent figures are null, never NaN
    md_tmp = outputs.enter_context(atomic_output_file(report_path.with_name("report.md"), force=True))
    md_tmp.write_text(render_markdown(report) + reference_markdown(report.get("reference"))
                      + render_onnx_markdown(report["onnx"]))
