"""The cascade folder: cascade.json (stages, thresholds, the base model's identity), the base
weights once in model.safetensors, the report, and optionally onnx/."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from vitprune.artifact import identity_info, model_identity, save_weights, versions, write_report_files
from vitprune.cascade.exits import RESIZE
from vitprune.cascade.grammar import describe_stage
from vitprune.cascade.model import CascadeModel, build_cascade
from vitprune.cascade.onnx_cascade import write_onnx
from vitprune.cascade.schema import check_cascade_metadata
from vitprune.cascade.thresholds import threshold_entry, threshold_of
from vitprune.errors import VitpruneError
from vitprune.io import atomic_output_dir
from vitprune.models import create_model, load_state_dict_into
from vitprune.plan import Plan

CASCADE_FILE = "cascade.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "vitprune_cascade"  # not artifact.METADATA_KEY: the weights file alone is no single-model artifact
CASCADE_FORMAT = 1


def cascade_metadata(cascade: CascadeModel, info: dict) -> dict:
    if cascade.base is None:
        raise VitpruneError("this cascade has no base model to save (build it with build_cascade)")
    stages = zip(cascade.stage_sizes, cascade.plans, [*cascade.thresholds, None], cascade.stage_gmacs, strict=True)
    return {
        "format": CASCADE_FORMAT,
        "kind": "cascade",
        "model": model_identity(cascade.base, info),
        "criterion": cascade.criterion,
        "input_size": cascade.input_size,
        "resize": RESIZE,
        "stages": [
            {"img_size": size, "plan": plan.to_dict(), "describe": describe_stage(plan), **threshold_entry(threshold),
             "gmacs": round(gmacs, 6)}
            for size, plan, threshold, gmacs in stages
        ],
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_cascade(out_dir: str | Path, cascade: CascadeModel, info: dict, *, report: dict | None = None,
                 report_md: str | None = None, extra_files: dict[str, bytes] | None = None, force: bool = False,
                 onnx: bool = False) -> Path:
    """The cascade folder, atomically: cascade.json, the base weights once, the report and extras;
    with `onnx`, also onnx/ (one graph per stage + cascade_onnx.json, see `OnnxCascade`)."""
    metadata = cascade_metadata(cascade, info)
    with atomic_output_dir(out_dir, force=force) as tmp:
        save_weights(cascade.base, tmp / WEIGHTS_FILE, metadata, metadata_key=METADATA_KEY)
        (tmp / CASCADE_FILE).write_text(json.dumps(metadata, indent=2, allow_nan=False) + "\n")
        write_report_files(tmp, report, report_md, extra_files)
        if onnx:
            write_onnx(cascade, tmp / "onnx", opset=17, fp16=False)
    return Path(out_dir)


def read_cascade_metadata(path: str | Path) -> dict:
    """cascade.json of the folder `path`, checked field by field (`schema.check_cascade_metadata`)."""
    path = Path(path)
    file = path / CASCADE_FILE
    if not file.is_file():
        raise VitpruneError(f"{path} is not a vitprune cascade: no {CASCADE_FILE}")
    try:
        metadata = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deeply
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VitpruneError(f"cannot read {file}: {reason}") from None
    return check_cascade_metadata(metadata, str(file), CASCADE_FORMAT)


def load_cascade(path: str | Path, *, device: str | torch.device = "cpu") -> CascadeModel:
    """The CascadeModel saved at `path` (a folder written by `save_cascade`), in eval mode."""
    path = Path(path)
    metadata = read_cascade_metadata(path)
    base = _load_base(path / WEIGHTS_FILE, metadata["model"], path)
    stages = metadata["stages"]
    plans = [Plan.from_dict(stage["plan"], source=f"{path / CASCADE_FILE}: stages[{index}].plan")
             for index, stage in enumerate(stages)]
    thresholds = [threshold_of(stage) for stage in stages[:-1]]
    cascade = build_cascade(base, plans, thresholds, criterion=metadata.get("criterion", "maxprob"),
                            info=identity_info(metadata), stage_gmacs=[stage["gmacs"] for stage in stages])
    return cascade.to(device).eval()


def _load_base(weights: Path, identity: dict, folder: Path) -> nn.Module:
    """The unreduced base model of the identity, with the saved weights."""
    if not weights.is_file():
        raise VitpruneError(f"{folder} is missing {WEIGHTS_FILE}")
    name = identity["name"] + (f".{identity['tag']}" if identity.get("tag") else "")
    base, _ = create_model(name, pretrained=False, img_size=identity["img_size"], num_classes=identity["num_classes"])
    try:
        state_dict = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises several error types for a corrupt file
        raise VitpruneError(f"cannot read {weights}: {str(exc).splitlines()[0]}") from None
    load_state_dict_into(base, state_dict, source=str(weights))
    return base
