"""ONNX graphs of (reduced) ViTs and ONNX Runtime sessions: the writer and the runner.

The token reduction is part of the exported graph: EViT is a TopK + Gather of whole token rows,
ToMe the bipartite matching and its merge (row Gathers and a small MatMul), ATS the inverse-transform
sampling and a TopK whose K is the batch's largest kept count (see `export_onnx`). The graph takes
float32 images `images` (B, 3, H, W) and returns float32 `logits` (B, classes), also when the
weights are fp16.

Exporter: torch's TorchScript exporter (`torch.onnx.export(dynamo=False)`). The dynamo exporter
(torch 2.14's default) fails on ToMe (a reshape it cannot decompose under a symbolic batch) and
does not write opset 17 for EViT (it writes 18 and its down-conversion fails), so it is not used;
docs/export.md has the comparison.

onnx and onnxruntime are heavy imports that only ONNX work needs (onnxruntime-gpu may stand in
for onnxruntime): they are imported inside the functions that use them, on first use.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from vitprune.bench import fill_batch
from vitprune.errors import VitpruneError
from vitprune.io import atomic_output_file
from vitprune.models import input_shape
from vitprune.patch import input_tokens, plan_of
from vitprune.progress import progress_bar

MIN_OPSET = 17  # LayerNormalization is one op from 17 on; older opsets are refused
MAX_OPSET = 20  # the newest the TorchScript exporter writes
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"
ATS_PADDING = ("batch", "cap")


def parse_batch(batch: str | int) -> int | None:
    """'dynamic' -> None (any batch size), else the fixed batch size."""
    if isinstance(batch, str) and batch.strip().lower() == "dynamic":
        return None
    problem = f"batch must be 'dynamic' or a positive whole number, got {batch!r}"
    try:
        size = int(batch)
    except (TypeError, ValueError):
        raise VitpruneError(problem, param="batch") from None
    if isinstance(batch, bool) or size < 1 or (isinstance(batch, float) and batch != size):
        raise VitpruneError(problem, param="batch")
    return size


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise VitpruneError(f"opset {opset!r} is not supported: use ONNX opset {MIN_OPSET} to {MAX_OPSET}",
                            param="opset")
    return opset


def check_ats_padding(ats_padding: str) -> str:
    if ats_padding not in ATS_PADDING:
        raise VitpruneError(f"unknown ATS padding '{ats_padding}' for ats_padding; use one of {', '.join(ATS_PADDING)}",
                            param="ats_padding")
    return ats_padding


class _Float16Graph(nn.Module):
    """fp16 weights and activations inside, float32 images in and logits out (the graph's I/O
    stays the same as the fp32 export, so callers need not care)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.half()).float()


class _StaticPadding(nn.Module):
    """A reduced model whose per-image (ATS) blocks pad every batch to `width` patch tokens."""

    def __init__(self, model: nn.Module, width: int) -> None:
        super().__init__()
        self.model = model
        self.width = width

    def forward(self, images: Tensor) -> Tensor:
        return self.model.vitprune_forward(images, pad_to=self.width)


def static_width(model: nn.Module) -> int | None:
    """Patch tokens every per-image (ATS) block is padded to in the static-shape form: the largest
    width of the plan's per-image reductions less the prefix tokens (no image can keep more).
    None when no reduction of the plan varies per image."""
    plan = plan_of(model)
    num_prefix = model.num_prefix_tokens
    num_input = input_tokens(model)
    widths = [red.spec.static_width(red.settings, num_input)
              for red in (plan.reductions if plan is not None else []) if red.spec.varies_per_image]
    if not widths:
        return None
    return max(1, min(max(widths), num_input) - num_prefix)


def _graph_module(model: nn.Module, fp16: bool, ats_padding: str) -> nn.Module:
    """What is traced: the model, padded to static shapes for 'cap', in fp16 inside for `fp16`."""
    width = static_width(model) if ats_padding == "cap" else None
    graph = model if width is None else _StaticPadding(model, width)
    if fp16:
        graph = _Float16Graph(copy.deepcopy(graph).half())
    return graph.eval()


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
    fixed_batch = parse_batch(batch)
    check_opset(opset)
    check_ats_padding(ats_padding)
    # Traced at batch 2 with a symbolic batch even for a fixed batch, which is pinned afterwards in
    # the file: the TorchScript exporter's fully static trace of ToMe builds an attention-mask Add
    # that ONNX Runtime rejects ("Incompatible dimensions").
    example = torch.randn(2, *input_shape(model),  # the model's own channels and size (hybrid stems, non-square)
                          generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
    was_training = model.training
    try:
        graph = _graph_module(model.eval(), fp16, ats_padding)
        with atomic_output_file(Path(path)) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings on the static token counts are expected
            _write_graph(graph, example, tmp, opset, fixed_batch)
    finally:
        model.train(was_training)


def _write_graph(graph: nn.Module, example: Tensor, path: Path, opset: int, fixed_batch: int | None) -> None:
    """Trace, pin the batch, check the file; any failure becomes one VitpruneError line."""
    import onnx  # heavy, and only ONNX work needs it: loaded on first use

    dynamic_axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with _rms_norm_written(opset):
            torch.onnx.export(graph, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes=dynamic_axes, do_constant_folding=True)
        _pin_batch(path, fixed_batch)
        onnx.checker.check_model(str(path))
    except (VitpruneError, OSError):  # an OS error (a full disk) names the output: `atomic_output_file`
        raise
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VitpruneError(f"ONNX export failed: {type(error).__name__}: {first}") from error


def _rms_norm_symbolic(g, x, normalized_shape, weight, eps):
    """`aten::rms_norm` in ops of opset 17-20 (ONNX's RMSNormalization arrives in opset 23, which the
    TorchScript exporter does not write): x / sqrt(mean(x^2 over the normalised dims) + eps) * weight,
    with the statistics in float32 as torch computes them (a float16 square overflows above 256).
    timm's RmsNorm (AIMv2) calls it."""
    from torch.onnx import symbolic_helper  # the TorchScript exporter's helpers, only for export

    axes = list(range(-len(symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")), 0))
    wide = g.op("Cast", x, to_i=1)  # ONNX's FLOAT
    squares = g.op("Mul", wide, wide)
    if g.opset < 18:  # ReduceMean's axes moved from an attribute to an input in opset 18
        mean = g.op("ReduceMean", squares, axes_i=axes, keepdims_i=1)
    else:
        mean = g.op("ReduceMean", squares, g.op("Constant", value_t=torch.tensor(axes)), keepdims_i=1)
    eps_value = None if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    if eps_value is None:  # torch's default: the machine epsilon of the input's dtype
        eps_value = torch.finfo(torch.float16 if x.type().scalarType() == "Half" else torch.float32).eps
    scale = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value)))))
    normed = g.op("CastLike", g.op("Mul", wide, scale), x)
    return normed if symbolic_helper._is_none(weight) else g.op("Mul", normed, weight)


@contextlib.contextmanager
def _rms_norm_written(opset: int) -> Iterator[None]:
    """Lend the exporter `_rms_norm_symbolic` for one export, unless a symbolic is already registered
    for it (the user's own, or a later torch's)."""
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
        registered = registry.is_registered_op("aten::rms_norm", opset)
    except ImportError:  # another torch layout: lend ours
        registered = False
    if registered:
        yield
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, MIN_OPSET)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", MIN_OPSET)


def _pin_batch(path: Path, fixed_batch: int | None) -> None:
    """Pin a fixed batch size into the graph's input and output."""
    import onnx  # heavy, and only ONNX work needs it: loaded on first use

    if fixed_batch is None:
        return
    model = onnx.load(str(path))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = fixed_batch
    onnx.save(model, str(path))


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
EXTRA_FOR = {"cuda": "gpu", "tensorrt": "tensorrt"}  # the pip extra that brings a provider


def check_provider_name(provider: str) -> str:
    if provider != "auto" and provider not in PROVIDERS:
        raise VitpruneError(f"provider must be auto, cpu, cuda or tensorrt (the ONNX Runtime provider), got '{provider}'",
                            param="provider")
    return provider


def choose_provider(provider: str = "auto", available: list[str] | None = None, gpu: bool | None = None) -> str:
    """The ONNX Runtime execution provider: for auto, CUDA when onnxruntime-gpu sees a GPU, else
    CPU (TensorRT only when asked: it builds an engine per graph, minutes for a ViT).
    `available`/`gpu`: ONNX Runtime's providers and whether a GPU is there (default: ask them)."""
    check_provider_name(provider)
    if available is None:
        import onnxruntime as ort  # heavy, and only ONNX work needs it: loaded on first use

        available = ort.get_available_providers()
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if provider == "auto":
        return PROVIDERS["cuda"] if PROVIDERS["cuda"] in available and gpu else PROVIDERS["cpu"]
    if PROVIDERS[provider] not in available:
        raise VitpruneError(f"ONNX Runtime has no {PROVIDERS[provider]} here "
                            f"(pip install 'vitprune[{EXTRA_FOR.get(provider, 'gpu')}]')", param="provider")
    return PROVIDERS[provider]


def provider_chain(chosen: str) -> list[str]:
    """The providers a session is given: the chosen one first, then the ones it falls back to for
    the nodes it cannot run (TensorRT -> CUDA -> CPU)."""
    order = [PROVIDERS["tensorrt"], PROVIDERS["cuda"], PROVIDERS["cpu"]]
    return order[order.index(chosen):] if chosen in order else [chosen]


def onnx_session(path: str | Path, provider: str = "auto", threads: int | None = None):
    """An ONNX Runtime session with all graph optimisations on."""
    import onnxruntime as ort  # heavy, and only ONNX work needs it: loaded on first use

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=provider_chain(choose_provider(provider)))
    except VitpruneError:
        raise
    except Exception as error:
        raise VitpruneError(f"ONNX Runtime cannot load {path}: {str(error).strip().splitlines()[0]}") from None


def fixed_batch(session) -> int | None:
    """The batch size pinned in a session's graph, None for a dynamic batch."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) else None


def run_session(session, images: Tensor):
    """Logits (numpy) of one batch; a failure becomes one VitpruneError line."""
    try:
        return session.run([OUTPUT_NAME], {INPUT_NAME: images.float().cpu().numpy()})[0]
    except Exception as error:
        raise VitpruneError(f"ONNX Runtime failed to run the graph: {str(error).strip().splitlines()[0]}") from None


def onnx_predict(session, images: Tensor, batch_size: int = 32, progress: bool = False,
                 description: str = "ONNX Runtime") -> Tensor:
    """Logits of an ONNX session on `images` in batches; a fixed-batch graph gets full batches
    (the last one filled with repeats, which are dropped)."""
    fixed = fixed_batch(session)
    step = fixed or batch_size
    outputs = []
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(images))
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            logits = run_session(session, fill_batch(chunk, fixed) if fixed else chunk)
            outputs.append(torch.from_numpy(logits[:len(chunk)]).float())
            bar.advance(task, len(chunk))
    return torch.cat(outputs)


def has_fp16_weights(path: str | Path) -> bool:
    """Whether the ONNX file holds float16 initializers."""
    import onnx  # heavy, and only ONNX work needs it: loaded on first use

    model = onnx.load(str(path), load_external_data=False)
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
