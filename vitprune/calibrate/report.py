"""The calibration report: rows measured on the held-out images, report.json's calibration section,
report.md (the frontier as a ReportTable) and pareto.png (via vitprune.plots)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from vitprune.artifact import versions, write_artifact
from vitprune.calibrate.evaluate import OBJECTIVE_TEXT, Evaluator
from vitprune.calibrate.images import ImageSplit
from vitprune.calibrate.measure import HeldOut, sized
from vitprune.calibrate.search import GUARD_Z, Found, Search, pareto_mask
from vitprune.metrics import classification_metrics
from vitprune.plan import Plan
from vitprune.plots import new_figure, png_bytes
from vitprune.report import make_report, render_markdown
from vitprune.tables import ReportTable
from vitprune.teacher import reference_markdown


@dataclass
class RunInfo:
    """Where the images came from and how they were split: the provenance the report and the plan carry."""

    data: Path
    seed: int
    swap_split: bool
    holdout: float  # the fraction held out
    protect_given: bool


def written_plan(chosen: Plan, search: Search, images: ImageSplit, info: RunInfo) -> Plan:
    """The plan written: no input size named when it keeps the model's own, and how it was calibrated."""
    base_size = search.setup.base_size
    chosen = sized(chosen, base_size)
    notes = {"calibrated": {"objective": search.objective, "budget": search.budget.to_dict(),
                            "calibration_images": len(images.calibration_set),
                            "holdout_images": len(images.holdout_set),
                            "seed": info.seed, "swap_split": info.swap_split, "data": str(info.data)}}
    return replace(chosen, img_size=None if chosen.img_size == base_size else chosen.img_size, notes=notes)


class Rows:
    """Report rows of plans: held-out figures, latency, and the validation figures where scored."""

    def __init__(self, held: HeldOut, validation: Evaluator, base_gmacs: float) -> None:
        self.held, self.validation, self.base_gmacs = held, validation, base_gmacs
        holdout = held.evaluator
        self.base = classification_metrics(holdout.base_logits, holdout.labels, None)

    def row(self, plan: Plan) -> dict:
        sized = self.held.sized(plan)
        base_size = self.held.base_size
        public = replace(sized, img_size=None if sized.img_size == base_size else sized.img_size, notes={})
        score = self.held.score(sized)
        out = {"plan": public.describe(), "method": public.method, "params": public.params(),
               "gmacs": round(score.gmacs, 4), "gmacs_reduction": round(1 - score.gmacs / self.base_gmacs, 4),
               "ms_per_image": round(self.held.ms(plan), 3),
               "holdout": score.to_dict(), "reductions": sized.to_dict()["reductions"],
               "img_size": sized.img_size or base_size}
        validated = self.validation.known(sized)
        if validated is not None:
            out["validation"] = validated.to_dict()
        if self.held.evaluator.labels is not None:
            out["holdout"]["top1_drop"] = round(self.base["top1"] - score.top1, 2)
        return out

    def frontier(self, frontier: list[Plan], objective: str) -> list[dict]:
        """The frontier's rows, each flagged Pareto-optimal or not on the validation images."""
        losses = [(self.validation.score(plan).gmacs, self.validation.score(plan).loss(objective)) for plan in frontier]
        return [dict(self.row(plan), pareto=flag) for plan, flag in zip(frontier, pareto_mask(losses), strict=True)]


def calibration_report(identity: dict, written: Plan, search: Search, found: Found, held: HeldOut,
                       images: ImageSplit, info: RunInfo) -> dict:
    """report.json: the written plan's figures on the held-out images, and how it was calibrated."""
    rows = Rows(held, search.evals.validation, search.setup.base_gmacs)
    chosen = held.sized(written)
    report = make_report(identity, written, measured_figures(rows, chosen, images, info), versions())
    report["calibration"] = calibration_section(search, found, rows, chosen, images, info)
    return report


def measured_figures(rows: Rows, chosen: Plan, images: ImageSplit, info: RunInfo) -> dict:
    """report.json's figures of the chosen plan (its input size named), on the held-out images."""
    held, base_gmacs, base = rows.held, rows.base_gmacs, rows.base
    score = held.score(chosen)
    measured = {"gmacs_base": round(base_gmacs, 4), "gmacs": round(score.gmacs, 4),
                "gmacs_reduction": round(1 - score.gmacs / base_gmacs, 4),
                "data": {"path": f"{info.data} (held-out part)", "n_images": len(images.holdout_set),
                         "labelled": images.labelled}}
    if images.labelled:
        measured.update(top1_base=round(base["top1"], 2), top5_base=round(base["top5"], 2))
        metrics = classification_metrics(held.evaluator.logits(chosen), images.holdout_labels,
                                         images.base_holdout_logits)
        measured.update(top1=round(metrics["top1"], 2), top5=round(metrics["top5"], 2),
                        top1_drop=round(base["top1"] - metrics["top1"], 2))
    if score.kl is None:
        measured["output"] = f"embedding (dim {images.base_holdout_logits.shape[1]})"
    measured.update(score.figures())
    measured["latency_ms"] = {str(held.batch): {"base": round(held.base_ms, 3), "reduced": round(held.ms(chosen), 3),
                                                "speedup": round(held.base_ms / held.ms(chosen), 3)}}
    timing = held.timing
    measured["latency_setup"] = {"device": timing["device"], "threads": timing["threads"], "warmup": timing["warmup"],
                                 "repeats": timing["repeats"], "inputs": "real images", "runtime": "eager PyTorch",
                                 "machine": "this machine"}
    return measured


def calibration_section(search: Search, found: Found, rows: Rows, chosen: Plan, images: ImageSplit,
                        info: RunInfo) -> dict:
    """report.json's "calibration": how the plan was searched, the frontier and the references."""
    setup, evals, budget = search.setup, search.evals, search.budget
    held = rows.held
    return {
        "objective": search.objective,
        "objective_text": OBJECTIVE_TEXT[search.objective],
        "budget": budget.to_dict(),
        "target_gmacs": round(setup.target, 4) if budget.has_gmacs_target else None,
        "images": image_counts(search, images, info),
        "img_sizes": setup.sizes,
        "methods": list(setup.methods),
        "head_only": setup.geometry.head_only,
        "guard_z": GUARD_Z,
        "tome_protect": {"chosen": setup.geometry.protect, "given": info.protect_given, "tried": found.protect_trials},
        "search": found.search,
        "search_seconds": round(found.search_seconds, 1),
        "gradient_trace": found.gradient_trace,
        "evaluations": {"search_subset": evals.search.evaluations, "validation": evals.validation.evaluations,
                        "holdout": evals.holdout.evaluations},
        "sensitivity": [{"layer": row["layer"], **{m: {k: round(v, 5) for k, v in row[m].items()}
                                                   for m in setup.block_methods}} for row in found.sensitivity],
        "chosen": rows.row(chosen),
        "base": {"gmacs": round(setup.base_gmacs, 4), "ms_per_image": round(held.base_ms, 3),
                 "holdout": {k: round(v, 2) for k, v in rows.base.items() if k in ("top1", "top5")}},
        "frontier": rows.frontier(found.frontier, search.objective),
        "references": [dict(rows.row(plan), name=name) for name, plan in held.references.items()],
    }


def image_counts(search: Search, images: ImageSplit, info: RunInfo) -> dict:
    calibration, validation = len(images.calibration_set), len(search.evals.validation_index)
    return {"total": len(images.image_set), "calibration": calibration, "holdout": len(images.holdout_set),
            "search_subset": len(search.evals.search_index),
            "validation": validation, "validation_disjoint": validation < calibration,
            "labelled": images.labelled, "holdout_fraction": info.holdout,
            "seed": info.seed, "swap_split": info.swap_split,
            "points_per_holdout_image": round(100 / len(images.holdout_set), 3)}


def write_calibration(output: Path, reduced: nn.Module, info: dict, files: dict[str, bytes], report: dict,
                      force: bool) -> None:
    """The artifact, with report.json, report.md, pareto.png and `files` (a fine-tuned base's teacher)."""
    write_artifact(output, reduced, info, report=report, report_md=render_calibration_markdown(report), force=force,
                   extra_files={**files, "pareto.png": pareto_png(report)})


# -- report.md ------------------------------------------------------------------------------------

def render_calibration_markdown(report: dict) -> str:
    """report.md: the chosen plan (held-out figures), then the frontier and the published schedules."""
    cal = report["calibration"]
    lines = [render_markdown(report, title="vitprune calibrate") + reference_markdown(report.get("reference")),
             "## Calibration", "", *_settings_lines(cal),
             "", "## Frontier (held-out images)", "", frontier_table(cal).markdown(),
             "", "Rows in bold are the fixed published schedules, for reference. Latency: eager PyTorch, "
             f"median of {report['latency_setup']['repeats']} runs at batch {next(iter(report['latency_ms']))}, "
             "all models interleaved.", ""]
    return "\n".join(lines)


def _settings_lines(cal: dict) -> list[str]:
    images = cal["images"]
    return [
        f"- budget: {cal['budget']['text']}",
        f"- objective: {cal['objective_text']}, on {images['calibration']} calibration images "
        f"(search on a subset of {images['search_subset']}; its finalists are re-ranked on "
        + (f"the other {images['validation']}, the validation images)" if images.get("validation_disjoint")
           else "all of them, the validation images: too few to set some apart)"),
        f"- every figure below is measured on the {images['holdout']} held-out images the search never saw "
        f"(1 image = {images['points_per_holdout_image']:g} points)",
        f"- input sizes searched: {', '.join(map(str, cal['img_sizes']))}; methods: {', '.join(cal['methods'])}"
        + ("; every plan computes only the class token in the last block (exact with class-token pooling)"
           if cal.get("head_only") else ""),
        _protect_line(cal.get("tome_protect")),
        f"- a searched plan replaces ToMe's constant schedule at a budget only when it beats it by more than "
        f"{cal['guard_z']:g} standard errors (paired, per image) on the validation images",
        f"- search time: {cal['search_seconds']:.0f} s ({sum(cal['evaluations'].values())} plan evaluations)",
    ]


EMBEDDING_COLUMNS = {"cosine": ("cosine_mean", ".4f", "1"), "cos p5": ("cosine_p5", ".4f", "1"),
                     "NN agree %": ("retrieval_agreement", ".1f", "100"), "R@5 %": ("recall_at_5", ".1f", "100")}


def _fidelity_cells(hold: dict) -> list[str]:
    """A row's fidelity cells from its held-out figures: agreement and KL, or the embedding figures."""
    if "kl" in hold:
        return [f"{hold['agreement']:.1f}", f"{hold['kl']:.4f}"]
    return [format(hold[key], spec) if key in hold else "" for key, spec, _ in EMBEDDING_COLUMNS.values()]


def frontier_table(cal: dict) -> ReportTable:
    """The base, every frontier point and the published schedules (in bold), on the held-out images."""
    labelled = cal["images"]["labelled"]
    embedding = "kl" not in cal["chosen"]["holdout"]
    fidelity = list(EMBEDDING_COLUMNS) if embedding else ["agreement %", "KL"]
    table = ReportTable(["plan", "GMACs", "fewer", "ms/img", *(["top-1 %", "drop"] if labelled else []),
                         *fidelity, "Pareto"])
    base = cal["base"]
    base_fidelity = [base_value for _, _, base_value in EMBEDDING_COLUMNS.values()] if embedding else ["100", "0"]
    table.add("base", f"{base['gmacs']:.3f}", "0%", f"{base['ms_per_image']:.2f}",
              *([f"{base['holdout']['top1']:.1f}", "0"] if labelled else []), *base_fidelity, "")
    references = [dict(r, plan=f"**{r['name']}** ({r['plan']})", pareto=None) for r in cal["references"]]
    for row in cal["frontier"] + references:
        hold = row["holdout"]
        mark = "" if row.get("pareto") is None else ("yes" if row["pareto"] else "no")
        table.add(row["plan"], f"{row['gmacs']:.3f}", f"{row['gmacs_reduction']:.0%}", f"{row['ms_per_image']:.2f}",
                  *([f"{hold['top1']:.1f}", f"{hold['top1_drop']:.1f}"] if labelled else []),
                  *_fidelity_cells(hold), mark)
    return table


def _protect_line(protect: dict | None) -> str:
    if not protect:
        return "- ToMe blocks: plain ToMe"
    if protect["given"]:
        return f"- ToMe blocks: protect weight {protect['chosen']:g} (given)"
    tried = ", ".join(f"{entry['protect']:g}: " + (f"KL {entry['kl']:.4f}" if "kl" in entry
                                                     else f"cosine {entry['cosine_mean']:.4f}")
                      for entry in protect["tried"])
    return (f"- ToMe blocks: protect weight {protect['chosen']:g}, the best on the validation images of "
            f"ToMe's constant schedule at the budget ({tried})")


# -- pareto.png -----------------------------------------------------------------------------------

def _metric_name(report: dict) -> str:
    if "cosine_mean" in report:
        return "cosine_mean"
    return "top1" if report["calibration"]["images"]["labelled"] else "agreement"


def pareto_png(report: dict) -> bytes:
    """The frontier and the published schedules, held-out accuracy against GMACs."""
    cal = report["calibration"]
    metric = _metric_name(report)
    fig = new_figure(7, 4.5, 110)
    ax = fig.add_subplot()
    points = sorted((row["gmacs"], row["holdout"][metric]) for row in cal["frontier"] if row["pareto"])
    others = [(row["gmacs"], row["holdout"][metric]) for row in cal["frontier"] if not row["pareto"]]
    if points:
        ax.plot(*zip(*points, strict=True), "o-", color="tab:blue", label="calibrated frontier")
    if others:
        ax.plot(*zip(*others, strict=True), "o", color="tab:blue", alpha=0.35,
                label="calibrated (dominated on calibration)")
    chosen = cal["chosen"]
    ax.plot([chosen["gmacs"]], [chosen["holdout"][metric]], "*", color="tab:red", markersize=15, label="chosen plan")
    base_value = {"top1": cal["base"]["holdout"].get("top1"), "cosine_mean": 1.0}.get(metric, 100.0)
    ax.plot([cal["base"]["gmacs"]], [base_value], "s", color="black", label="base")
    for row in cal["references"]:
        marker = "^" if row["name"].startswith("EViT") else "v"
        ax.plot([row["gmacs"]], [row["holdout"][metric]], marker, color="tab:orange")
        ax.annotate(row["name"], (row["gmacs"], row["holdout"][metric]), textcoords="offset points", xytext=(5, -10),
                    fontsize=8)
    ax.set_xlabel("GMACs / image")
    ax.set_ylabel({"top1": "held-out top-1 %", "cosine_mean": "held-out mean cosine with the base"}.get(
        metric, "held-out agreement with the base %"))
    ax.set_title(f"{report['model']}: calibrated plans vs published schedules "
                 f"({cal['images']['holdout']} held-out images)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return png_bytes(fig)
