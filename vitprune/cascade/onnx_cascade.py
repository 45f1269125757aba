"""ONNX: one graph per stage, the thresholds in a manifest, a runner on ONNX Runtime.

The runner decides exits with the same loop as the PyTorch `CascadeModel` (`exits.run_exits`):
each ONNX Runtime session sits behind a small adapter that takes and returns torch tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vitprune.cascade.exits import RESIZE, run_exits
from vitprune.cascade.grammar import describe_stage
from vitprune.cascade.model import CascadeModel
from vitprune.cascade.schema import check_onnx_manifest
from vitprune.cascade.thresholds import threshold_entry, threshold_of
from vitprune.errors import VitpruneError
from vitprune.io import atomic_output_dir, file_sha256
from vitprune.onnx_runtime import export_onnx, onnx_session, run_session

ONNX_MANIFEST = "cascade_onnx.json"
MANIFEST_FORMAT = 1  # the cascade format it goes with (vitprune.cascade.artifact.CASCADE_FORMAT)


def write_onnx(cascade: CascadeModel, folder: Path, *, opset: int, fp16: bool) -> None:
    """stage1.onnx.. (dynamic batch, each at its own input size) and the manifest into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    stages = []
    last = len(cascade.stages) - 1
    for index, (stage, size, plan) in enumerate(zip(cascade.stages, cascade.stage_sizes, cascade.plans, strict=True)):
        name = f"stage{index + 1}.onnx"
        export_onnx(stage.cpu(), folder / name, batch="dynamic", opset=opset, fp16=fp16)
        threshold = cascade.thresholds[index] if index < last else None
        stages.append({"file": name, "sha256": file_sha256(folder / name), "img_size": size,
                       "describe": describe_stage(plan), **threshold_entry(threshold),
                       "gmacs": round(cascade.stage_gmacs[index], 6)})
    manifest = {"format": MANIFEST_FORMAT, "criterion": cascade.criterion, "input_size": cascade.input_size,
                "resize": RESIZE, "opset": opset, "fp16": fp16, "stages": stages}
    (folder / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")


def export_cascade_onnx(cascade: CascadeModel, out_dir: str | Path, *, opset: int = 17, fp16: bool = False,
                        force: bool = False) -> Path:
    """A folder with stage1.onnx.. (dynamic batch, each at its own input size) and cascade_onnx.json
    (thresholds, criterion, sizes); run it with `OnnxCascade`. Written atomically."""
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_onnx(cascade, tmp, opset=opset, fp16=fp16)
    return Path(out_dir)


class _SessionStage:
    """An ONNX Runtime session as a cascade stage: torch tensor in, torch tensor out."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, images: Tensor) -> Tensor:
        return torch.from_numpy(run_session(self.session, images))


class OnnxCascade:
    """Runs an exported cascade on ONNX Runtime with the same exit loop as `CascadeModel`.

    Input: a float32 (B, 3, H, W) batch preprocessed at the manifest's `input_size`; smaller stages
    get it resized with torch's bicubic antialiased interpolation (the one op not in the graphs,
    so every stage sees exactly what it sees in PyTorch).

    `verify`: refuse a stage graph whose sha256 is not the one the manifest recorded when it was
    written (False loads graphs changed on purpose, e.g. optimised offline).
    """

    def __init__(self, folder: str | Path, *, provider: str = "auto", threads: int | None = None,
                 verify: bool = True) -> None:
        folder = Path(folder)
        self.manifest = _read_manifest(folder)
        entries = self.manifest["stages"]
        self.criterion = self.manifest.get("criterion", "maxprob")
        self.input_size = int(self.manifest["input_size"])
        self.stage_sizes = [int(entry["img_size"]) for entry in entries]
        self.stage_gmacs = [float(entry["gmacs"]) for entry in entries]
        self.thresholds = [threshold_of(entry) for entry in entries[:-1]]
        for entry in entries:
            _check_graph(folder, entry, verify)
        self.sessions = [onnx_session(folder / entry["file"], provider=provider, threads=threads) for entry in entries]

    def __call__(self, images):
        return self.run(images)[0]

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(logits (B, C), exit stage (B,)) as numpy arrays; `images` a numpy array or a tensor."""
        array = np.ascontiguousarray(images.numpy() if isinstance(images, Tensor) else images, dtype=np.float32)
        stages = [_SessionStage(session) for session in self.sessions]
        run = run_exits(torch.from_numpy(array), stages, self.stage_sizes, self.thresholds, self.criterion)
        return run.logits.numpy(), run.exit_stage.numpy()


def _read_manifest(folder: Path) -> dict:
    """cascade_onnx.json, checked field by field (`schema.check_onnx_manifest`)."""
    manifest_file = folder / ONNX_MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise VitpruneError(f"{folder} is not an exported cascade: no {ONNX_MANIFEST}") from None
    except (OSError, ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deeply
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitpruneError(f"cannot read {manifest_file}: {reason}") from None
    return check_onnx_manifest(manifest, str(manifest_file), MANIFEST_FORMAT)


def _check_graph(folder: Path, entry: dict, verify: bool) -> None:
    """A stage graph is there and, with `verify`, has the sha256 the manifest recorded (when it has one)."""
    path = folder / entry["file"]
    if not path.is_file():
        raise VitpruneError(f"{folder} is missing {entry['file']}, a stage graph {ONNX_MANIFEST} names")
    if verify and entry.get("sha256") is not None and file_sha256(path) != entry["sha256"]:
        raise VitpruneError(f"{path} changed since it was written (sha256 mismatch with {ONNX_MANIFEST}); "
                            "pass verify=False to load it anyway")
