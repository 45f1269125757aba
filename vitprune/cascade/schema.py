"""cascade.json and onnx/cascade_onnx.json checked field by field when they are read: a broken or
hand-edited file is refused with one line naming the file and the field
(`.../cascade.json: stages[1].threshold must be a number or null, got 'abc'`), never a KeyError
or TypeError deep inside loading."""
from __future__ import annotations

import re
from pathlib import PurePath

from vitprune.cascade.exits import CRITERIA
from vitprune.checks import is_finite_number, is_whole
from vitprune.errors import VitpruneError
from vitprune.plan import Plan

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def check_cascade_metadata(metadata: object, source: str, expected_format: int) -> dict:
    """cascade.json's content (`source` names the file): its format, the base model, every stage."""
    data = _object(metadata, source, expected_format)
    model = _field(data, "model", source)
    _check(isinstance(model, dict), source, "model", "an object", model)
    _check(isinstance(_field(model, "name", source, "model."), str) and model["name"], source, "model.name",
           "a timm model name", model["name"])
    _check(model.get("tag") is None or isinstance(model["tag"], str), source, "model.tag", "a string or null",
           model.get("tag"))
    _whole(_field(model, "img_size", source, "model."), source, "model.img_size", 1)
    _whole(_field(model, "num_classes", source, "model."), source, "model.num_classes", 0)
    stages = _stages(data, source)
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        _check(isinstance(stage, dict), source, where, "an object", stage)
        Plan.from_dict(_field(stage, "plan", source, f"{where}."), source=f"{source}: {where}.plan")
        _stage_numbers(stage, source, where, last=index == len(stages) - 1)
    return data


def check_onnx_manifest(manifest: object, source: str, expected_format: int) -> dict:
    """cascade_onnx.json's content: its format, the input size, every stage's graph file and numbers."""
    data = _object(manifest, source, expected_format)
    _whole(_field(data, "input_size", source), source, "input_size", 1)
    stages = _stages(data, source)
    for index, stage in enumerate(stages):
        where = f"stages[{index}]"
        _check(isinstance(stage, dict), source, where, "an object", stage)
        file = _field(stage, "file", source, f"{where}.")
        _check(isinstance(file, str) and file not in ("", ".", "..") and PurePath(file).name == file, source,
               f"{where}.file", "a file name in the folder", file)
        _whole(_field(stage, "img_size", source, f"{where}."), source, f"{where}.img_size", 1)
        sha256 = stage.get("sha256")
        _check(sha256 is None or (isinstance(sha256, str) and SHA256_PATTERN.fullmatch(sha256) is not None),
               source, f"{where}.sha256", "64 hexadecimal digits or null", sha256)
        _stage_numbers(stage, source, where, last=index == len(stages) - 1)
    return data


def _object(content: object, source: str, expected_format: int) -> dict:
    """The file's top level: a JSON object of the format this vitprune reads, with a known criterion."""
    if not isinstance(content, dict):
        raise VitpruneError(f"{source}: must be a JSON object, got {type(content).__name__}")
    if content.get("format") != expected_format:
        raise VitpruneError(f"{source} has format {content.get('format')!r}; this vitprune reads format "
                            f"{expected_format}")
    criterion = content.get("criterion", CRITERIA[0])
    _check(criterion in CRITERIA, source, "criterion", " or ".join(CRITERIA), criterion)
    return content


def _stages(data: dict, source: str) -> list:
    stages = _field(data, "stages", source)
    _check(isinstance(stages, list) and len(stages) >= 2, source, "stages", "a list of at least 2 stages", stages)
    return stages


def _stage_numbers(stage: dict, source: str, where: str, *, last: bool) -> None:
    """A stage's GMACs and, for every stage but the last, its threshold (null: nobody leaves)."""
    gmacs = _field(stage, "gmacs", source, f"{where}.")
    _check(is_finite_number(gmacs) and gmacs >= 0, source, f"{where}.gmacs", "a number >= 0", gmacs)
    exit_always = stage.get("exit_always", False)
    _check(isinstance(exit_always, bool), source, f"{where}.exit_always", "true or false", exit_always)
    if last:
        return
    threshold = _field(stage, "threshold", source, f"{where}.")
    _check(threshold is None or is_finite_number(threshold), source, f"{where}.threshold", "a number or null", threshold)


def _field(data: dict, key: str, source: str, where: str = "") -> object:
    if key not in data:
        raise VitpruneError(f"{source}: {where}{key} is missing")
    return data[key]


def _whole(value: object, source: str, name: str, minimum: int) -> None:
    _check(is_whole(value, minimum), source, name, f"a whole number >= {minimum}", value)


def _check(ok: object, source: str, name: str, rule: str, value: object) -> None:
    if not ok:
        shown = repr(value)
        raise VitpruneError(f"{source}: {name} must be {rule}, got {shown if len(shown) <= 60 else shown[:57] + '...'}")
