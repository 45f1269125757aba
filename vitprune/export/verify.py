"""Parity of an exported graph: ONNX Runtime against PyTorch on the same images, in the same batches."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from vitprune.data import predict
from vitprune.errors import VitpruneError
from vitprune.onnx_runtime import fixed_batch, has_fp16_weights, onnx_predict, onnx_session
from vitprune.progress import progress_bar

# Largest allowed per-image max |logit difference| ONNX Runtime vs PyTorch (float32 reference).
# fp32 graphs differ by ~1e-5 (kernel summation order); fp16 weights and activations by ~1e-2.
TOLERANCE_FP32 = 1e-3
TOLERANCE_FP16 = 0.25
MIN_AGREEMENT = 99.5  # percent of images whose top-1 class must match PyTorch


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    images: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 32,
    tolerance: float | None = None,
    min_agreement: float = MIN_AGREEMENT,
    provider: str = "auto",
    threads: int | None = None,
    progress: bool = False,
    count: int | None = None,
) -> dict:
    """ONNX Runtime against PyTorch (`model`, float32) on `images`, in the same batches: a tensor, or
    a stream of image batches (decoded as they are checked, so a large folder is never held; each
    is cut into the graph's batches; `count` sizes the progress bar).

    Per image: the max |logit difference| and whether the top-1 class matches. The export passes
    when at least `min_agreement` % of images agree on top-1 AND the median image lies within
    `tolerance` (default 1e-3, or 0.25 for an fp16 graph). Not every image has to: the reducers'
    discrete choices (EViT top-k, ToMe's pair ranking and token order, ATS sampling) can go the
    other way on near-tied scores when ONNX Runtime rounds differently, and such an image then
    differs by up to a few logits; a wrong graph differs on every image.
    Returns {"n_images", "max_abs_diff", "median_abs_diff", "within_tolerance", "agreement",
    "tolerance", "min_agreement", "provider", "passed", "problem"}.
    """
    session = onnx_session(path, provider, threads)
    if tolerance is None:
        tolerance = TOLERANCE_FP16 if _is_fp16_graph(session, path) else TOLERANCE_FP32
    if isinstance(images, Tensor):
        count = len(images)
    per_image, agree = _per_image_parity(model, session, images, fixed_batch(session) or batch_size, count, progress)
    agreement = float(agree.double().mean()) * 100
    within = float((per_image <= tolerance).double().mean()) * 100
    problem = _parity_problem(agreement, float(per_image.median()), within, tolerance, min_agreement)
    return {
        "n_images": int(len(per_image)),
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


def _per_image_parity(model: nn.Module, session, images: Tensor | Iterable[Tensor], step: int, count: int | None,
                      progress: bool) -> tuple[Tensor, Tensor]:
    """Per image, in the graph's batches: the max |logit difference| ONNX Runtime vs PyTorch, and
    whether the top-1 classes match."""
    differences, agrees = [], []
    with progress_bar(progress) as bar:
        task = bar.add_task("ONNX Runtime against PyTorch", total=count)
        for batch in images.split(step) if isinstance(images, Tensor) else images:
            reference = _pytorch_logits(model, batch, step)
            logits = onnx_predict(session, batch, step)
            differences.append((logits - reference).abs().amax(dim=1))
            agrees.append(logits.argmax(dim=1) == reference.argmax(dim=1))
            bar.advance(task, len(batch))
    if not differences:
        raise VitpruneError("no images to verify the ONNX export on", param="images")
    return torch.cat(differences), torch.cat(agrees)


def _is_fp16_graph(session, path: str | Path) -> bool:
    """float32 I/O around fp16 weights (the `export_onnx(fp16=True)` form)."""
    return session.get_inputs()[0].type == "tensor(float)" and has_fp16_weights(path)


def _pytorch_logits(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    """The float32 reference: `model` in eval mode on its own device, in the graph's batches."""
    param = next(model.parameters())
    with torch.inference_mode():
        return predict(model.eval(), images.to(param.device), batch_size=batch_size, progress=False)


def _parity_problem(agreement: float, median: float, within: float, tolerance: float,
                    min_agreement: float) -> str | None:
    """Why the export fails parity, or None when it passes."""
    if agreement < min_agreement:
        return f"top-1 agreement with PyTorch {agreement:.2f}% is below {min_agreement}%"
    if median > tolerance:
        return (f"the median image's logits differ from PyTorch by {median:.4g} "
                f"(tolerance {tolerance:g}; only {within:.2f}% of images within it)")
    return None
