"""The stage list: stages separated by ';' (or ',' when no stage has a comma), each a plan in the plan
grammar (`vitprune.plan.PLAN_GRAMMAR`, its SIZEpx term the stage's input size) or `@PLAN_FILE`:

    '112px;160px;224px'    'evit:0.5;evit:0.7;none'    'tome:r=8@0-5+160px;224px'    '112,160,224'

A leading `SIZE:` is the input size too (`160:evit:0.7`). The plan grammar reads every method's
declared parameters, so a new method needs nothing here.
"""
from __future__ import annotations

from vitprune.errors import VitpruneError
from vitprune.plan import PLAN_GRAMMAR, Plan, make_plan, read_plan_file

STAGES_HELP = ("stages are separated by ';' (or ',' when no stage has a comma), cheapest first, each a plan "
               f"({PLAN_GRAMMAR}; SIZEpx or a leading SIZE: is its input size) or @PLAN_FILE, e.g. "
               "'112,160,224', 'evit:0.5,evit:0.7,none' or 'tome:r=8@0-5+160px;224px'")


def parse_stages(text: str, *, depth: int, base_size: int, patch_size: int = 16) -> list[Plan]:
    """The stage list -> one Plan per stage, each carrying its input size (default: the model's own,
    a multiple of the patch size)."""
    if not isinstance(text, str) or not text.strip():
        raise VitpruneError(f"no stages given; {STAGES_HELP}", param="stages")
    parts = text.split(";" if ";" in text else ",")
    plans = [_parse_stage(part.strip(), depth=depth, base_size=base_size, patch_size=patch_size) for part in parts]
    if len(plans) < 2:
        raise VitpruneError(f"a cascade needs at least 2 stages, got '{text}'; {STAGES_HELP}", param="stages")
    repeated = next((plan for index, plan in enumerate(plans) if plan in plans[index + 1:]), None)
    if repeated is not None:
        raise VitpruneError(f"stage '{repeated.describe()}' appears twice in '{text}'; every stage must differ",
                            param="stages")
    return plans


def _parse_stage(part: str, *, depth: int, base_size: int, patch_size: int) -> Plan:
    if not part:
        raise VitpruneError(f"empty stage in the stage list; {STAGES_HELP}", param="stages")
    if part.startswith("@"):
        plan, _ = read_plan_file(part[1:])
        plan = Plan(reductions=plan.reductions, img_size=plan.img_size, head_only=plan.head_only,
                    notes={"source": part[1:]})
    else:
        size, colon, rest = (text.strip() for text in part.partition(":"))
        leading = (size[:1].isdigit() or size.startswith("-")) and "+" not in size and not size.endswith("px")
        if leading:  # a leading SIZE, alone or before the plan
            if not size.isdigit():
                raise VitpruneError(f"stage '{part}': '{size}' is not a whole input size in pixels; {STAGES_HELP}",
                                    param="stages")
            _check_size(part, int(size), patch_size)
        spec = f"{rest or 'none'}+{size}px" if leading else part
        try:
            plan = make_plan(spec, depth)
        except VitpruneError as error:
            raise VitpruneError(f"stage '{part}': {error}", param="stages") from None
    size = plan.img_size or base_size
    _check_size(part, size, patch_size)
    try:
        plan.validate(depth)
    except VitpruneError as error:
        raise VitpruneError(f"stage '{part}': {error}", param="stages") from None
    return Plan(reductions=plan.reductions, img_size=size, head_only=plan.head_only, notes=plan.notes)


def _check_size(part: str, size: int, patch_size: int) -> None:
    if size < patch_size or size % patch_size:
        raise VitpruneError(f"stage '{part}': input size {size} must be a positive multiple of the patch size "
                            f"{patch_size}", param="stages")


def describe_stage(plan: Plan) -> str:
    """The stage in the plan grammar (its size included): pasted into --stages it is the same stage."""
    return plan.describe()
