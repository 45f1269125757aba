"""ONNX export of reduced (and plain) ViTs, verified and timed on ONNX Runtime.

The token reduction is part of the exported graph: EViT is a TopK + Gather of whole token rows,
ToMe the bipartite matching and its merge (row Gathers and a small MatMul), ATS the inverse-transform sampling and a TopK
whose K is the batch's largest kept count (see `export_onnx`). The graph takes float32 images
`images` (B, 3, H, W) and returns float32 `logits` (B, classes), also when the weights are fp16.

Exporter: torch's TorchScript exporter (`torch.onnx.export(dynamo=False)`). The dynamo exporter
(torch 2.14's default) fails on ToMe (a reshape it cannot decompose under a symbolic batch) and
does not write opset 17 for EViT (it writes 18 and its down-conversion fails), so it is not used;
docs/export.md has the comparison.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
import statistics
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.pipeline import ReducedModelSpec
from vitprune.io import atomic_output_file, writable_parent

MIN_OPSET = 17  # LayerNormalization is one op from 17 on; older opsets are refused
MAX_OPSET = 20  # the newest the TorchScript exporter writes
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
# Largest allowed per-image max |logit difference| ONNX Runtime vs PyTorch (float32 reference).
# fp32 graphs differ by ~1e-5 (kernel summation order); fp16 weights and activations by ~1e-2.
TOLERANCE_FP32 = 1e-3
TOLERANCE_FP16 = 0.25
MIN_AGREEMENT = 99.5  # percent of images whose top-1 class must match PyTorch
ATS_PADDING = ("batch", "cap")


def _parse_batch(batch: str | int) -> int | None:
    """'dynamic' -> None (any batch size), else the fixed batch size."""
    if isinstance(batch, str) and batch.strip().lower() == "dynamic":
        return None
    try:
        size = int(batch)
    except (TypeError, ValueError):
        raise VitpruneError(f"batch must be 'dynamic' or a positive whole number, got {batch!r}") from None
    if isinstance(batch, bool) or size < 1 or (isinstance(batch, float) and batch != size):
        raise VitpruneError(f"batch must be 'dynamic' or a positive whole number, got {batch!r}")
    return size


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise VitpruneError(f"unsupported ONNX opset {opset!r}: use {MIN_OPSET} to {MAX_OPSET}")
    return opset


class _Float16Graph(nn.Module):
    """fp16 weights and activations inside, float32 images in and logits out (the graph's I/O
    stays the same as the fp32 export, so callers need not care)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.half()).float()


def ats_static_width(model: nn.Module) -> int | None:
    """Patch tokens every ATS layer is padded to in the static-shape form: the largest cap of the
    plan less the prefix tokens (no image can keep more). None when the plan has no ATS."""
    from vitprune.patch import plan_of
    from vitprune.reducers import ats_cap

    plan = plan_of(model)
    caps = [red.keep for red in plan.reductions if red.method == "ats"] if plan is not None else []
    if not caps:
        return None
    num_prefix = model.num_prefix_tokens
    num_input = model.patch_embed.num_patches + num_prefix
    cap = max(ats_cap(keep, num_input) for keep in caps)
    return max(1, min(cap, num_input) - num_prefix)


@contextlib.contextmanager
def _ats_padding_mode(model: nn.Module, ats_padding: str) -> Iterator[None]:
    """'batch': the graph pads each batch to its own largest kept count (data-dependent shapes,
    what the eager model does); 'cap': every batch is padded to the cap (static shapes)."""
    if ats_padding not in ATS_PADDING:
        raise VitpruneError(f"unknown ATS padding '{ats_padding}'; use one of {', '.join(ATS_PADDING)}")
    width = ats_static_width(model) if ats_padding == "cap" else None
    missing = object()
    previous = model.__dict__.get("_vitprune_ats_pad_to", missing)
    if width is not None:
        model._vitprune_ats_pad_to = width
    try:
        yield
    finally:
        if previous is missing:
            model.__dict__.pop("_vitprune_ats_pad_to", None)
        else:
            model._vitprune_ats_pad_to = previous


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    batch: str | int = "dynamic",
    opset: int = 17,
    fp16: bool = False,
    ats_padding: str = "batch",
) -> None:
    """Write `model` (a timm ViT, reduced by `vitprune.apply` or not) to the ONNX file `path`.

    batch: 'dynamic' (any batch size) or a fixed size. fp16: float16 weights and compute inside,
    float32 input and output. ats_padding: 'batch' pads ATS to the batch's largest kept count
    (data-dependent, the fastest), 'cap' to the plan's cap (fully static shapes).
    The file appears only when the export succeeded (atomic write); the model is left unchanged.
    """
    import onnx

    from vitprune.patch import model_img_size

    fixed_batch = _parse_batch(batch)
    check_opset(opset)
    path = Path(path)
    param = next(model.parameters())
    size = model_img_size(model)
    # Traced at batch 2 with a symbolic batch even for a fixed batch, which is pinned afterwards in
    # the file: the TorchScript exporter's fully static trace of ToMe builds an attention-mask Add
    # that ONNX Runtime rejects ("Incompatible dimensions").
    example = torch.randn(2, model.patch_embed.proj.in_channels, size, size,
                          generator=torch.Generator().manual_seed(0)).to(param.device)
    was_training = model.training
    model.eval()
    graph: nn.Module = model
    if fp16:
        import copy

        graph = _Float16Graph(copy.deepcopy(model).half()).eval()
    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with atomic_output_file(path) as tmp, _ats_padding_mode(model, ats_padding), \
                _ats_padding_mode(getattr(graph, "model", model), ats_padding), \
                torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on the static token counts are expected
            try:
                torch.onnx.export(graph, (example,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=dynamic_axes, do_constant_folding=True)
                _pin_batch(tmp, fixed_batch)
                onnx.checker.check_model(str(tmp))
            except VitpruneError:
                raise
            except Exception as error:
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise VitpruneError(f"ONNX export failed: {type(error).__name__}: {first}") from error
    finally:
        model.train(was_training)


def _pin_batch(path: Path, fixed_batch: int | None) -> None:
    """Pin a fixed batch size into the graph's input and output."""
    import onnx

    if fixed_batch is None:
        return
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = fixed_batch
    onnx.save(model, str(path))


def choose_provider(provider: str = "auto") -> str:
    """The ONNX Runtime execution provider: CUDA when onnxruntime-gpu sees a GPU, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    if provider == "auto":
        return wanted["cuda"] if wanted["cuda"] in available and torch.cuda.is_available() else wanted["cpu"]
    if provider not in wanted:
        raise VitpruneError(f"unknown ONNX Runtime provider '{provider}'; use auto, cpu or cuda")
    if wanted[provider] not in available:
        raise VitpruneError(f"ONNX Runtime has no {wanted[provider]} here (install onnxruntime-gpu: pip install 'vitprune[gpu]')")
    return wanted[provider]


def onnx_session(path: str | Path, provider: str = "auto", threads: int | None = None):
    """An ONNX Runtime session with all graph optimisations on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=[choose_provider(provider)])
    except VitpruneError:
        raise
    except Exception as error:
        raise VitpruneError(f"ONNX Runtime cannot load {path}: {str(error).strip().splitlines()[0]}") from None


def _fixed_batch(session) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def _run(session, images: Tensor):
    try:
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.float().cpu().numpy()})[0]
    except Exception as error:
        raise VitpruneError(f"ONNX Runtime failed to run the graph: {str(error).strip().splitlines()[0]}") from None


def onnx_predict(session, images: Tensor, batch_size: int = 32, progress: bool = False,
                 description: str = "ONNX Runtime") -> Tensor:
    """Logits of an ONNX session on `images` in batches; a fixed-batch graph gets full batches
    (the last one filled with repeats, which are dropped)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vitprune.bench import fill_batch

    fixed = _fixed_batch(session)
    step = fixed or batch_size
    outputs = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=Console(stderr=True), disable=not progress)
    with bar:
        task = bar.add_task(description, total=len(images))
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            feed = fill_batch(chunk, fixed) if fixed else chunk
            logits = _run(session, feed)
            outputs.append(torch.from_numpy(logits[:len(chunk)]).float())
            bar.advance(task, len(chunk))
    return torch.cat(outputs)


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    images: Tensor,
    *,
    batch_size: int = 32,
    tolerance: float | None = None,
    min_agreement: float = MIN_AGREEMENT,
    provider: str = "auto",
    threads: int | None = None,
    progress: bool = False,
) -> dict:
    """ONNX Runtime against PyTorch (`model`, float32) on `images`, in the same batches.

    Per image: the max |logit difference| and whether the top-1 class matches. The export passes
    when at least `min_agreement` % of images agree on top-1 AND the median image lies within
    `tolerance` (default 1e-3, or 0.25 for an fp16 graph). Not every image has to: the reducers'
    discrete choices (EViT top-k, ToMe's pair ranking and token order, ATS sampling) can go the
    other way on near-tied scores when ONNX Runtime rounds differently, and such an image then
    differs by up to a few logits; a wrong graph differs on every image.
    Returns {"n_images", "max_abs_diff", "median_abs_diff", "within_tolerance", "agreement",
    "tolerance", "min_agreement", "provider", "passed", "problem"}.
    """
    from vitprune.data import predict

    if len(images) == 0:
        raise VitpruneError("no images to verify the ONNX export on")
    session = onnx_session(path, provider, threads)
    fp16 = session.get_inputs()[0].type == "tensor(float)" and _has_fp16_weights(path)
    tolerance = (TOLERANCE_FP16 if fp16 else TOLERANCE_FP32) if tolerance is None else tolerance
    step = _fixed_batch(session) or batch_size
    param = next(model.parameters())
    with torch.inference_mode():
        reference = predict(model.eval(), images.to(param.device), batch_size=step, progress=progress,
                            description="PyTorch")
    logits = onnx_predict(session, images, step, progress)
    per_image = (logits - reference).abs().amax(dim=1)
    agree = logits.argmax(dim=1) == reference.argmax(dim=1)
    agreement = float(agree.double().mean()) * 100
    within = float((per_image <= tolerance).double().mean()) * 100
    problem = None
    if agreement < min_agreement:
        problem = f"top-1 agreement with PyTorch {agreement:.2f}% is below {min_agreement}%"
    elif float(per_image.median()) > tolerance:
        problem = (f"the median image's logits differ from PyTorch by {float(per_image.median()):.4g} "
                   f"(tolerance {tolerance:g}; only {within:.2f}% of images within it)")
    return {
        "n_images": int(len(images)),
        "max_abs_diff": float(per_image.max()),
        "median_abs_diff": float(per_image.median()),
        "within_tolerance": round(within, 2),
        "agreement": round(agreement, 2),
        "tolerance": tolerance,
        "min_agreement": min_agreement,
        "provider": session.get_providers()[0],
        "passed": problem is None,
        "problem": problem,
    }


def _has_fp16_weights(path: str | Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def bench_onnx(
    paths: dict[str, str | Path],
    images: Tensor | dict[str, Tensor],
    batch_sizes: tuple[int, ...] = (1, 32),
    *,
    warmup: int = 3,
    repeats: int = 10,
    provider: str = "auto",
    threads: int | None = None,
) -> dict:
    """Median ms/image of each ONNX file on ONNX Runtime at each batch size, the models taking
    turns within every repeat (as `vitprune.bench.measure_latency`). A fixed-batch graph is timed
    at its own batch size only. Returns {"ms_per_image": {name: {batch: ms}}, "provider",
    "threads", "warmup", "repeats"}."""
    from vitprune.bench import fill_batch

    if repeats < 1 or warmup < 0:
        raise VitpruneError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    sessions = {name: onnx_session(path, provider, threads) for name, path in paths.items()}
    inputs = images if isinstance(images, dict) else {name: images for name in paths}
    results: dict[str, dict[int, float]] = {name: {} for name in paths}
    for batch_size in batch_sizes:
        runnable = {name: s for name, s in sessions.items() if _fixed_batch(s) in (None, batch_size)}
        feeds = {name: {INPUT_NAME: fill_batch(inputs[name], batch_size).float().numpy()} for name in runnable}
        for name, session in runnable.items():
            for _ in range(warmup):
                session.run([OUTPUT_NAME], feeds[name])
        timings: dict[str, list[float]] = {name: [] for name in runnable}
        for _ in range(repeats):
            for name, session in runnable.items():
                start = time.perf_counter()
                session.run([OUTPUT_NAME], feeds[name])
                timings[name].append(time.perf_counter() - start)
        for name, values in timings.items():
            results[name][batch_size] = statistics.median(values) * 1000 / batch_size
    first = next(iter(sessions.values()))
    return {
        "ms_per_image": results,
        "provider": first.get_providers()[0],
        "threads": threads if threads is not None else "onnxruntime default",
        "warmup": warmup,
        "repeats": repeats,
    }


def onnx_file_summary(path: str | Path) -> dict:
    """Opset, size, batch and the operators that carry the reduction, read back from the file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = sorted({node.op_type for node in model.graph.node})
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "opset": max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
        "bytes": Path(path).stat().st_size,
        "batch": dim.dim_value if dim.HasField("dim_value") else "dynamic",
        "reduction_ops": [op for op in ops if op in ("TopK", "GatherElements", "ScatterElements", "CumSum", "ArgMin")],
        "fp16": any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer),
    }


# ---------------------------------------------------------------------------------------------
# `vitprune export` as a library: build (or load) the reduced model, export, verify, bench, report.

@dataclass(kw_only=True)
class ExportRequest(ReducedModelSpec):
    """Everything `vitprune export` takes; the same fields as its options."""

    onnx: Path
    safetensors: Path | None = None
    batch: str | int = "dynamic"
    opset: int = 17
    fp16: bool = False
    ats_padding: str = "batch"
    data: Path | None = None
    limit: int | None = None
    workers: int = 2
    verify_batch: int = 32
    bench: bool = False
    bench_batches: tuple[int, ...] = (1, 32)
    bench_repeats: int = 10
    provider: str = "auto"
    threads: int | None = None
    force: bool = False
    progress: bool = True


RANDOM_VERIFY_IMAGES = 8  # without --data the export is still checked, on this many noise images


def _check_outputs(request: ExportRequest) -> None:
    """Refuse bad outputs before any long work."""
    outputs = [request.onnx] + ([request.safetensors] if request.safetensors is not None else [])
    if request.safetensors is not None and Path(request.safetensors).resolve() == Path(request.onnx).resolve():
        raise VitpruneError("--onnx and --safetensors name the same file")
    for path in outputs:
        path = Path(path)
        if path.is_dir():
            raise VitpruneError(f"output {path} is a folder; give a file name")
        if path.exists() and not request.force:
            raise VitpruneError(f"output file {path} already exists; pass --force to replace it")
        writable_parent(path)


def _existing_report(report_path: Path, model_name: str, plan_text: str, force: bool) -> dict | None:
    """A report.json already beside the ONNX file is extended when it describes the same model and
    plan (an artifact folder); another model's report is only replaced with --force."""
    import json

    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        report = None
    if isinstance(report, dict) and report.get("model") == model_name and report.get("plan") == plan_text:
        return report
    if not force:
        raise VitpruneError(f"{report_path} describes another model or plan; write the ONNX file elsewhere or pass --force")
    return None


def run_export(request: ExportRequest) -> dict:
    """`vitprune export`: the reduced model of an artifact (or of a model name + method) to ONNX,
    verified on ONNX Runtime, optionally timed against the unreduced ONNX graph, optionally also
    saved as one .safetensors file; the report beside the ONNX file gets an "onnx" section.
    Nothing is written unless every step succeeds. Returns the report."""
    import json
    import tempfile
    from contextlib import ExitStack

    from vitprune.artifact import artifact_metadata, load, model_identity, save_weights, versions
    from vitprune.patch import model_img_size
    from vitprune.pipeline import build_reduced, load_eval_images
    from vitprune.report import Evidence, compare, make_report, render_markdown

    _parse_batch(request.batch)
    check_opset(request.opset)
    if request.ats_padding not in ATS_PADDING:
        raise VitpruneError(f"unknown ATS padding '{request.ats_padding}'; use one of {', '.join(ATS_PADDING)}")
    if request.bench_repeats < 1:
        raise VitpruneError(f"--bench-repeats must be at least 1, got {request.bench_repeats}")
    if request.verify_batch < 1:
        raise VitpruneError(f"--verify-batch must be at least 1, got {request.verify_batch}")
    choose_provider(request.provider)
    _check_outputs(request)

    base, plan, reduced = build_reduced(request)
    reduced.eval()
    report_path = Path(request.onnx).resolve().parent / "report.json"
    identity = model_identity(reduced, base.info)
    previous = _existing_report(report_path, identity["name"], plan.describe(), request.force)

    images = labels = base_images = None
    if request.data is not None:
        images, labels, base_images = load_eval_images(base.model, reduced, request.data, limit=request.limit,
                                                       workers=request.workers, progress=request.progress)
    verify_images = images if images is not None else torch.randn(
        RANDOM_VERIFY_IMAGES, 3, model_img_size(reduced), model_img_size(reduced), generator=torch.Generator().manual_seed(0))

    with ExitStack() as outputs:
        onnx_tmp = outputs.enter_context(atomic_output_file(request.onnx, force=True))
        export_onnx(reduced, onnx_tmp, batch=request.batch, opset=request.opset, fp16=request.fp16,
                    ats_padding=request.ats_padding)
        parity = verify_onnx(reduced, onnx_tmp, verify_images, batch_size=request.verify_batch,
                             provider=request.provider, threads=request.threads, progress=request.progress)
        if not parity["passed"]:
            raise VitpruneError(f"ONNX export rejected, nothing written: {parity['problem']}")
        parity["images"] = "real" if images is not None else f"{RANDOM_VERIFY_IMAGES} random (pass --data for real images)"

        if request.safetensors is not None:
            weights_tmp = outputs.enter_context(atomic_output_file(request.safetensors, force=True))
            save_weights(reduced, weights_tmp, artifact_metadata(reduced, base.info, plan))
            _check_round_trip(reduced, weights_tmp, verify_images[:RANDOM_VERIFY_IMAGES], load)

        if previous is not None:
            report = previous
        else:
            evidence = Evidence(images=images, labels=labels, base_images=base_images,
                                data_path=str(request.data) if request.data else None, progress=request.progress)
            report = make_report(identity, plan, compare(base.model, reduced, evidence), versions())
        section = {"file": Path(request.onnx).name, **onnx_file_summary(onnx_tmp), "exporter": EXPORTER,
                   "ats_padding": request.ats_padding if "ats" in plan.method else None, "parity": parity}
        if request.safetensors is not None:
            section["safetensors"] = Path(request.safetensors).name
        if request.bench:
            with tempfile.TemporaryDirectory(prefix="vitprune-export-") as scratch:
                base_path = Path(scratch) / "base.onnx"
                export_onnx(base.model, base_path, batch=request.batch, opset=request.opset, fp16=request.fp16)
                fixed = _parse_batch(request.batch)
                batches = (fixed,) if fixed else request.bench_batches
                bench_inputs = {"base": base_images if base_images is not None else verify_images,
                                "reduced": verify_images}
                timing = bench_onnx({"base": base_path, "reduced": onnx_tmp}, bench_inputs, batches,
                                    repeats=request.bench_repeats, provider=request.provider, threads=request.threads)
            section["latency_ms"] = {
                str(b): {"base": round(timing["ms_per_image"]["base"][b], 3),
                         "reduced": round(timing["ms_per_image"]["reduced"][b], 3),
                         "speedup": round(timing["ms_per_image"]["base"][b] / timing["ms_per_image"]["reduced"][b], 3)}
                for b in batches
            }
            section["latency_setup"] = {"runtime": "ONNX Runtime", "provider": timing["provider"],
                                        "threads": timing["threads"], "repeats": timing["repeats"],
                                        "warmup": timing["warmup"],
                                        "inputs": "real images" if images is not None else "random images"}
            section["gmacs_speedup"] = round(report["gmacs_base"] / report["gmacs"], 3)
        report["onnx"] = section
        json_tmp = outputs.enter_context(atomic_output_file(report_path, force=True))
        json_tmp.write_text(json.dumps(report, indent=2) + "\n")
        md_tmp = outputs.enter_context(atomic_output_file(report_path.with_name("report.md"), force=True))
        md_tmp.write_text(render_markdown(report) + render_onnx_markdown(section))
    return report


def _check_round_trip(model: nn.Module, weights: Path, images: Tensor, load) -> None:
    """`vitprune.load` of the written .safetensors must give the very same logits."""
    rebuilt = load(weights)
    with torch.inference_mode():
        expected, got = model(images), rebuilt(images)
    if not torch.equal(expected, got):
        raise VitpruneError(f"the .safetensors round trip changed the logits (max difference "
                            f"{float((expected - got).abs().max()):.3g}); nothing written")


def render_onnx_markdown(section: dict) -> str:
    """The ONNX part of report.md."""
    parity = section["parity"]
    lines = ["", "## ONNX", "",
             f"- file: `{section['file']}` (opset {section['opset']}, batch {section['batch']}, "
             f"{'fp16' if section['fp16'] else 'fp32'} weights, {section['bytes'] / 1e6:.1f} MB), {section['exporter']}",
             f"- reduction in the graph: {', '.join(section['reduction_ops']) or 'none'}"
             + (f"; ATS padded to the {section['ats_padding']}" if section.get("ats_padding") else ""),
             f"- parity with PyTorch on {parity['n_images']} {parity['images']} images ({parity['provider']}): "
             f"top-1 agreement {parity['agreement']:.2f}%, max |logit diff| {parity['max_abs_diff']:.3g} "
             f"(median {parity['median_abs_diff']:.3g}; {parity['within_tolerance']:.2f}% of images within {parity['tolerance']:g})"]
    if section.get("safetensors"):
        lines.append(f"- single-file artifact: `{section['safetensors']}` (vitprune.load rebuilds identical logits)")
    if "latency_ms" in section:
        setup = section["latency_setup"]
        lines += ["", "| ONNX Runtime ms / image | base | reduced | speed-up |", "|---|---|---|---|"]
        for batch, timing in section["latency_ms"].items():
            lines.append(f"| batch {batch} | {timing['base']:.2f} | {timing['reduced']:.2f} | {timing['speedup']:.2f}x |")
        lines += ["", f"GMACs ratio base/reduced: {section['gmacs_speedup']:.2f}x. {setup['runtime']} "
                  f"{setup['provider']}, threads: {setup['threads']}, median of {setup['repeats']} runs after "
                  f"{setup['warmup']} warm-up runs, base and reduced interleaved, on {setup['inputs']}."]
    return "\n".join(lines) + "\n"
