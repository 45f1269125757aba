"""What a run shows: metrics.csv, training.png, the epoch log line, the report's "finetune"
section and its tables (report.md and the terminal)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure
from rich.console import Console
from torch import nn

from vitprune.finetune.supervit import Variant, served_model
from vitprune.finetune.validate import VARIANT_METRICS, Validation
from vitprune.io import atomic_output_file
from vitprune.plots import new_figure, png_bytes
from vitprune.report import count_gmacs
from vitprune.tables import ReportTable

METRICS_FILE = "metrics.csv"
PLOT_FILE = "training.png"


@dataclass
class History:
    """One metrics.csv row per epoch (epoch 0: before training) and the loss of every step."""

    rows: list[dict] = field(default_factory=list)
    steps: list[tuple[float, float]] = field(default_factory=list)  # (fractional epoch, loss)

    def train_seconds(self) -> float:
        """The epochs' training time (validation left out), summed over every part of a resumed run:
        the rows come back with the checkpoint."""
        return sum(row.get("epoch_seconds", 0.0) for row in self.rows)


# --------------------------------------------------------------------------- files


def metrics_csv(rows: list[dict]) -> str:
    """Every row, the columns in order of first appearance; floats to 6 significant digits."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    return buffer.getvalue()


def write_metrics_csv(rows: list[dict], path: Path) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_text(metrics_csv(rows))


def training_figure(history: History, variants: list[Variant]) -> Figure:
    """Training loss per step (and per epoch), validation agreement / top-1 per epoch."""
    figure = new_figure(11, 4.2, 110)
    loss_axes, val_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    if history.steps:
        loss_axes.plot([s for s, _ in history.steps], [v for _, v in history.steps], lw=0.8, alpha=0.45,
                       label="per step")
    trained = [row for row in history.rows if "train_loss" in row]
    loss_axes.plot([row["epoch"] for row in trained], [row["train_loss"] for row in trained], "o-", label="epoch mean")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    loss_axes.legend()
    for variant in variants:
        for metric, style in (("agreement", "o-"), ("top1", "s--")):
            key = f"{variant.key}_{metric}"
            points = [(row["epoch"], row[key]) for row in history.rows if key in row]
            if points:
                shown = "agreement" if metric == "agreement" else "top-1"
                label = f"{variant.label}: {shown}" if len(variants) > 1 else shown
                val_axes.plot(*zip(*points, strict=True), style, label=label)
    val_axes.set(xlabel="epoch (0 = before training)", ylabel="%", title="Validation")
    if val_axes.lines:
        val_axes.legend(fontsize=7 if len(variants) > 3 else 9)
    else:
        val_axes.text(0.5, 0.5, "no validation images (--val / --val-split)", ha="center", transform=val_axes.transAxes)
    return figure


def plot_training(history: History, variants: list[Variant], path: Path) -> None:
    with atomic_output_file(path) as tmp:
        tmp.write_bytes(png_bytes(training_figure(history, variants)))


def log_epoch(row: dict, variants: list[Variant], enabled: bool) -> None:
    """One line on stderr: the epoch's loss and speed, each variant's validation figures."""
    if not enabled:
        return
    if "train_loss" in row:
        parts = [f"epoch {row['epoch']}: loss {row['train_loss']:.4f}", f"{row['images_per_s']:.1f} img/s"]
    else:
        parts = ["before training"]
    for variant in variants:
        if f"{variant.key}_agreement" in row:
            name = "" if len(variants) == 1 else f"{variant.label} "
            top1 = f", top-1 {row[f'{variant.key}_top1']:.2f}%" if f"{variant.key}_top1" in row else ""
            parts.append(f"{name}agreement {row[f'{variant.key}_agreement']:.2f}%{top1}")
    Console(stderr=True).print(" | ".join(parts))


# --------------------------------------------------------------------------- the report's "finetune" section


def variant_entry(trained: nn.Module, variant: Variant, validation: Validation | None, history: History) -> dict:
    """One configuration: its plan, GMACs and validation figures before and after training."""
    model = served_model(trained, variant.plan)
    images = validation.images[variant.img_size] if validation is not None else None
    entry = {"name": variant.key, "label": variant.label, "img_size": variant.img_size,
             "plan": variant.plan.describe(), "gmacs": round(count_gmacs(model, images), 4)}
    if variant.keep is not None:
        entry["keep"] = variant.keep
    for when, row in (("before", history.rows[0]), ("after", history.rows[-1])):
        found = {m: round(row[f"{variant.key}_{m}"], 4) for m in VARIANT_METRICS if f"{variant.key}_{m}" in row}
        if found:
            entry[when] = found
    if validation is not None and "after" in entry:  # the trained weights' figures with their 95% intervals
        entry["after"].update(validation.intervals(model, variant))
    return entry


def teacher_entry(teacher: nn.Module, validation: Validation | None) -> dict:
    entry = {"gmacs": round(count_gmacs(teacher, None), 4)}
    if validation is not None:
        entry.update({key: round(value, 4) for key, value in validation.teacher_metrics.items()})
    return entry


def supervit_notes(variants: list[Variant], entries: list[dict]) -> dict:
    """The plan notes `list_variants` / `load_variant` read back: every configuration and its figures."""
    return {"variants": [{"name": v.key, "img_size": v.img_size, "keep": v.keep, "plan": v.plan.to_dict(),
                          **_figures(entry)} for v, entry in zip(variants, entries, strict=True)]}


def _figures(entry: dict) -> dict:
    after = entry.get("after", {})
    return {"gmacs": entry["gmacs"], **{key: after[key] for key in ("top1", "agreement") if key in after}}


# --------------------------------------------------------------------------- tables


def finetune_markdown(finetune: dict) -> str:
    """The "Fine-tuning" part of report.md: what was trained and the before/after table."""
    labelled = " (labelled)" if finetune["train_labelled"] else " (unlabelled: distillation only)"
    lines = ["## Fine-tuning", "",
             f"{finetune['epochs']} epochs on {finetune['train_images']} images{labelled}, "
             f"{finetune['world_size']} process(es), {finetune['train_seconds']:.0f} s.", ""]
    if finetune["val_images"]:
        teacher = finetune["teacher"]
        top1 = f", top-1 {teacher['top1']:.2f}%" if "top1" in teacher else ""
        lines += [f"Validation on {finetune['val_images']} images from `{finetune['val_data']}`; teacher (unreduced) "
                  f"{teacher['gmacs']:.3f} GMACs{top1}. After: [95% interval] against the teacher (top-1: of "
                  "its drop).", "", _before_after_columns(finetune).markdown()]
    else:
        table = ReportTable(["configuration", "GMACs"])
        for variant in finetune["variants"]:
            table.add(variant["label"], f"{variant['gmacs']:.3f}")
        lines.append(table.markdown())
    return "\n".join(lines) + "\n"


def _before_after_columns(finetune: dict) -> ReportTable:
    table = ReportTable(["configuration", "GMACs", "top-1 before", "top-1 after", "agreement before",
                         "agreement after", "KL before", "KL after"])
    for variant in finetune["variants"]:
        before, after = variant.get("before", {}), variant.get("after", {})
        cells = [_cell(when, key, spec) for key, spec in (("top1", ".2f"), ("agreement", ".2f"), ("kl", ".4f"))
                 for when in (before, after)]
        table.add(variant["label"], f"{variant['gmacs']:.3f}", *cells)
    return table


def _cell(figures: dict, key: str, spec: str) -> str:
    return format(figures[key], spec) + _interval(figures, key, spec) if key in figures else "-"


def _interval(figures: dict, key: str, spec: str) -> str:
    """' [low, high]': the figure's 95% interval against the teacher (top-1: of its drop), when measured."""
    interval = figures.get(f"{key}_drop_ci95" if key == "top1" else f"{key}_ci95")
    return f" [{interval[0]:{spec}}, {interval[1]:{spec}}]" if interval else ""


def before_after_table(finetune: dict) -> ReportTable:
    """Every configuration's GMACs and validation figures, before -> after fine-tuning (the terminal's table)."""
    teacher = finetune["teacher"]
    title = (f"{finetune['epochs']} epochs on {finetune['train_images']} images; teacher {teacher['gmacs']:.3f} GMACs"
             + (f", top-1 {teacher['top1']:.2f}%" if "top1" in teacher else ""))
    table = ReportTable(["configuration", "GMACs", "top-1 %", "agreement %", "KL"], title=title
                        + "; after: [95% interval] against the teacher (top-1: of the drop)")
    for variant in finetune["variants"]:
        before, after = variant.get("before", {}), variant.get("after", {})
        table.add(variant["label"], f"{variant['gmacs']:.3f}", _change(before, after, "top1", ".2f"),
                  _change(before, after, "agreement", ".2f"), _change(before, after, "kl", ".4f"))
    return table


def _change(before: dict, after: dict, key: str, spec: str) -> str:
    if key not in after:
        return "-"
    return (f"{before[key]:{spec}} -> " if key in before else "") + f"{after[key]:{spec}}" + _interval(after, key, spec)
