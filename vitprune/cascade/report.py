"""The cascade's report: report.json's dict, report.md and the accuracy-vs-budget plot (curve.png)."""
from __future__ import annotations

from rich.table import Table

from vitprune.cascade.evaluation import FRONTIER
from vitprune.cascade.grammar import describe_stage
from vitprune.cascade.model import CascadeModel
from vitprune.cascade.thresholds import json_threshold
from vitprune.plots import new_figure, png_bytes
from vitprune.tables import ReportTable


def cascade_report(cascade: CascadeModel, info: dict, *, img_size: int, base_gmacs: float, budget: dict, data: dict,
                   figures: dict, versions: dict) -> dict:
    """report.json: the cascade and its stages (with the calibrated thresholds), the budget
    (`budget`: gmacs and given), the images (`data`), `figures` (`evaluate_cascade`) and versions."""
    plans = cascade.plans
    last = len(plans) - 1
    return {
        "kind": "cascade",
        "model": info["model"], "tag": info.get("tag"), "checkpoint": info.get("checkpoint"),
        "img_size": img_size, "input_size": cascade.input_size, "criterion": cascade.criterion,
        "cascade": cascade.describe(),
        "stages": [{"stage": s + 1, "describe": describe_stage(plan), "img_size": plan.img_size,
                    "plan": plan.describe(), "gmacs": round(cascade.stage_gmacs[s], 4),
                    "threshold": json_threshold(cascade.thresholds[s]) if s < last else None}
                   for s, plan in enumerate(plans)],
        "gmacs_base": round(base_gmacs, 4),
        "budget": {"gmacs": round(budget["gmacs"], 4), "ratio": round(budget["gmacs"] / base_gmacs, 4),
                   "given": budget["given"]},
        "data": data,
        **figures,
        "versions": versions,
    }


def _metric(report: dict) -> tuple[str, str]:
    """The report's headline metric and its name in tables."""
    return ("top1", "top-1 %") if report["data"]["labelled"] else ("agreement", "agreement with base %")


def render_cascade_markdown(report: dict) -> str:
    """report.md of a cascade."""
    metric, metric_name = _metric(report)
    lines = _header(report)
    lines += ["", "## Stages", "", _stages_table(report).markdown()]
    lines += ["", "## At the budget", "", _budget_table(report).markdown()]
    comparison = report["comparison"]
    if comparison.get("best_single"):
        lines += ["", f"Best single model at no more GMACs ({comparison['cascade_gmacs']:.3f}): "
                  f"{comparison['best_single']} at {comparison['best_single_gmacs']:.3f} GMACs, {metric_name} "
                  f"{comparison['best_single_value']:.2f}; the cascade: {comparison['cascade']:.2f} "
                  f"({comparison['margin']:+.2f})."]
    curve = ReportTable(["budget", "calibration GMACs", "held-out GMACs", f"held-out {metric_name}",
                         "exits % per stage"])
    for row in report["curve"]:
        curve.add(f"{row['budget_gmacs']:.3f} ({row['budget_ratio']:.0%})", f"{row['calibration_gmacs']:.3f}",
                  f"{row['holdout_gmacs']:.3f}", f"{row[f'holdout_{metric}']:.2f}",
                  " / ".join(f"{p:.0f}" for p in row["holdout_exit_percent"]))
    singles = ReportTable(["model", "GMACs", metric_name])
    for row in sorted(report["frontier"], key=lambda r: r["gmacs"]):
        singles.add(row["name"], f"{row['gmacs']:.3f}", f"{row[metric]:.2f}")
    lines += ["", "## Accuracy vs budget (held-out)", "", curve.markdown(),
              "", "## Single models (held-out)", "", singles.markdown(),
              "", "![accuracy vs GMACs](curve.png)", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items()), ""]
    return "\n".join(lines)


def _header(report: dict) -> list[str]:
    data, budget = report["data"], report["budget"]
    lines = ["# vitprune cascade report", "",
             f"- model: `{report['model']}`" + (f" (`{report['tag']}`)" if report.get("tag") else ""),
             f"- cascade: {report['cascade']}; confidence: {report['criterion']}; input {report['input_size']}px "
             "(smaller stages resize it: bicubic, antialiased)",
             f"- budget: {budget['gmacs']:.3f} GMACs / image ({budget['ratio']:.0%} of the base "
             f"{report['gmacs_base']:.3f})",
             f"- images: {data['n_images']} from `{data['path']}`: {data['n_calibration']} calibrate the thresholds, "
             f"{data['n_holdout']} held out (seed {data['seed']}); metric: {data['metric']}"]
    if report.get("checkpoint"):
        lines.append(f"- checkpoint: `{report['checkpoint']}`")
    return lines


def _stages_table(report: dict) -> ReportTable:
    table = ReportTable(["stage", "input / plan", "GMACs", "threshold", "exits (calibration)", "exits (held-out)"])
    for s, stage in enumerate(report["stages"]):
        last = s == len(report["stages"]) - 1
        threshold = f"{stage['threshold']:.4f}" if stage["threshold"] is not None else (
            "always answers" if last else "nobody leaves")
        calib, held = report["calibration"]["exits"][s], report["holdout"]["exits"][s]
        table.add(stage["stage"], stage["describe"], f"{stage['gmacs']:.3f}", threshold,
                  f"{calib['images']} ({calib['percent']:.1f}%)", f"{held['images']} ({held['percent']:.1f}%)")
    return table


def _budget_table(report: dict) -> ReportTable:
    held, calib = report["holdout"], report["calibration"]
    table = ReportTable(["", "base", "cascade (calibration)", "cascade (held-out, measured)"])
    table.add("mean GMACs / image", f"{report['gmacs_base']:.3f}", f"{calib['gmacs']:.3f}", f"{held['gmacs']:.3f}")
    if report["data"]["labelled"]:
        table.add("top-1 %", f"{report['holdout_base']['top1']:.2f} (held-out)", f"{calib['top1']:.2f}",
                  f"{held['top1']:.2f}")
    table.add("agreement with base %", "100", f"{calib['agreement']:.2f}", f"{held['agreement']:.2f}")
    return table


def console_table(report: dict) -> Table:
    """The terminal summary: the stages with their thresholds and exits, then the held-out figures."""
    metric, _ = _metric(report)
    budget = report["budget"]
    stages = ReportTable(["stage", "GMACs", "threshold", "exits calib %", "exits held-out %"],
                         title=f"{report['model']}: {report['cascade']} @ {budget['gmacs']:.3f} GMACs "
                               f"({budget['ratio']:.0%} of base)")
    for s, stage in enumerate(report["stages"]):
        last = s == len(report["stages"]) - 1
        threshold = f"{stage['threshold']:.4f}" if stage["threshold"] is not None else ("-" if last else "never")
        stages.add(stage["describe"], f"{stage['gmacs']:.3f}", threshold,
                   f"{report['calibration']['exits'][s]['percent']:.1f}",
                   f"{report['holdout']['exits'][s]['percent']:.1f}")
    held = report["holdout"]
    table = stages.rich()
    table.add_section()
    table.add_row("held-out mean GMACs", f"{held['gmacs']:.3f}", "", "", f"base {report['gmacs_base']:.3f}")
    table.add_row(f"held-out {'top-1' if metric == 'top1' else 'agreement'} %", f"{held[metric]:.2f}", "", "",
                  f"base {report['holdout_base'][metric]:.2f}")
    return table


def plot_curve(report: dict) -> bytes:
    """Accuracy vs mean GMACs on the held-out images: the cascade's curve and the single models."""
    metric, _ = _metric(report)
    fig = new_figure(7, 4.5, 120)
    ax = fig.add_subplot()
    curve = report["curve"]
    ax.plot([r["holdout_gmacs"] for r in curve], [r[f"holdout_{metric}"] for r in curve], "o-", color="C3",
            label="cascade (thresholds per budget)")
    styles = [("stage", "s", "C0", "cascade stages alone", "none")]
    styles += [(schedule.method, schedule.marker, schedule.color, schedule.label, "--") for schedule in FRONTIER]
    for family, marker, color, label, linestyle in styles:
        rows = sorted((r for r in report["frontier"] if r["family"] == family), key=lambda r: r["gmacs"])
        if rows:
            ax.plot([r["gmacs"] for r in rows], [r[metric] for r in rows], marker=marker, color=color,
                    linestyle=linestyle, label=label)
    held, budget = report["holdout"], report["budget"]["gmacs"]
    ax.plot([held["gmacs"]], [held[metric]], "*", markersize=16, color="C3", markeredgecolor="k",
            label=f"cascade @ budget {budget:.3f} GMACs")
    ax.axvline(budget, color="grey", linewidth=0.8, linestyle=":")
    ax.axvline(report["gmacs_base"], color="k", linewidth=0.8, linestyle=":", label="base model GMACs")
    ax.set_xlabel("mean GMACs / image")
    ax.set_ylabel("held-out top-1 %" if metric == "top1" else "held-out agreement with base %")
    ax.set_title(f"{report['model']}: {report['cascade']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return png_bytes(fig)
