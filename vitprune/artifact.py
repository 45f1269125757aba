"""The artifact every command reads and writes: base weights + the plan that reduces them.

A folder holds `model.safetensors` (the base model's weights, with the plan in its metadata),
`vitprune.json` (the plan, the base model's identity, versions) and `report.json`/`report.md`.
`load` rebuilds the identical reduced model from the folder or from the .safetensors alone.
"""
from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from torch import nn

from vitprune import __version__
from vitprune.errors import VitpruneError
from vitprune.io import atomic_output_dir, file_sha256
from vitprune.models import checked_size, create_model, load_state_dict_into, size_record
from vitprune.patch import apply_plan, plan_of
from vitprune.plan import Plan

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "vitprune.json"
METADATA_KEY = "vitprune"
WEIGHTS_SHA256_KEY = "weights_sha256"  # vitprune.json: of the weights file; the file's own metadata: of its content
ARTIFACT_FORMAT = 1  # the newest artifact format this version reads and the one it writes
TEACHER_KEY = "teacher"  # a fine-tuned artifact's teacher (vitprune.teacher), in vitprune.json and in `info`


def versions() -> dict:
    return {"vitprune": __version__, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}


def model_identity(model: nn.Module, info: dict) -> dict:
    """What `load` needs to rebuild the architecture: timm name and tag, classes, input size."""
    return {
        "name": info["model"],
        "tag": info.get("tag"),
        "checkpoint": info.get("checkpoint"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "num_classes": model.num_classes,
        "img_size": size_record(model),
        **({"model_args": info["model_args"]} if info.get("model_args") else {}),
    }


def artifact_metadata(model: nn.Module, info: dict, plan: Plan) -> dict:
    return {
        "format": ARTIFACT_FORMAT,
        "model": model_identity(model, info),
        "plan": plan.to_dict(),
        "method": plan.method,
        "params": plan.params(),
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({TEACHER_KEY: info[TEACHER_KEY]} if info.get(TEACHER_KEY) else {}),
    }


def finite_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict on the CPU, refused when a weight is NaN or infinite (`load` would refuse it)."""
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    bad = next((name for name, tensor in tensors.items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise VitpruneError(f"model holds non-finite weights (NaN or infinity in {bad}); nothing written",
                            param="model")
    return tensors


def content_sha256(metadata_text: str, tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of a weights file's content, independent of its byte layout: the metadata text, then
    each tensor (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256(metadata_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"\n{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_weights(model: nn.Module, path: Path, metadata: dict, metadata_key: str = METADATA_KEY) -> None:
    """Base weights (the plan adds none) with the metadata, so the one file is a full artifact. The file's
    metadata also holds the sha256 of its content (`content_sha256`), which `load` checks."""
    tensors = finite_weights(model)
    text = json.dumps(metadata, allow_nan=False)
    try:
        safetensors.torch.save_file(tensors, str(path), metadata={
            metadata_key: text, WEIGHTS_SHA256_KEY: content_sha256(text, tensors)})
    except OSError:
        raise
    except Exception as error:  # safetensors' own error type wraps the OS error (a full disk, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        if "No space left" in reason:
            raise VitpruneError(f"disk full while writing {path}") from None
        raise VitpruneError(f"cannot write {path}: {reason}") from None


def write_artifact(out_dir: str | Path, model: nn.Module, info: dict, *, report: dict | None = None,
                   report_md: str | None = None, force: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write the artifact folder atomically. `model` must carry its plan (see `vitprune.apply`).
    vitprune.json records the sha256 of the weights file, which `load_artifact` verifies."""
    plan = plan_of(model) or Plan()
    metadata = artifact_metadata(model, info, plan)
    with atomic_output_dir(out_dir, force=force) as tmp:
        save_weights(model, tmp / WEIGHTS_FILE, metadata)
        metadata[WEIGHTS_SHA256_KEY] = file_sha256(tmp / WEIGHTS_FILE)
        (tmp / PLAN_FILE).write_text(json.dumps(metadata, indent=2, allow_nan=False) + "\n")
        write_report_files(tmp, report, report_md, extra_files)
    return Path(out_dir)


def write_report_files(folder: Path, report: dict | None, report_md: str | None,
                       extra_files: dict[str, bytes] | None) -> None:
    """report.json (strict JSON), report.md and any extra files (plots, CSVs) into an artifact folder being written."""
    if report is not None:
        (folder / "report.json").write_text(report_json(report))
    if report_md is not None:
        (folder / "report.md").write_text(report_md)
    for name, data in (extra_files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def report_json(report: dict) -> str:
    """A report as strict JSON: a non-finite figure is an error, never a result."""
    try:
        return json.dumps(report, indent=2, allow_nan=False) + "\n"
    except ValueError:
        raise VitpruneError("a measured figure is not finite (NaN or infinity); nothing was written") from None


def read_metadata(path: str | Path) -> dict:
    """The artifact metadata of a folder (its vitprune.json) or of a .safetensors file, schema-checked."""
    return _read_metadata(Path(path))[0]


def _read_metadata(path: Path) -> tuple[dict, dict[str, str]]:
    """(the checked metadata, the weights file's own header metadata: {} for a folder)."""
    if path.is_dir():
        plan_file = path / PLAN_FILE
        if not plan_file.is_file():
            raise VitpruneError(f"{path} is not a vitprune artifact: no {PLAN_FILE}")
        try:
            text = plan_file.read_text()
        except (OSError, ValueError) as exc:
            raise VitpruneError(f"cannot read {plan_file}: {str(exc).splitlines()[0]}") from None
        return check_metadata(_parse_json(text, str(plan_file)), str(plan_file)), {}
    if not path.exists():
        raise VitpruneError(f"no such artifact: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several error types for a corrupt header
        raise VitpruneError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    if METADATA_KEY not in header:
        raise VitpruneError(f"{path} has no vitprune plan in its metadata; give a model name and its checkpoint instead")
    return check_metadata(_parse_json(header[METADATA_KEY], f"the vitprune metadata of {path}"), str(path)), header


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise VitpruneError(f"cannot read {source}: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # nesting deeper than Python's stack: no artifact vitprune writes
        raise VitpruneError(f"cannot read {source}: its JSON is nested too deeply") from None


def check_metadata(metadata: object, source: str) -> dict:
    """The fields `load_artifact` reads, with their types: a bad file is a VitpruneError naming the field."""
    if not isinstance(metadata, dict):
        raise VitpruneError(f"{source}: artifact metadata must be a JSON object, got {type(metadata).__name__}")
    check_format(metadata, source)
    identity = metadata.get("model")
    if not isinstance(identity, dict):
        raise VitpruneError(f"{source}: field model must be an object naming the base model")
    for key, kinds, what in (("name", (str,), "a timm model name"), ("img_size", (int, list), "a whole number"),
                             ("num_classes", (int,), "a whole number"), ("tag", (str, type(None)), "a string or null")):
        value = identity.get(key)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise VitpruneError(f"{source}: field model.{key} must be {what}, got {value!r}")
    checked_size(identity["img_size"], f"{source}: field model.img_size", param=None)  # a side or [height, width]
    if "plan" not in metadata:
        raise VitpruneError(f"{source}: field plan is missing")
    Plan.from_dict(metadata["plan"], source=source)  # checks every field of the plan
    return metadata


def check_format(metadata: dict, source: str) -> None:
    """An artifact format this version reads: a newer one is refused naming both versions."""
    written = metadata.get("format")
    if not isinstance(written, int) or isinstance(written, bool) or written < 1:
        raise VitpruneError(f"{source}: field format must be a whole number >= 1, got {written!r}")
    if written > ARTIFACT_FORMAT:
        versions_written = metadata.get("versions")
        by = versions_written.get("vitprune") if isinstance(versions_written, dict) else None
        raise VitpruneError(f"{source} has artifact format {written}" + (f" (written by vitprune {by})" if by else "")
                            + f"; this vitprune {__version__} reads format {ARTIFACT_FORMAT} and older: upgrade "
                            "vitprune to load it")


def load_artifact(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """The reduced model saved at `path` (an artifact folder or its .safetensors), in eval mode."""
    artifact = read_artifact(path, verify=verify)
    return apply_plan(artifact.model, artifact.plan).to(device).eval()


@dataclass(frozen=True)
class Artifact:
    """An artifact as read: its base model (unreduced, eval mode, on the CPU), its plan and its metadata."""

    model: nn.Module
    plan: Plan
    metadata: dict


def read_artifact(path: str | Path, *, verify: bool = True) -> Artifact:
    """The base model, plan and metadata of the artifact at `path`, read once; the plan is not applied.

    The weights must match the sha256 their artifact recorded: a folder's vitprune.json records the
    weights file's; a lone .safetensors records its content's in its own metadata. An artifact without
    a valid hash (edited on purpose, or written by hand) loads only with `verify=False`."""
    path = Path(path)
    metadata, header = _read_metadata(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise VitpruneError(f"{path} is missing {WEIGHTS_FILE}")
    if verify and path.is_dir():
        _check_hash(metadata.get(WEIGHTS_SHA256_KEY), lambda: file_sha256(weights), weights, f"{PLAN_FILE} records")
    identity = metadata["model"]
    plan = Plan.from_dict(metadata["plan"], source=str(path))
    name = identity["name"] + (f".{identity['tag']}" if identity.get("tag") else "")
    model, _ = create_model(name, pretrained=False, img_size=identity["img_size"], num_classes=identity["num_classes"],
                            model_args=identity.get("model_args"))
    try:
        state_dict = safetensors.torch.load_file(str(weights))
    except Exception as exc:
        raise VitpruneError(f"cannot read {weights}: {str(exc).splitlines()[0]}") from None
    if verify and not path.is_dir():
        check_content_sha256(weights, header, METADATA_KEY, state_dict)
    load_state_dict_into(model, state_dict, source=str(weights))
    return Artifact(model=model.eval(), plan=plan, metadata=metadata)


def check_content_sha256(path: Path, header: dict[str, str], metadata_key: str,
                         tensors: dict[str, torch.Tensor]) -> None:
    """A .safetensors file's content must match the sha256 its own metadata records (`save_weights`)."""
    _check_hash(header.get(WEIGHTS_SHA256_KEY), lambda: content_sha256(header.get(metadata_key, ""), tensors),
                path, "its metadata records")


def _check_hash(recorded: object, actual: Callable[[], str], weights: Path, where: str) -> None:
    if not isinstance(recorded, str):
        raise VitpruneError(f"{weights} carries no sha256 of its weights, so its integrity cannot be checked; "
                            "pass verify=False to load it anyway", param="verify")
    if recorded != actual():
        raise VitpruneError(f"{weights} changed since it was written (sha256 mismatch with what {where}); "
                            "pass verify=False to load it anyway", param="verify")


def identity_info(metadata: dict) -> dict:
    """The `create_model` info dict of an artifact's base model (for reports of derived artifacts)."""
    identity = metadata["model"]
    return {"model": identity["name"], "tag": identity.get("tag"), "checkpoint": identity.get("checkpoint"),
            "checkpoint_sha256": identity.get("checkpoint_sha256"), "img_size": identity["img_size"],
            **({"model_args": identity["model_args"]} if identity.get("model_args") else {})}
