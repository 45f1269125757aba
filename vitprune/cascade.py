"""DVT-style dynamic inference: a cascade of cheap-to-expensive stages on the same pretrained ViT.

Every stage is the same weights at some input size and reduction plan. An image runs the first
stage; when the stage's confidence (max softmax probability, or minus the entropy) reaches the
stage's threshold it exits with that answer, otherwise it goes on to the next stage; the last
stage always answers. Thresholds are calibrated so that the mean GMACs per image on calibration
images meets a budget with the best accuracy (DVT, NeurIPS 2021; training-free here).

    stages = parse_stages("112,160,224", depth=12, base_size=224, patch_size=16)
    cascade = build_cascade(base, stages, thresholds=[0.6, 0.5])
    logits = cascade(images)               # images preprocessed at cascade.input_size

Batched: the whole batch runs stage 1, the undecided images are gathered (boolean index) and
only they run stage 2, and so on; answers are scattered back in input order. A stage at another
input size than the batch gets the batch resized inside the cascade (bicubic, antialiased), so one
preprocessed tensor feeds every stage.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.plan import METHODS, Plan, make_plan

CASCADE_FILE = "cascade.json"
WEIGHTS_FILE = "model.safetensors"
METADATA_KEY = "vitprune_cascade"  # not artifact.METADATA_KEY: the weights file alone is no single-model artifact
CASCADE_FORMAT = 1
CRITERIA = ("maxprob", "entropy")
RESIZE = {"mode": "bicubic", "antialias": True, "align_corners": False}
STAGES_HELP = ("stages are comma-separated, each [SIZE][:METHOD:SETTING] with METHOD evit:KEEP, ats:KEEP, "
               "tome:R or none, or @PLAN_FILE, e.g. '112,160,224', 'evit:0.5,evit:0.7,none' or '160:evit:0.7,224'")


# ----------------------------------------------------------------------------------------------
# Stage grammar
# ----------------------------------------------------------------------------------------------

def parse_stages(text: str, *, depth: int, base_size: int, patch_size: int = 16) -> list[Plan]:
    """'112,160,224' / 'evit:0.5,evit:0.7,none' / '160:evit:0.7,tome:13,224' -> one Plan per stage.

    A stage is `[SIZE][:METHOD:SETTING]`: SIZE the input size in pixels (default: the model's own,
    a multiple of the patch size), METHOD:SETTING one of evit:KEEP, ats:KEEP, tome:R (at the
    method's default layers) or `none`. Every plan carries its input size explicitly.
    """
    if not isinstance(text, str) or not text.strip():
        raise VitpruneError(f"no stages given; {STAGES_HELP}")
    plans = [_parse_stage(part.strip(), depth=depth, base_size=base_size, patch_size=patch_size)
             for part in text.split(",")]
    if len(plans) < 2:
        raise VitpruneError(f"a cascade needs at least 2 stages, got '{text}'; {STAGES_HELP}")
    keys = [json.dumps(plan.to_dict(), sort_keys=True) for plan in plans]
    repeated = next((plan for plan, key in zip(plans, keys) if keys.count(key) > 1), None)
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
            raise VitpruneError(f"stage '{part}': input size {size} must be a positive multiple of the patch size {patch_size}")
    elif tokens[0][:1].isdigit() or tokens[0].startswith("-"):
        raise VitpruneError(f"stage '{part}': '{tokens[0]}' is not a whole input size in pixels; {STAGES_HELP}")
    if not tokens or tokens == ["none"]:
        return Plan(img_size=size)
    method, *settings = tokens
    if method not in METHODS:
        raise VitpruneError(f"stage '{part}': unknown method '{method}'; choose evit, ats, tome or none")
    if len(settings) != 1 or not settings[0]:
        what = "R (tokens merged per layer)" if method == "tome" else "a keep rate"
        raise VitpruneError(f"stage '{part}': {method} takes exactly one setting, {what}, e.g. "
                            + ("tome:13" if method == "tome" else f"{method}:0.7"))
    setting = settings[0]
    try:
        if method == "tome":
            return make_plan("tome", depth, r=int(setting), img_size=size)
        keep = float(setting)
        if not math.isfinite(keep):
            raise ValueError(setting)
        return make_plan(method, depth, keep=keep, img_size=size)
    except ValueError:
        kind = "a whole number" if method == "tome" else "a number"
        raise VitpruneError(f"stage '{part}': setting '{setting}' is not {kind}") from None
    except VitpruneError as error:
        raise VitpruneError(f"stage '{part}': {error}") from None


def _plan_file_stage(part: str, *, depth: int, base_size: int, patch_size: int) -> Plan:
    """`@PATH`: the plan of a vitprune.json / artifact folder (e.g. from `vitprune calibrate`)."""
    from vitprune.plan import read_plan_file

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
    what = "; ".join(part for part in plan.describe().split("; ") if not part.endswith("px"))
    what = "no reduction" if not plan.reductions else what
    return f"{plan.img_size}px, {what}"


# ----------------------------------------------------------------------------------------------
# The cascade module
# ----------------------------------------------------------------------------------------------

def confidence(logits: Tensor, criterion: str = "maxprob") -> Tensor:
    """Per-image confidence, higher = surer: max softmax probability, or minus the entropy (nats)."""
    probs = logits.float().softmax(dim=-1)
    if criterion == "maxprob":
        return probs.max(dim=-1).values
    if criterion == "entropy":
        return (probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
    raise VitpruneError(f"unknown confidence criterion '{criterion}'; choose {' or '.join(CRITERIA)}")


def resize_to(images: Tensor, size: int) -> Tensor:
    """The preprocessed batch at another input size (bicubic, antialiased), unchanged when it fits."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), **RESIZE)


class CascadeModel(nn.Module):
    """Stages of increasing cost; each image answers at the first stage confident enough.

    `stages[i]` are timm ViTs (reduced by `vitprune.patch.apply_plan`) sharing their weight tensors;
    `thresholds[i]` is the confidence at or above which an image leaves stage i (one per stage but
    the last, which always answers). forward(images) -> logits, images preprocessed at `input_size`.
    """

    def __init__(self, stages: Sequence[nn.Module], thresholds: Sequence[float], *, criterion: str = "maxprob",
                 stage_gmacs: Sequence[float] | None = None, base: nn.Module | None = None,
                 info: dict | None = None) -> None:
        super().__init__()
        from vitprune.flops import count_macs
        from vitprune.patch import model_img_size

        if len(stages) < 2:
            raise VitpruneError(f"a cascade needs at least 2 stages, got {len(stages)}")
        if criterion not in CRITERIA:
            raise VitpruneError(f"unknown confidence criterion '{criterion}'; choose {' or '.join(CRITERIA)}")
        self.stages = nn.ModuleList(stages)
        self.criterion = criterion
        self.set_thresholds(thresholds)
        self.stage_sizes = [model_img_size(stage) for stage in stages]
        self.input_size = max(self.stage_sizes)
        # Unregistered: its parameters are the stages' own (shared), kept only to save the weights once.
        object.__setattr__(self, "base", base)
        self.info = dict(info or {})
        self.stage_gmacs = [float(g) for g in stage_gmacs] if stage_gmacs is not None else [
            count_macs(stage).gmacs for stage in stages]
        self.eval()

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        thresholds = [float(t) for t in thresholds]
        if len(thresholds) != len(self.stages) - 1:
            raise VitpruneError(f"{len(self.stages)} stages take {len(self.stages) - 1} thresholds, got {len(thresholds)}")
        if any(math.isnan(t) for t in thresholds):
            raise VitpruneError("a threshold is NaN")
        self.thresholds = thresholds

    @property
    def plans(self) -> list[Plan]:
        from vitprune.patch import plan_of

        return [plan_of(stage) or Plan(img_size=size) for stage, size in zip(self.stages, self.stage_sizes)]

    def forward(self, images: Tensor) -> Tensor:
        return self.run(images).logits

    def run(self, images: Tensor, *, count_macs: bool = False) -> "CascadeRun":
        """Logits, the stage each image exited at and (with `count_macs`) the GMACs each image cost."""
        if images.ndim != 4:
            raise VitpruneError(f"images must be a (B, C, H, W) batch, got shape {list(images.shape)}")
        batch = images.shape[0]
        device = images.device
        exit_stage = torch.full((batch,), len(self.stages) - 1, dtype=torch.long, device=device)
        gmacs = torch.zeros(batch, dtype=torch.float64)
        remaining = torch.arange(batch, device=device)
        logits_out: Tensor | None = None
        pending = images
        for index, stage in enumerate(self.stages):
            inputs = resize_to(pending, self.stage_sizes[index])
            logits = stage(inputs)
            if logits_out is None:
                logits_out = logits.new_empty((batch, logits.shape[-1]))
            if count_macs:
                gmacs[remaining.cpu()] += self._stage_gmacs_per_image(index, inputs)
            if index == len(self.stages) - 1:
                leaving = torch.ones(len(remaining), dtype=torch.bool, device=device)
            else:
                leaving = confidence(logits, self.criterion) >= self.thresholds[index]
            logits_out[remaining[leaving]] = logits[leaving]
            exit_stage[remaining[leaving]] = index
            staying = ~leaving
            remaining, pending = remaining[staying], pending[staying]
            if remaining.numel() == 0:
                break
        return CascadeRun(logits=logits_out, exit_stage=exit_stage, gmacs_per_image=gmacs if count_macs else None)

    def _stage_gmacs_per_image(self, index: int, inputs: Tensor) -> Tensor:
        from vitprune.flops import count_macs

        if uses_ats(self.plans[index]):  # the token count depends on the image
            return count_macs(self.stages[index], inputs).gmacs_per_image
        return torch.full((inputs.shape[0],), self.stage_gmacs[index], dtype=torch.float64)

    def transform(self):
        """timm's eval preprocessing for this cascade's input size."""
        from vitprune.data import transform_for

        widest = self.stages[self.stage_sizes.index(self.input_size)]
        return transform_for(widest, self.input_size)

    def describe(self) -> str:
        return " -> ".join(describe_stage(plan) for plan in self.plans)


@dataclass
class CascadeRun:
    logits: Tensor
    exit_stage: Tensor  # (B,) index of the stage each image answered at
    gmacs_per_image: Tensor | None = None  # (B,) GMACs of the stages each image ran


def uses_ats(plan: Plan) -> bool:
    return any(red.method == "ats" for red in plan.reductions)


def build_stages(base: nn.Module, plans: Sequence[Plan]) -> list[nn.Module]:
    """One model per plan, sharing the base's parameter tensors (deepcopy with the parameters
    pre-seeded in the memo); a stage at another input size gets its own resampled position
    embedding (timm's set_input_size replaces that one parameter on the copy only)."""
    from vitprune.patch import apply_plan, plan_of

    if plan_of(base) is not None and plan_of(base).reductions:
        raise VitpruneError("the cascade's base model must be unreduced; give the plain model")
    shared = {id(param): param for param in base.parameters()}
    stages = []
    for plan in plans:
        stage = copy.deepcopy(base, memo=dict(shared))
        stages.append(apply_plan(stage, plan).eval())
    return stages


def build_cascade(base: nn.Module, plans: Sequence[Plan], thresholds: Sequence[float] | None = None, *,
                  criterion: str = "maxprob", info: dict | None = None,
                  stage_gmacs: Sequence[float] | None = None) -> CascadeModel:
    """A CascadeModel over `base`'s weights; thresholds default to +inf (every image runs every
    stage up to the last; calibrate them with `calibrate_thresholds`)."""
    thresholds = [math.inf] * (len(plans) - 1) if thresholds is None else thresholds
    return CascadeModel(build_stages(base, plans), thresholds, criterion=criterion, base=base, info=info,
                        stage_gmacs=stage_gmacs)


# ----------------------------------------------------------------------------------------------
# Calibration on cached stage outputs
# ----------------------------------------------------------------------------------------------

@dataclass
class StageTable:
    """Every stage's answer for every image, computed once; a threshold set is then pure tensor ops."""

    confidence: Tensor  # (S, N) float
    prediction: Tensor  # (S, N) long
    gmacs: Tensor  # (S, N) float64, GMACs of running stage s on image n

    def subset(self, index: Tensor) -> "StageTable":
        return StageTable(self.confidence[:, index], self.prediction[:, index], self.gmacs[:, index])

    @property
    def num_stages(self) -> int:
        return self.confidence.shape[0]


@torch.inference_mode()
def stage_table(cascade: CascadeModel, images: Tensor, *, batch_size: int = 64, progress: bool = True) -> StageTable:
    """Run every stage on every image (resized from `images` as the cascade does)."""
    from vitprune.data import predict
    from vitprune.flops import count_macs

    confidences, predictions, costs = [], [], []
    for index, (stage, size, plan) in enumerate(zip(cascade.stages, cascade.stage_sizes, cascade.plans)):
        resized = _Resized(stage, size)
        logits = predict(resized, images, batch_size=batch_size, progress=progress,
                         description=f"Stage {index + 1} ({describe_stage(plan)})")
        confidences.append(confidence(logits, cascade.criterion))
        predictions.append(logits.argmax(dim=-1))
        if uses_ats(plan):
            device = next(stage.parameters()).device
            costs.append(torch.cat([count_macs(stage, resize_to(images[i:i + batch_size].to(device), size)).gmacs_per_image
                                    for i in range(0, len(images), batch_size)]))
        else:
            costs.append(torch.full((len(images),), cascade.stage_gmacs[index], dtype=torch.float64))
    return StageTable(torch.stack(confidences), torch.stack(predictions), torch.stack(costs))


class _Resized(nn.Module):
    """A stage fed with the full-size batch, resized as inside the cascade (for `predict`)."""

    def __init__(self, stage: nn.Module, size: int) -> None:
        super().__init__()
        self.stage, self.size = stage, size

    def forward(self, images: Tensor) -> Tensor:
        return self.stage(resize_to(images, self.size))


def simulate(table: StageTable, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Exit stage (K, N) and GMACs per image (K, N) for K threshold sets (K, S-1), without running a model."""
    num_stages, num_images = table.confidence.shape
    thresholds = thresholds.reshape(-1, num_stages - 1)
    count = thresholds.shape[0]
    exit_stage = torch.full((count, num_images), num_stages - 1, dtype=torch.long)
    undecided = torch.ones((count, num_images), dtype=torch.bool)
    for index in range(num_stages - 1):
        leaving = undecided & (table.confidence[index][None, :] >= thresholds[:, index:index + 1])
        exit_stage.masked_fill_(leaving, index)
        undecided &= ~leaving
    spent = table.gmacs.cumsum(dim=0)  # an image exiting at stage s ran stages 0..s
    return exit_stage, spent.gather(0, exit_stage)


@dataclass
class Calibration:
    thresholds: list[float]
    budget_gmacs: float
    mean_gmacs: float  # on the calibration images
    accuracy: float  # percent of the calibration images answered right (labels or base agreement)
    exit_fraction: list[float]
    searched: int  # threshold sets evaluated

    def to_dict(self) -> dict:
        return {"thresholds": [_json_threshold(t) for t in self.thresholds], "budget_gmacs": round(self.budget_gmacs, 4),
                "mean_gmacs": round(self.mean_gmacs, 4), "accuracy": round(self.accuracy, 2),
                "exit_fraction": [round(f, 4) for f in self.exit_fraction], "searched": self.searched}


MAX_GRID = 40_000  # threshold sets in the first, full grid
CHUNK = 2_048


def calibrate_thresholds(table: StageTable, correct_targets: Tensor, budget_gmacs: float) -> Calibration:
    """Thresholds with the most right answers among those whose mean GMACs <= `budget_gmacs`.

    The paper's procedure: choose how many images leave at each stage, then read the thresholds off
    the sorted confidences. Candidates for stage s are its sorted confidences on the calibration
    images (a threshold equal to the k-th largest lets k images leave), plus +inf (none leave).
    A grid over all free thresholds (as fine as MAX_GRID allows: every candidate for 2 stages,
    200 per stage for 3) is followed by coordinate ascent over every candidate of one stage at a time.
    `correct_targets`: (N,) the labels, or the base model's predictions (agreement).
    """
    num_stages, num_images = table.confidence.shape
    right = table.prediction == correct_targets[None, :]  # (S, N)
    floor_gmacs = float(table.gmacs[0].mean())
    if budget_gmacs < floor_gmacs - 1e-9:
        raise VitpruneError(f"budget {budget_gmacs:.3f} GMACs is below the first stage's own cost "
                            f"({floor_gmacs:.3f} GMACs, every image runs it); raise the budget or use a cheaper first stage")
    candidates = [torch.cat([table.confidence[s].unique(), torch.tensor([math.inf])]) for s in range(num_stages - 1)]
    per_stage = max(2, int(MAX_GRID ** (1 / (num_stages - 1))))
    grids = [_spread(c, per_stage) for c in candidates]
    best = _search(table, right, budget_gmacs, torch.cartesian_prod(*grids).reshape(-1, num_stages - 1), None)
    searched = math.prod(len(g) for g in grids)
    for _ in range(4):  # coordinate ascent: one stage at a time over all its candidates
        improved = False
        for s in range(num_stages - 1):
            trial = best[0].repeat(len(candidates[s]), 1)
            trial[:, s] = candidates[s]
            searched += len(trial)
            found = _search(table, right, budget_gmacs, trial, best)
            if found is not best:
                best, improved = found, True
        if not improved:
            break
    thresholds, correct, cost = best
    exit_stage, spent = simulate(table, thresholds)
    counts = torch.bincount(exit_stage[0], minlength=num_stages).double() / num_images
    return Calibration(thresholds=[float(t) for t in thresholds], budget_gmacs=budget_gmacs,
                       mean_gmacs=float(spent[0].mean()), accuracy=100.0 * correct / num_images,
                       exit_fraction=counts.tolist(), searched=searched)


def _spread(values: Tensor, count: int) -> Tensor:
    """At most `count` of the sorted `values`, evenly spaced by rank, always keeping both ends."""
    if len(values) <= count:
        return values
    picks = torch.linspace(0, len(values) - 1, count).round().long().unique()
    return values[picks]


def _search(table: StageTable, right: Tensor, budget: float, trials: Tensor, best):
    """The best (thresholds, right answers, mean GMACs) among `trials` and `best`: feasible first,
    then most right answers, then fewest GMACs."""
    for start in range(0, len(trials), CHUNK):
        chunk = trials[start:start + CHUNK]
        exit_stage, spent = simulate(table, chunk)
        correct = right.gather(0, exit_stage).sum(dim=1)
        cost = spent.mean(dim=1)
        feasible = cost <= budget + 1e-9
        if not feasible.any():
            continue
        score = torch.where(feasible, correct.double(), -1.0)
        top = score.max()
        tied = (score == top).nonzero().squeeze(1)
        pick = int(tied[cost[tied].argmin()])
        candidate = (chunk[pick].clone(), int(correct[pick]), float(cost[pick]))
        if best is None or (candidate[1], -candidate[2]) > (best[1], -best[2]):
            best = candidate
    if best is None:
        raise VitpruneError(f"no thresholds meet the budget of {budget:.3f} GMACs")
    return best


def evaluate(table: StageTable, thresholds: Sequence[float], labels: Tensor | None, reference: Tensor) -> dict:
    """Figures of one threshold set on cached stage outputs: mean GMACs, top-1/agreement, exits."""
    exit_stage, spent = simulate(table, torch.tensor([thresholds], dtype=torch.float32))
    exit_stage, spent = exit_stage[0], spent[0]
    prediction = table.prediction.gather(0, exit_stage[None, :])[0]
    out = {"n_images": int(len(prediction)), "gmacs": round(float(spent.mean()), 4),
           "agreement": round(100.0 * float((prediction == reference).double().mean()), 2)}
    if labels is not None:
        out["top1"] = round(100.0 * float((prediction == labels).double().mean()), 2)
    out["exits"] = exit_histogram(exit_stage, table.num_stages)
    return out


def exit_histogram(exit_stage: Tensor, num_stages: int) -> list[dict]:
    counts = torch.bincount(exit_stage.cpu(), minlength=num_stages)
    total = max(int(counts.sum()), 1)
    return [{"stage": s + 1, "images": int(counts[s]), "percent": round(100.0 * int(counts[s]) / total, 2)}
            for s in range(num_stages)]


# ----------------------------------------------------------------------------------------------
# Artifact
# ----------------------------------------------------------------------------------------------

def cascade_metadata(cascade: CascadeModel, info: dict) -> dict:
    from vitprune.artifact import model_identity, versions

    if cascade.base is None:
        raise VitpruneError("this cascade has no base model to save (build it with build_cascade)")
    return {
        "format": CASCADE_FORMAT,
        "kind": "cascade",
        "model": model_identity(cascade.base, info),
        "criterion": cascade.criterion,
        "input_size": cascade.input_size,
        "resize": RESIZE,
        "stages": [
            {"img_size": size, "plan": plan.to_dict(), "describe": describe_stage(plan),
             "threshold": _json_threshold(threshold),
             "exit_always": threshold is not None and threshold == -math.inf,
             "gmacs": round(gmacs, 6)}
            for size, plan, threshold, gmacs in zip(cascade.stage_sizes, cascade.plans, [*cascade.thresholds, None],
                                                   cascade.stage_gmacs)
        ],
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_cascade(out_dir: str | Path, cascade: CascadeModel, info: dict, *, report: dict | None = None,
                 report_md: str | None = None, extra_files: dict[str, bytes] | None = None, force: bool = False,
                 onnx: bool = False) -> Path:
    """The cascade folder, atomically: cascade.json, the base weights once, the report and extras;
    with `onnx`, also onnx/ (one graph per stage + cascade_onnx.json, see `OnnxCascade`)."""
    from vitprune.artifact import save_weights, write_report_files
    from vitprune.io import atomic_output_dir

    metadata = cascade_metadata(cascade, info)
    with atomic_output_dir(out_dir, force=force) as tmp:
        save_weights(cascade.base, tmp / WEIGHTS_FILE, metadata, metadata_key=METADATA_KEY)
        (tmp / CASCADE_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        write_report_files(tmp, report, report_md, extra_files)
        if onnx:
            _write_onnx(cascade, tmp / "onnx", opset=17, fp16=False)
    return Path(out_dir)


def read_cascade_metadata(path: str | Path) -> dict:
    path = Path(path)
    file = path / CASCADE_FILE
    if not file.is_file():
        raise VitpruneError(f"{path} is not a vitprune cascade: no {CASCADE_FILE}")
    try:
        metadata = json.loads(file.read_text())
        if not isinstance(metadata, dict) or not metadata.get("stages") or "model" not in metadata:
            raise ValueError("no stages or model")
    except (OSError, ValueError) as exc:
        raise VitpruneError(f"cannot read {file}: {exc}") from None
    if metadata.get("format") != CASCADE_FORMAT:
        raise VitpruneError(f"{file} has format {metadata.get('format')}; this vitprune reads format {CASCADE_FORMAT}")
    return metadata


def load_cascade(path: str | Path, *, device: str | torch.device = "cpu") -> CascadeModel:
    """The CascadeModel saved at `path` (a folder written by `save_cascade`), in eval mode."""
    import safetensors.torch

    from vitprune.artifact import identity_info
    from vitprune.models import create_model, load_state_dict_into

    path = Path(path)
    metadata = read_cascade_metadata(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise VitpruneError(f"{path} is missing {WEIGHTS_FILE}")
    identity = metadata["model"]
    name = identity["name"] + (f".{identity['tag']}" if identity.get("tag") else "")
    base, _ = create_model(name, pretrained=False, img_size=identity["img_size"], num_classes=identity["num_classes"])
    try:
        state_dict = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises several error types for a corrupt file
        raise VitpruneError(f"cannot read {weights}: {str(exc).splitlines()[0]}") from None
    load_state_dict_into(base, state_dict, source=str(weights))
    stages = metadata["stages"]
    plans = [Plan.from_dict(stage["plan"]) for stage in stages]
    thresholds = [(-math.inf if stage.get("exit_always") else stage["threshold"] if stage["threshold"] is not None
                   else math.inf) for stage in stages[:-1]]
    cascade = build_cascade(base, plans, thresholds, criterion=metadata.get("criterion", "maxprob"),
                            info=identity_info(metadata), stage_gmacs=[stage["gmacs"] for stage in stages])
    return cascade.to(device).eval()


# ----------------------------------------------------------------------------------------------
# ONNX: one graph per stage, the thresholds in a manifest, a runner on ONNX Runtime
# ----------------------------------------------------------------------------------------------

ONNX_MANIFEST = "cascade_onnx.json"


def _write_onnx(cascade: CascadeModel, folder: Path, *, opset: int, fp16: bool) -> None:
    from vitprune.export import export_onnx

    folder.mkdir(parents=True, exist_ok=True)
    stages = []
    for index, (stage, size, plan) in enumerate(zip(cascade.stages, cascade.stage_sizes, cascade.plans)):
        name = f"stage{index + 1}.onnx"
        export_onnx(stage.cpu(), folder / name, batch="dynamic", opset=opset, fp16=fp16)
        threshold = cascade.thresholds[index] if index < len(cascade.stages) - 1 else None
        stages.append({"file": name, "img_size": size, "describe": describe_stage(plan),
                       "threshold": _json_threshold(threshold), "exit_always": threshold == -math.inf,
                       "gmacs": round(cascade.stage_gmacs[index], 6)})
    manifest = {"format": CASCADE_FORMAT, "criterion": cascade.criterion, "input_size": cascade.input_size,
                "resize": RESIZE, "opset": opset, "fp16": fp16, "stages": stages}
    (folder / ONNX_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _json_threshold(threshold: float | None) -> float | None:
    """+inf (nobody leaves) and the last stage's missing threshold are stored as null."""
    return threshold if threshold is not None and math.isfinite(threshold) else None


def export_cascade_onnx(cascade: CascadeModel, out_dir: str | Path, *, opset: int = 17, fp16: bool = False,
                        force: bool = False) -> Path:
    """A folder with stage1.onnx.. (dynamic batch, each at its own input size) and cascade_onnx.json
    (thresholds, criterion, sizes); run it with `OnnxCascade`. Written atomically."""
    from vitprune.io import atomic_output_dir

    with atomic_output_dir(out_dir, force=force) as tmp:
        _write_onnx(cascade, tmp, opset=opset, fp16=fp16)
    return Path(out_dir)


class OnnxCascade:
    """Runs an exported cascade on ONNX Runtime with the same gather/scatter as `CascadeModel`.

    Input: a float32 (B, 3, H, W) batch preprocessed at the manifest's `input_size`; smaller stages
    get it resized with torch's bicubic antialiased interpolation (the one op not in the graphs,
    so every stage sees exactly what it sees in PyTorch). Gathering and scattering are numpy.
    """

    def __init__(self, folder: str | Path, *, provider: str = "auto", threads: int | None = None) -> None:
        from vitprune.export import onnx_session

        folder = Path(folder)
        manifest_file = folder / ONNX_MANIFEST
        try:
            self.manifest = json.loads(manifest_file.read_text())
            entries = self.manifest["stages"]
        except FileNotFoundError:
            raise VitpruneError(f"{folder} is not an exported cascade: no {ONNX_MANIFEST}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VitpruneError(f"cannot read {manifest_file}: {exc}") from None
        self.criterion = self.manifest.get("criterion", "maxprob")
        self.input_size = int(self.manifest["input_size"])
        self.stage_sizes = [int(entry["img_size"]) for entry in entries]
        self.stage_gmacs = [float(entry["gmacs"]) for entry in entries]
        self.thresholds = [(-math.inf if entry.get("exit_always") else math.inf if entry["threshold"] is None
                            else float(entry["threshold"])) for entry in entries[:-1]]
        self.sessions = [onnx_session(folder / entry["file"], provider=provider, threads=threads) for entry in entries]

    def __call__(self, images):
        return self.run(images)[0]

    def run(self, images):
        """(logits (B, C), exit stage (B,)) as numpy arrays."""
        import numpy as np

        images = np.ascontiguousarray(images.numpy() if isinstance(images, Tensor) else images, dtype=np.float32)
        if images.ndim != 4:
            raise VitpruneError(f"images must be a (B, C, H, W) batch, got shape {list(images.shape)}")
        batch = images.shape[0]
        exit_stage = np.full(batch, len(self.sessions) - 1, dtype=np.int64)
        remaining = np.arange(batch)
        pending = images
        logits_out = None
        for index, session in enumerate(self.sessions):
            feed = _resize_numpy(pending, self.stage_sizes[index])
            logits = session.run(None, {session.get_inputs()[0].name: feed})[0]
            if logits_out is None:
                logits_out = np.empty((batch, logits.shape[-1]), dtype=logits.dtype)
            if index == len(self.sessions) - 1:
                leaving = np.ones(len(remaining), dtype=bool)
            else:
                leaving = _confidence_numpy(logits, self.criterion) >= self.thresholds[index]
            logits_out[remaining[leaving]] = logits[leaving]
            exit_stage[remaining[leaving]] = index
            remaining, pending = remaining[~leaving], pending[~leaving]
            if len(remaining) == 0:
                break
        return logits_out, exit_stage


def _resize_numpy(images, size: int):
    if images.shape[-2:] == (size, size):
        return images
    return resize_to(torch.from_numpy(images), size).numpy()


def _confidence_numpy(logits, criterion: str):
    import numpy as np

    shifted = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=-1, keepdims=True)
    if criterion == "maxprob":
        return (1.0 / total)[:, 0]  # the largest probability: exp(0) / sum
    probs = exp / total
    return (probs * (shifted - np.log(total))).sum(axis=-1)


# ----------------------------------------------------------------------------------------------
# The `vitprune cascade` pipeline: calibrate, measure held-out, compare with single models
# ----------------------------------------------------------------------------------------------

FRONTIER_EVIT_KEEPS = (0.5, 0.6, 0.7, 0.8)
FRONTIER_TOME_RS = tuple(range(4, 17))
CURVE_STEP = 0.05


@dataclass
class CascadeRequest:
    """Everything `vitprune cascade` takes; the same fields as its options."""

    model: str
    stages: str
    data: Path
    target_gmacs: float | None = None
    target_ratio: float | None = None
    criterion: str = "maxprob"
    checkpoint: Path | None = None
    no_pretrained: bool = False
    holdout: float = 0.5
    seed: int = 0
    limit: int | None = None
    batch_size: int = 64
    workers: int = 2
    frontier: bool = True
    onnx: bool = False
    device: str = "cpu"
    output: Path | None = None
    force: bool = False
    progress: bool = True


@dataclass
class CascadeResult:
    cascade: CascadeModel
    report: dict
    curve_png: bytes | None = None
    extra: dict = field(default_factory=dict)


def budget_from(base_gmacs: float, target_gmacs: float | None, target_ratio: float | None) -> float:
    if (target_gmacs is None) == (target_ratio is None):
        raise VitpruneError("give the budget as --target-gmacs G or --target-ratio R (one of them)")
    if target_gmacs is not None:
        if not (math.isfinite(target_gmacs) and target_gmacs > 0):
            raise VitpruneError(f"--target-gmacs must be a positive number, got {target_gmacs}")
        return float(target_gmacs)
    if not (math.isfinite(target_ratio) and 0 < target_ratio <= 1):
        raise VitpruneError(f"--target-ratio must be in (0, 1] of the base model's GMACs, got {target_ratio}")
    return float(target_ratio) * base_gmacs


def _check_request(request: CascadeRequest) -> None:
    from vitprune.io import check_output_dir

    if request.criterion not in CRITERIA:
        raise VitpruneError(f"unknown --criterion '{request.criterion}'; choose {' or '.join(CRITERIA)}")
    if not 0 < request.holdout < 1:
        raise VitpruneError(f"--holdout must be a fraction between 0 and 1, got {request.holdout}")
    if request.batch_size < 1:
        raise VitpruneError(f"--batch-size must be at least 1, got {request.batch_size}")
    budget_from(1.0, request.target_gmacs, request.target_ratio)  # the option form, before the long work
    if request.output is not None:
        check_output_dir(request.output, request.force)


def _indices(image_set, part) -> Tensor:
    position = {file: index for index, file in enumerate(image_set.files)}
    return torch.tensor([position[file] for file in part.files], dtype=torch.long)


def run_cascade(request: CascadeRequest) -> CascadeResult:
    """Build the cascade, calibrate its thresholds to the budget, report held-out figures, the
    accuracy-vs-budget curve next to single fixed plans, and write the artifact if asked."""
    from vitprune.artifact import versions
    from vitprune.data import split
    from vitprune.flops import count_macs
    from vitprune.patch import model_img_size
    from vitprune.pipeline import load_base, load_images_for

    _check_request(request)
    if request.onnx and request.output is None:
        raise VitpruneError("--onnx writes into the output folder: give -o/--output too")
    base = load_base(request.model, request.checkpoint, request.no_pretrained, None)
    model = base.model.to(request.device).eval()
    base_size = model_img_size(model)
    patch = model.patch_embed.patch_size
    plans = parse_stages(request.stages, depth=len(model.blocks), base_size=base_size,
                         patch_size=int(patch[0] if isinstance(patch, (tuple, list)) else patch))
    cascade = build_cascade(model, plans, criterion=request.criterion, info=base.info)
    base_gmacs = count_macs(model).gmacs
    budget = budget_from(base_gmacs, request.target_gmacs, request.target_ratio)
    if not uses_ats(plans[0]) and budget < cascade.stage_gmacs[0]:  # fail before the long work
        raise VitpruneError(f"budget {budget:.3f} GMACs is below the first stage's own cost "
                            f"({cascade.stage_gmacs[0]:.3f} GMACs, every image runs it); raise the budget or use a "
                            "cheaper first stage")

    images, labels, image_set = load_images_for(model, request.data, limit=request.limit, workers=request.workers,
                                                img_size=cascade.input_size, batch_size=request.batch_size,
                                                progress=request.progress)
    calibration_set, holdout_set = split(image_set, request.holdout, request.seed)
    calib_idx, hold_idx = _indices(image_set, calibration_set), _indices(image_set, holdout_set)

    images = images.to(request.device)
    table = stage_table(cascade, images, batch_size=request.batch_size, progress=request.progress)
    reference = _base_predictions(cascade, model, images, table, request)
    targets = labels if labels is not None else reference
    calib_table, hold_table = table.subset(calib_idx), table.subset(hold_idx)

    calibration = calibrate_thresholds(calib_table, targets[calib_idx], budget)
    cascade.set_thresholds(calibration.thresholds)
    hold_labels = labels[hold_idx] if labels is not None else None
    measured = _measure(cascade, images[hold_idx.to(images.device)], hold_labels, reference[hold_idx], request)

    curve = _curve(table, calib_idx, hold_idx, targets, labels, reference, base_gmacs, budget)
    frontier = _single_models(cascade, model, images, hold_idx, hold_labels, reference, hold_table, base_gmacs, request)
    report = {
        "kind": "cascade",
        "model": base.info["model"], "tag": base.info.get("tag"), "checkpoint": base.info.get("checkpoint"),
        "img_size": base_size, "input_size": cascade.input_size, "criterion": request.criterion,
        "cascade": cascade.describe(),
        "stages": [{"stage": s + 1, "describe": describe_stage(plan), "img_size": plan.img_size,
                    "plan": plan.describe(), "gmacs": round(cascade.stage_gmacs[s], 4),
                    "threshold": _json_threshold(cascade.thresholds[s]) if s < len(plans) - 1 else None}
                   for s, plan in enumerate(plans)],
        "gmacs_base": round(base_gmacs, 4),
        "budget": {"gmacs": round(budget, 4), "ratio": round(budget / base_gmacs, 4),
                   "given": ("--target-gmacs" if request.target_gmacs is not None else "--target-ratio")},
        "data": {"path": str(request.data), "n_images": len(image_set), "n_calibration": len(calib_idx),
                 "n_holdout": len(hold_idx), "labelled": labels is not None, "holdout_fraction": request.holdout,
                 "seed": request.seed,
                 "metric": "top-1 against the labels" if labels is not None else "agreement with the base model"},
        "calibration": {**calibration.to_dict(), **evaluate(calib_table, calibration.thresholds,
                                                            labels[calib_idx] if labels is not None else None,
                                                            reference[calib_idx])},
        "holdout": measured,
        "holdout_base": _base_figures(hold_labels, reference[hold_idx]),
        "curve": curve,
        "frontier": frontier,
        "comparison": _compare(measured, frontier, labels is not None),
        "versions": versions(),
    }
    png = plot_curve(report)
    if request.output is not None:
        save_cascade(request.output, cascade.cpu(), base.info, report=report,
                     report_md=render_cascade_markdown(report), extra_files={"curve.png": png}, force=request.force,
                     onnx=request.onnx)
    return CascadeResult(cascade=cascade, report=report, curve_png=png)


def _base_predictions(cascade: CascadeModel, model: nn.Module, images: Tensor, table: StageTable,
                      request: CascadeRequest) -> Tensor:
    """Predictions of the unreduced model at its own size (the agreement reference)."""
    from vitprune.data import predict
    from vitprune.patch import model_img_size

    size = model_img_size(model)
    for s, plan in enumerate(cascade.plans):
        if not plan.reductions and plan.img_size == size:
            return table.prediction[s]
    with torch.inference_mode():
        return predict(_Resized(model, size), images, batch_size=request.batch_size, progress=request.progress,
                       description="Base model").argmax(dim=-1)


def _base_figures(labels: Tensor | None, reference: Tensor) -> dict:
    out = {"agreement": 100.0}
    if labels is not None:
        out["top1"] = round(100.0 * float((reference == labels).double().mean()), 2)
    return out


def _measure(cascade: CascadeModel, images: Tensor, labels: Tensor | None, reference: Tensor,
             request: CascadeRequest) -> dict:
    """Held-out figures from really running the CascadeModel (batched, gather/scatter)."""
    from vitprune.data import _progress_bar

    predictions, exits, gmacs = [], [], []
    with torch.inference_mode(), _progress_bar(request.progress) as bar:
        task = bar.add_task("Cascade on held-out images", total=len(images))
        for start in range(0, len(images), request.batch_size):
            run = cascade.run(images[start:start + request.batch_size], count_macs=True)
            predictions.append(run.logits.argmax(dim=-1).cpu())
            exits.append(run.exit_stage.cpu())
            gmacs.append(run.gmacs_per_image)
            bar.advance(task, len(run.exit_stage))
    prediction, exit_stage, spent = torch.cat(predictions), torch.cat(exits), torch.cat(gmacs)
    out = {"n_images": int(len(prediction)), "gmacs": round(float(spent.mean()), 4),
           "agreement": round(100.0 * float((prediction == reference.cpu()).double().mean()), 2)}
    if labels is not None:
        out["top1"] = round(100.0 * float((prediction == labels).double().mean()), 2)
    out["exits"] = exit_histogram(exit_stage, len(cascade.stages))
    return out


def _curve(table: StageTable, calib_idx: Tensor, hold_idx: Tensor, targets: Tensor, labels: Tensor | None,
           reference: Tensor, base_gmacs: float, budget: float) -> list[dict]:
    """Accuracy vs budget: thresholds calibrated per budget, figures on the held-out images."""
    calib_table, hold_table = table.subset(calib_idx), table.subset(hold_idx)
    floor = float(calib_table.gmacs[0].mean()) / base_gmacs
    ceiling = float(calib_table.gmacs.sum(dim=0).mean()) / base_gmacs
    ratios = {round(CURVE_STEP * k, 4) for k in range(math.ceil(floor / CURVE_STEP - 1e-9),
                                                      int(min(ceiling, 1.0) / CURVE_STEP + 1e-9) + 1)}
    ratios = sorted(r for r in ratios | {round(floor, 4), round(budget / base_gmacs, 4)} if r >= floor - 1e-9)
    rows = []
    hold_labels = labels[hold_idx] if labels is not None else None
    for ratio in ratios:
        calibration = calibrate_thresholds(calib_table, targets[calib_idx], max(ratio * base_gmacs, float(calib_table.gmacs[0].mean())))
        held = evaluate(hold_table, calibration.thresholds, hold_labels, reference[hold_idx])
        rows.append({"budget_ratio": ratio, "budget_gmacs": round(ratio * base_gmacs, 4),
                     "thresholds": [_json_threshold(round(t, 5)) for t in calibration.thresholds],
                     "calibration_gmacs": round(calibration.mean_gmacs, 4),
                     "calibration_accuracy": round(calibration.accuracy, 2),
                     "holdout_gmacs": held["gmacs"], "holdout_top1": held.get("top1"),
                     "holdout_agreement": held["agreement"],
                     "holdout_exit_percent": [e["percent"] for e in held["exits"]]})
    return rows


def frontier_plans(depth: int) -> list[Plan]:
    """Fixed single-model schedules: EViT keep 0.5-0.8 at its default layers, ToMe r = 4..16."""
    return ([make_plan("evit", depth, keep=keep) for keep in FRONTIER_EVIT_KEEPS]
            + [make_plan("tome", depth, r=r) for r in FRONTIER_TOME_RS])


def _single_models(cascade: CascadeModel, model: nn.Module, images: Tensor, hold_idx: Tensor, labels: Tensor | None,
                   reference: Tensor, hold_table: StageTable, base_gmacs: float, request: CascadeRequest) -> list[dict]:
    """Held-out figures of single models: each stage alone (from the cached outputs) and, with
    `request.frontier`, the fixed EViT/ToMe schedules at the model's own size."""
    from vitprune.data import predict
    from vitprune.flops import count_macs
    from vitprune.patch import model_img_size

    rows = []
    hold_reference = reference[hold_idx]

    def row(family: str, name: str, gmacs: float, prediction: Tensor) -> dict:
        out = {"family": family, "name": name, "gmacs": round(gmacs, 4), "ratio": round(gmacs / base_gmacs, 4),
               "agreement": round(100.0 * float((prediction == hold_reference).double().mean()), 2)}
        if labels is not None:
            out["top1"] = round(100.0 * float((prediction == labels).double().mean()), 2)
        return out

    for s, plan in enumerate(cascade.plans):
        rows.append(row("stage", f"stage {s + 1}: {describe_stage(plan)}", float(hold_table.gmacs[s].mean()),
                        hold_table.prediction[s]))
    if not request.frontier:
        return rows
    size = model_img_size(model)
    held = images[hold_idx.to(images.device)]
    for plan in frontier_plans(len(model.blocks)):
        reduced = build_stages(model, [Plan(reductions=plan.reductions, img_size=size)])[0]
        with torch.inference_mode():
            logits = predict(_Resized(reduced, size), held, batch_size=request.batch_size, progress=request.progress,
                             description=f"Single model: {plan.describe()}")
        rows.append(row(plan.method, plan.describe(), count_macs(reduced).gmacs, logits.argmax(dim=-1)))
    return rows


def _compare(measured: dict, frontier: list[dict], labelled: bool) -> dict:
    """The cascade against the best single model that costs no more than it does (held-out)."""
    metric = "top1" if labelled else "agreement"
    affordable = [row for row in frontier if row["gmacs"] <= measured["gmacs"] + 1e-9]
    out = {"metric": metric, "cascade": measured[metric], "cascade_gmacs": measured["gmacs"]}
    if affordable:
        best = max(affordable, key=lambda row: (row[metric], -row["gmacs"]))
        out.update({"best_single": best["name"], "best_single_gmacs": best["gmacs"], "best_single_value": best[metric],
                    "margin": round(measured[metric] - best[metric], 2)})
    else:
        out["best_single"] = None
    return out


def plot_curve(report: dict) -> bytes:
    """Accuracy vs mean GMACs on the held-out images: the cascade's curve and the single models."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "top1" if report["data"]["labelled"] else "agreement"
    label = "held-out top-1 %" if metric == "top1" else "held-out agreement with base %"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curve = report["curve"]
    ax.plot([r["holdout_gmacs"] for r in curve], [r[f"holdout_{metric}"] for r in curve], "o-", color="C3",
            label="cascade (thresholds per budget)")
    markers = {"stage": ("s", "C0"), "evit": ("^", "C1"), "tome": ("v", "C2")}
    for family, (marker, color) in markers.items():
        rows = sorted((r for r in report["frontier"] if r["family"] == family), key=lambda r: r["gmacs"])
        if rows:
            ax.plot([r["gmacs"] for r in rows], [r[metric] for r in rows], marker=marker, color=color,
                    linestyle="--" if family != "stage" else "none",
                    label={"stage": "cascade stages alone", "evit": "EViT keep 0.5-0.8", "tome": "ToMe r=4..16"}[family])
    held = report["holdout"]
    ax.plot([held["gmacs"]], [held[metric]], "*", markersize=16, color="C3", markeredgecolor="k",
            label=f"cascade @ budget {report['budget']['gmacs']:.3f} GMACs")
    ax.axvline(report["budget"]["gmacs"], color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(report["gmacs_base"], color="k", linewidth=0.8, linestyle=":", label="base model GMACs")
    ax.set_xlabel("mean GMACs / image")
    ax.set_ylabel(label)
    ax.set_title(f"{report['model']}: {report['cascade']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render_cascade_markdown(report: dict) -> str:
    """report.md of a cascade."""
    labelled = report["data"]["labelled"]
    metric, metric_name = ("top1", "top-1 %") if labelled else ("agreement", "agreement with base %")
    data = report["data"]
    lines = ["# vitprune cascade report", "",
             f"- model: `{report['model']}`" + (f" (`{report['tag']}`)" if report.get("tag") else ""),
             f"- cascade: {report['cascade']}; confidence: {report['criterion']}; input {report['input_size']}px "
             "(smaller stages resize it: bicubic, antialiased)",
             f"- budget: {report['budget']['gmacs']:.3f} GMACs / image ({report['budget']['ratio']:.0%} of the base "
             f"{report['gmacs_base']:.3f})",
             f"- images: {data['n_images']} from `{data['path']}`: {data['n_calibration']} calibrate the thresholds, "
             f"{data['n_holdout']} held out (seed {data['seed']}); metric: {data['metric']}"]
    if report.get("checkpoint"):
        lines.append(f"- checkpoint: `{report['checkpoint']}`")
    lines += ["", "## Stages", "", "| stage | input / plan | GMACs | threshold | exits (calibration) | exits (held-out) |",
              "|---|---|---|---|---|---|"]
    for s, stage in enumerate(report["stages"]):
        last = s == len(report["stages"]) - 1
        threshold = ("always answers" if last else "nobody leaves") if stage["threshold"] is None else f"{stage['threshold']:.4f}"
        calib, held = report["calibration"]["exits"][s], report["holdout"]["exits"][s]
        lines.append(f"| {stage['stage']} | {stage['describe']} | {stage['gmacs']:.3f} | {threshold} | "
                     f"{calib['images']} ({calib['percent']:.1f}%) | {held['images']} ({held['percent']:.1f}%) |")
    held, calib = report["holdout"], report["calibration"]
    lines += ["", "## At the budget", "", "| | base | cascade (calibration) | cascade (held-out, measured) |",
              "|---|---|---|---|",
              f"| mean GMACs / image | {report['gmacs_base']:.3f} | {calib['gmacs']:.3f} | {held['gmacs']:.3f} |"]
    if labelled:
        lines.append(f"| top-1 % | {report['holdout_base']['top1']:.2f} (held-out) | {calib['top1']:.2f} | {held['top1']:.2f} |")
    lines.append(f"| agreement with base % | 100 | {calib['agreement']:.2f} | {held['agreement']:.2f} |")
    comparison = report["comparison"]
    if comparison.get("best_single"):
        lines += ["", f"Best single model at no more GMACs ({comparison['cascade_gmacs']:.3f}): "
                  f"{comparison['best_single']} at {comparison['best_single_gmacs']:.3f} GMACs, {metric_name} "
                  f"{comparison['best_single_value']:.2f}; the cascade: {comparison['cascade']:.2f} "
                  f"({comparison['margin']:+.2f})."]
    lines += ["", "## Accuracy vs budget (held-out)", "",
              f"| budget | calibration GMACs | held-out GMACs | held-out {metric_name} | exits % per stage |",
              "|---|---|---|---|---|"]
    for row in report["curve"]:
        lines.append(f"| {row['budget_gmacs']:.3f} ({row['budget_ratio']:.0%}) | {row['calibration_gmacs']:.3f} | "
                     f"{row['holdout_gmacs']:.3f} | {row[f'holdout_{metric}']:.2f} | "
                     f"{' / '.join(f'{p:.0f}' for p in row['holdout_exit_percent'])} |")
    lines += ["", "## Single models (held-out)", "", f"| model | GMACs | {metric_name} |", "|---|---|---|"]
    for row in sorted(report["frontier"], key=lambda r: r["gmacs"]):
        lines.append(f"| {row['name']} | {row['gmacs']:.3f} | {row[metric]:.2f} |")
    lines += ["", "![accuracy vs GMACs](curve.png)", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()), ""]
    return "\n".join(lines)


__all__ = [
    "CascadeModel", "CascadeRun", "Calibration", "StageTable", "parse_stages", "describe_stage", "build_stages",
    "build_cascade", "confidence", "resize_to", "stage_table", "simulate", "calibrate_thresholds", "evaluate",
    "exit_histogram", "save_cascade", "load_cascade", "read_cascade_metadata", "CASCADE_FILE", "CRITERIA",
    "STAGES_HELP", "CascadeRequest", "CascadeResult", "run_cascade", "frontier_plans", "plot_curve",
    "render_cascade_markdown", "export_cascade_onnx", "OnnxCascade", "ONNX_MANIFEST",
]
