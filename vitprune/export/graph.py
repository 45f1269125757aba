"""The steps of `vitprune export`: check the outputs, export and verify the graph, save the
weights, describe the file for the report. Nothing here writes a final file by itself: the
caller gives temporary paths (`vitprune.io.atomic_output_file`) and keeps them only on success."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from vitprune.artifact import artifact_metadata, load_artifact, save_weights
from vitprune.errors import VitpruneError
from vitprune.export.verify import verify_onnx
from vitprune.io import file_sha256, writable_parent, write_error
from vitprune.models import input_shape
from vitprune.onnx_runtime import EXPORTER, export_onnx
from vitprune.plan import Plan

RANDOM_VERIFY_IMAGES = 8  # without data the export is still checked, on this many noise images
REDUCTION_OPS = ("TopK", "GatherElements", "ScatterElements", "CumSum", "ArgMin")


def check_outputs(onnx: Path, safetensors: Path | None, force: bool) -> None:
    """Refuse bad outputs before any long work."""
    outputs = [onnx] + ([safetensors] if safetensors is not None else [])
    if safetensors is not None and Path(safetensors).resolve() == Path(onnx).resolve():
        raise VitpruneError("safetensors names the same file as onnx", param="safetensors")
    for path in map(Path, outputs):
        if path.is_dir():
            raise VitpruneError(f"output {path} is a folder; give a file name", param="output")
        if path.exists() and not force:
            raise VitpruneError(f"output file {path} already exists; pass force to replace it", param=("output", "force"))
        _probe_folder(path, writable_parent(path))


def _probe_folder(path: Path, folder: Path) -> None:
    """Create and remove a file where `path` goes: the permission bits do not tell (root, /proc, a
    read-only mount, a full disk)."""
    try:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise write_error(path, error) from None


def existing_report(report_path: Path, model_name: str, plan_text: str, force: bool) -> dict | None:
    """A report.json already beside the ONNX file is extended when it describes the same model and
    plan (an artifact folder); another model's report is only replaced with `force`."""
    if not report_path.is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError, RecursionError):
        report = None
    if isinstance(report, dict) and report.get("model") == model_name and report.get("plan") == plan_text:
        return report
    if not force:
        raise VitpruneError(f"{report_path} describes another model or plan; write the ONNX file elsewhere "
                            "or pass force", param="force")
    return None


def random_images(model: nn.Module, count: int = RANDOM_VERIFY_IMAGES) -> Tensor:
    """Fixed noise images at the model's input size, for a check without real images."""
    return torch.randn(count, *input_shape(model), generator=torch.Generator().manual_seed(0))


def export_verified(model: nn.Module, path: Path, images: Tensor | Iterable[Tensor], *, real_images: bool,
                    batch: str | int, opset: int, fp16: bool, ats_padding: str, verify_batch: int, provider: str,
                    threads: int | None, progress: bool, count: int | None = None) -> dict:
    """Export `model` to `path` and check it on ONNX Runtime; the parity, or an error when it fails.
    `images`: held, or streamed in the graph's batches (`count` of them when known)."""
    export_onnx(model, path, batch=batch, opset=opset, fp16=fp16, ats_padding=ats_padding)
    parity = verify_onnx(model, path, images, batch_size=verify_batch, provider=provider, threads=threads,
                         progress=progress, count=count)
    if not parity["passed"]:
        raise VitpruneError(f"ONNX export rejected, nothing written: {parity['problem']}")
    parity["images"] = "real" if real_images else "random"  # random: noise images, without data
    return parity


def save_checked_weights(model: nn.Module, path: Path, info: dict, plan: Plan, images: Tensor) -> None:
    """The one-file artifact (weights + plan); `vitprune.load` of it must give the very same logits."""
    save_weights(model, path, artifact_metadata(model, info, plan))
    rebuilt = load_artifact(path)
    with torch.inference_mode():
        expected, got = model(images), rebuilt(images)
    if not torch.equal(expected, got):
        raise VitpruneError(f"the .safetensors round trip changed the logits (max difference "
                            f"{float((expected - got).abs().max()):.3g}); nothing written")


def onnx_file_summary(path: str | Path) -> dict:
    """Opset, size, batch and the operators that carry the reduction, read back from the file."""
    import onnx  # heavy, and only ONNX work needs it: loaded on first use

    model = onnx.load(str(path), load_external_data=False)
    ops = sorted({node.op_type for node in model.graph.node})
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "opset": max(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")),
        "bytes": Path(path).stat().st_size,
        "batch": dim.dim_value if dim.HasField("dim_value") else "dynamic",
        "reduction_ops": [op for op in ops if op in REDUCTION_OPS],
        "fp16": any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer),
    }


def onnx_section(name: str, path: Path, plan: Plan, ats_padding: str, parity: dict,
                 safetensors: Path | None) -> dict:
    """The report's "onnx" section (timings are added by the bench step); `sha256` is the file's."""
    section = {"file": name, **onnx_file_summary(path), "sha256": file_sha256(path), "exporter": EXPORTER,
               "ats_padding": ats_padding if plan.varies_per_image else None, "parity": parity}
    if safetensors is not None:
        section["safetensors"] = Path(safetensors).name
    return section
