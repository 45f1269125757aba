"""Where a cascade's images exit: the images grouped by exit stage, each stage with its cost.

The exits are the cascade's own (`CascadeModel.run`, the one exit rule every runner shares).
"""
from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure
from torch import Tensor

from vitprune.cascade import CascadeModel, describe_stage
from vitprune.plots import new_figure, png_bytes
from vitprune.show.draw import CELL_INCHES, DPI, TITLE_INCHES, display_images, top1_labels

EXIT_COLUMNS = 8  # images per row of a stage; more wrap to further rows
LABEL_INCHES = 2.2  # the stage labels left of the grid


def exit_rows(counts: list[int], columns: int = EXIT_COLUMNS) -> list[int]:
    """Grid rows per stage: enough for its images, one (empty) for a stage no image exits at."""
    return [max(1, math.ceil(count / columns)) for count in counts]


@torch.inference_mode()
def cascade_exits_figure(cascade: CascadeModel, images: Tensor, names: list[str] | None = None) -> Figure:
    """The figure for `images`, a batch preprocessed at `cascade.input_size` (`cascade.transform()`)."""
    param = next(cascade.parameters())
    run = cascade.run(images.to(device=param.device, dtype=param.dtype), count_macs=True)
    exit_stage, spent = run.exit_stage.cpu(), run.gmacs_per_image
    widest = cascade.stages[cascade.stage_sizes.index(cascade.input_size)]
    rgb, labels = display_images(widest, images), top1_labels(widest, run.logits.float().cpu())
    members = [torch.nonzero(exit_stage == index).flatten().tolist() for index in range(len(cascade.stages))]
    rows = exit_rows([len(group) for group in members])
    columns = min(EXIT_COLUMNS, max(1, max(len(group) for group in members)))
    figure = new_figure(columns * CELL_INCHES + LABEL_INCHES, sum(rows) * (CELL_INCHES + TITLE_INCHES), dpi=DPI)
    axes = figure.subplots(sum(rows), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_frame_on(False)
    first_row = 0
    for index, group in enumerate(members):
        label = _stage_label(cascade, index, group, spent, len(images))
        axes[first_row, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
        for slot, image in enumerate(group):
            axis = axes[first_row + slot // columns, slot % columns]
            axis.imshow(rgb[image])
            axis.set_title(labels[image] if names is None else f"{names[image]}\n{labels[image]}", fontsize=7)
        first_row += rows[index]
    return figure


def cascade_exits_png(cascade: CascadeModel, images: Tensor, names: list[str] | None = None) -> bytes:
    return png_bytes(cascade_exits_figure(cascade, images, names))


def _stage_label(cascade: CascadeModel, index: int, group: list[int], spent: Tensor, total: int) -> str:
    plan = cascade.plans[index]
    lines = [f"stage {index + 1}", describe_stage(plan), f"{cascade.stage_gmacs[index]:.3f} GMACs"]
    if index < len(cascade.thresholds):
        lines.append(f"exit at confidence >= {cascade.thresholds[index]:.3g}")
    lines.append(f"{len(group)} of {total} images exit here")
    if group:
        lines.append(f"{float(spent[group].mean()):.3f} GMACs each (all stages run)")
    return "\n".join(lines)
