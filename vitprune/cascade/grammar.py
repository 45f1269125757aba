"""The stage grammar: '112,160,224' / 'evit:0.5,evit:0.7,none' / '160:evit:0.7,tome:13,224' -> plans.

A stage is `[SIZE][:METHOD:SETTING]` or `@PLAN_FILE`. METHOD:SETTING is read by the method itself
(`Method.stage_settings`, its `stage_param`), so a new method needs nothing here.
"""
from __future__ import annotations

import json
import math

from vitprune import methods
from vitprune.errors import VitpruneError
from vitprune.methods import Method, Param
from vitprune.plan import Plan, make_plan, read_plan_file


def _stages_help() -> str:
    forms = ", ".join(f"{name}:{methods.get(name).stage_param.upper()}" for name in methods.names())
    return (f"stages are comma-separated, each [SIZE][:METHOD:SETTING] with METHOD {forms} or none, or @PLAN_FILE, "
            "e.g. '112,160,224', 'evit:0.5,evit:0.7,none' or '160:evit:0.7,224'")


STAGES_HELP = _stages_help()


def parse_stages(text: str, *, depth: int, base_size: int, patch_size: int = 16) -> list[Plan]:
    """'112,160,224' / 'evit:0.5,evit:0.7,none' / '160:evit:0.7,tome:13,224' -> one Plan per stage.

    A stage is `[SIZE][:METHOD:SETTING]`: SIZE the input size in pixels (default: the model's own,
    a multiple of the patch size), METHOD:SETTING the method's stage setting (evit:KEEP, ats:KEEP,
    tome:R; at the method's default layers) or `none`. Every plan carries its input size explicitly.
    """
    if not isinstance(text, str) or not text.strip():
        raise VitpruneError(f"no stages given; {STAGES_HELP}")
    plans = [_parse_stage(part.strip(), depth=depth, base_size=base_size, patch_size=patch_size)
             for part in text.split(",")]
    if len(plans) < 2:
        raise VitpruneError(f"a cascade needs at least 2 stages, got '{text}'; {STAGES_HELP}")
    keys = [json.dumps(plan.to_dict(), sort_keys=True) for plan in plans]
    repeated = next((plan for plan, key in zip(plans, keys, strict=True) if keys.count(key) > 1), None)
    if repeated is not None:
        raise VitpruneError(f"stage '{repeated.describe()}' appears twice in '{text}'; every stage must differ")
    return plans


def _parse_stage(part: str, *, depth: int, base_size: int, patch_size: int) -> Plan:
    if not part:
        raise VitpruneError(f"empty stage in the stage list; {STAGES_HELP}")
    if part.startswith("@"):
        return _plan_file_stage(part, depth=depth, base_size=base_size, patch_size=patch_size)
    tokens = [token.strip().lower() for token in part.split(":")]
    size = base_size
    if tokens[0].isdigit():
        size = int(tokens.pop(0))
        if size < patch_size or size % patch_size:
            raise VitpruneError(f"stage '{part}': input size {size} must be a positive multiple of the patch size "
                                f"{patch_size}")
    elif tokens[0][:1].isdigit() or tokens[0].startswith("-"):
        raise VitpruneError(f"stage '{part}': '{tokens[0]}' is not a whole input size in pixels; {STAGES_HELP}")
    if not tokens or tokens == ["none"]:
        return Plan(img_size=size)
    return _method_stage(part, tokens, depth=depth, size=size)


def _method_stage(part: str, tokens: list[str], *, depth: int, size: int) -> Plan:
    """`METHOD:SETTING` at the method's default layers."""
    name, *values = tokens
    if name not in methods.names():
        raise VitpruneError(f"stage '{part}': unknown method '{name}'; choose {', '.join(methods.names())} or none")
    spec = methods.get(name)
    param = _stage_param(spec)
    if len(values) != 1 or not values[0]:
        raise VitpruneError(f"stage '{part}': {name} takes exactly one setting, {param.name} ({param.help})")
    settings = _stage_settings(part, spec, param, values[0])
    try:
        return make_plan(name, depth, img_size=size, **settings)
    except VitpruneError as error:
        raise VitpruneError(f"stage '{part}': {error}") from None


def _stage_param(spec: Method) -> Param:
    return next(param for param in spec.params if param.name == spec.stage_param)


def _stage_settings(part: str, spec: Method, param: Param, value: str) -> dict:
    kind = "a whole number" if param.kind is int else "a number"
    try:
        settings = spec.stage_settings(value)
    except VitpruneError:
        raise VitpruneError(f"stage '{part}': setting '{value}' is not {kind}") from None
    if any(isinstance(number, float) and not math.isfinite(number) for number in settings.values()):
        raise VitpruneError(f"stage '{part}': setting '{value}' is not {kind}")
    return settings


def _plan_file_stage(part: str, *, depth: int, base_size: int, patch_size: int) -> Plan:
    """`@PATH`: the plan of a vitprune.json / artifact folder (e.g. from `vitprune calibrate`)."""
    plan, _ = read_plan_file(part[1:])
    size = plan.img_size or base_size
    if size % patch_size:
        raise VitpruneError(f"stage '{part}': its input size {size} is not a multiple of the patch size {patch_size}")
    try:
        plan.validate(depth)
    except VitpruneError as error:
        raise VitpruneError(f"stage '{part}': {error}") from None
    return Plan(reductions=plan.reductions, img_size=size, notes={"source": part[1:]})


def describe_stage(plan: Plan) -> str:
    """'112px, evit keep=0.5 @ 3,6,9': the input size, then the plan (`Plan.describe`) without its size."""
    what = "; ".join(part for part in plan.describe().split("; ") if not part.endswith("px"))
    what = "no reduction" if not plan.reductions else what
    return f"{plan.img_size}px, {what}"
