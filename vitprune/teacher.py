"""The model a fine-tuned artifact was trained from (its teacher), kept with the artifact, so that
every later report judges the fine-tuned model against the model the user started from.

Fine-tuning changes few tensors (by default the norms and biases), so the artifact keeps only the
teacher's values of the tensors that differ (`teacher.safetensors`); the teacher is the artifact's
weights with those put back. vitprune.json's `teacher` names it (model, weights source, the weights
file's sha256) and holds the sha256 of the teacher's whole state, checked when it is rebuilt. Like
every .safetensors vitprune writes, teacher.safetensors carries the sha256 of its content in its own
metadata (`artifact.content_sha256`); a missing or wrong one is refused unless `verify=False`.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from vitprune.artifact import TEACHER_KEY, WEIGHTS_SHA256_KEY, check_content_sha256, content_sha256
from vitprune.errors import VitpruneError
from vitprune.models import checked_size, set_image_size, size_record

TEACHER_FILE = "teacher.safetensors"


def state_sha256(model: nn.Module) -> str:
    """sha256 of a model's state: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def teacher_record(teacher: nn.Module, student: nn.Module, info: dict) -> tuple[dict, bytes]:
    """(the teacher's record for vitprune.json, the teacher.safetensors bytes). `info` is the teacher's
    `create_model` info."""
    record = {
        "model": info["model"] + (f".{info['tag']}" if info.get("tag") else ""),
        "checkpoint": info.get("checkpoint"),
        "checkpoint_sha256": info.get("checkpoint_sha256"),
        "img_size": size_record(teacher),  # the student's may be smaller (a plan's input size)
    }
    return carry_teacher(teacher, student, record)


def carry_teacher(teacher: nn.Module, student: nn.Module, record: dict) -> tuple[dict, bytes]:
    """(`record` with its file's fields, the teacher.safetensors bytes: the teacher's tensors that differ
    from the student's, the position embedding too when the student runs at another input size). Also
    how an artifact made from a fine-tuned one (apply, calibrate) keeps its teacher."""
    student_state = student.state_dict()
    changed = {name: tensor.detach().cpu().contiguous() for name, tensor in teacher.state_dict().items()
               if name not in student_state or not torch.equal(tensor.cpu(), student_state[name].cpu())}
    text = json.dumps({"model": record["model"], "tensors": len(changed)})
    data = safetensors.torch.save(changed, metadata={TEACHER_KEY: text, WEIGHTS_SHA256_KEY: content_sha256(text, changed)})
    # the teacher as carried (its head removed for --features): what the file rebuilds
    return {**record, "weights_sha256": state_sha256(teacher), "file": TEACHER_FILE,
            "file_sha256": hashlib.sha256(data).hexdigest(), "tensors": len(changed)}, data


def teacher_of(source: str | Path, unreduced: nn.Module, metadata: dict, *,
               verify: bool = True) -> tuple[nn.Module | None, dict | None]:
    """(the teacher rebuilt from the artifact at `source`, its record). `unreduced` is the artifact's
    model without its plan, `metadata` its checked metadata. (None, None) when the artifact was not
    fine-tuned; (None, record) when its teacher's tensors are not with it (the one-file .safetensors
    form). With `verify`, teacher.safetensors must match the sha256 of its content in its own metadata
    and the file sha256 vitprune.json records."""
    record = metadata.get(TEACHER_KEY)
    if not isinstance(record, dict):
        return None, None
    path = Path(source) / TEACHER_FILE
    if not path.is_file():
        return None, record
    tensors = _read_teacher_file(path, record, verify)
    teacher = copy.deepcopy(unreduced)
    size = record.get("img_size")
    if size is not None and size != size_record(teacher):
        set_image_size(teacher, checked_size(size, f"{source}'s teacher img_size", param=None))  # its position embedding: below
    state = dict(teacher.state_dict())
    state.update(tensors)
    try:
        teacher.load_state_dict(state, strict=True)
    except RuntimeError as error:  # a tensor of another shape or name
        raise VitpruneError(f"{path} does not fit the artifact's model: {str(error).splitlines()[0]}") from None
    if verify and state_sha256(teacher) != record.get("weights_sha256"):
        raise VitpruneError(f"the teacher rebuilt from {path} is not the one recorded in vitprune.json "
                            "(weights_sha256 mismatch); pass verify=False to load it anyway", param="verify")
    return teacher.eval(), record


def _read_teacher_file(path: Path, record: dict, verify: bool) -> dict[str, torch.Tensor]:
    """teacher.safetensors' tensors; with `verify`, checked against the sha256 of its content (its own
    metadata) and the file sha256 vitprune.json records."""
    data = path.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except Exception as error:  # safetensors raises several error types for a corrupt file
        raise VitpruneError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if verify:
        check_content_sha256(path, header, TEACHER_KEY, tensors)
        if hashlib.sha256(data).hexdigest() != record.get("file_sha256"):
            raise VitpruneError(f"{path} changed since it was written (sha256 mismatch with what {TEACHER_KEY} in "
                                "vitprune.json records); pass verify=False to load it anyway", param="verify")
    return tensors


def describe_teacher(record: dict) -> str:
    """One line naming the teacher: model, weights source and the weights file's sha256."""
    source = record.get("checkpoint") or "pretrained weights"
    sha = record.get("checkpoint_sha256") or record.get("weights_sha256")
    return f"{record['model']} ({source}, sha256 {str(sha)[:12]})"


def reference_markdown(section: dict | None) -> str:
    """report.md's lines on what the figures are judged against (empty when not a fine-tuned artifact)."""
    if not section:
        return ""
    teacher = describe_teacher(section["teacher"])
    if section["compared_with"] != "teacher":
        return (f"\nThe base column is the fine-tuned weights unreduced: {section.get('note', '')}. "
                f"The model was fine-tuned from {teacher}.\n")
    lines = [f"\nThe base column is the teacher this artifact was fine-tuned from: {teacher}."]
    unreduced = section.get("finetuned_unreduced")
    if unreduced:
        figures = ", ".join(f"{key} {unreduced[key]}" for key in ("top1", "agreement", "kl") if key in unreduced)
        lines.append(f"Second baseline, the fine-tuned weights unreduced: GMACs {unreduced['gmacs']:.3f}"
                     + (f", {figures} (against the teacher)" if figures else "") + ".")
    return " ".join(lines) + "\n"
