"""Token maps drawn on the images, as the model sees them: one row per image, one column per reducing block.

Kept/dropped style (EViT, ATS): kept patches clear, dropped ones dimmed, the patches folded into
a fused token tinted orange, stronger where their share of the fused token is larger. Group style
(ToMe): every token of several patches painted in one colour (its patches' mean colour, tinted),
with a line between groups. Each block is drawn in its own method's style (`Method.merges`).
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from timm.data import ImageNetInfo, infer_imagenet_subset
from torch import Tensor, nn

from vitprune.data import data_config_for
from vitprune.plots import new_figure, png_bytes
from vitprune.show.maps import TokenMap, traced_maps

CELL_INCHES = 2.0  # width of one image cell, and height of its picture
TITLE_INCHES = 0.4  # height of a cell's two-line title
LEGEND_INCHES = 0.4  # the legend above the grid
DPI = 100
DIM = 0.22  # brightness left to a dropped patch
FUSED_COLOUR = np.array([1.0, 0.55, 0.0])
BORDER_COLOUR = np.array([1.0, 1.0, 1.0])
LEGEND = ("kept/dropped blocks: kept patches clear, dropped ones dimmed, tinted orange by their share of the fused token; "
          "merging blocks: one colour per token of several patches")


def display_images(model: nn.Module, images: Tensor) -> np.ndarray:
    """A preprocessed batch (B, 3, H, W) back to displayable RGB (B, H, W, 3) in [0, 1]: timm's
    data config of `model` (its mean and std) undone."""
    config = data_config_for(model)
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    rgb = (images.detach().float().cpu() * std + mean).clamp(0, 1)
    return rgb.permute(0, 2, 3, 1).numpy()


def top1_labels(model: nn.Module, logits: Tensor) -> list[str]:
    """'goldfish 0.93' per image: the top-1 class (timm's ImageNet names for an ImageNet-sized
    head, else its index) and its softmax probability."""
    subset = infer_imagenet_subset(model)
    info = ImageNetInfo(subset) if subset else None
    probs = logits.float().softmax(dim=-1)
    best, index = probs.max(dim=-1)
    labels = []
    for prob, cls in zip(best.tolist(), index.tolist()):
        name = info.index_to_description(cls).split(",")[0] if info is not None else f"class {cls}"
        labels.append(f"{name} {prob:.2f}")
    return labels


def token_maps_figure(model: nn.Module, images: Tensor, names: list[str] | None = None) -> Figure:
    """The figure for `images` (a preprocessed batch) through `model` (a reduced ViT)."""
    maps, logits = traced_maps(model, images)
    rgb = display_images(model, images)
    labels = top1_labels(model, logits)
    rows, cols = len(images), 1 + len(maps)
    figure = new_figure(*grid_inches(rows, cols), dpi=DPI)
    axes = figure.subplots(rows, cols, squeeze=False)
    for row in range(rows):
        caption = labels[row] if names is None else f"{names[row]}\n{labels[row]}"
        _picture(axes[row, 0], rgb[row], caption)
        for col, tmap in enumerate(maps, start=1):
            view = group_view(rgb[row], tmap, row) if tmap.merges else keep_view(rgb[row], tmap, row)
            _picture(axes[row, col], view, f"layer {tmap.layer}: {tmap.reduction.describe()}\n"
                                           f"{int(tmap.tokens[row])} tokens left")
    figure.suptitle(LEGEND, fontsize=7, wrap=True)
    return figure


def grid_inches(rows: int, cols: int) -> tuple[float, float]:
    """The figure size (width, height) of a grid of titled image cells under a legend."""
    return cols * CELL_INCHES, rows * (CELL_INCHES + TITLE_INCHES) + LEGEND_INCHES


def token_maps_png(model: nn.Module, images: Tensor, names: list[str] | None = None) -> bytes:
    return png_bytes(token_maps_figure(model, images, names))


def keep_view(rgb: np.ndarray, tmap: TokenMap, image: int) -> np.ndarray:
    """Image `image` with its dropped patches dimmed and its fused patches tinted by their share."""
    kept = _per_pixel(tmap.kept[image], tmap.grid, rgb.shape)[..., None]
    fused = tmap.fused[image]
    share = torch.where(fused, tmap.share[image], 0.0)
    strength = share / share.max() if fused.any() else share
    tint = 0.7 * _per_pixel(strength, tmap.grid, rgb.shape)[..., None]
    dimmed = rgb * DIM
    dimmed = dimmed * (1 - tint) + FUSED_COLOUR * tint
    return np.where(kept, rgb, dimmed)


def group_view(rgb: np.ndarray, tmap: TokenMap, image: int) -> np.ndarray:
    """Image `image` with every token of several patches in one colour, lines between groups."""
    group = tmap.group[image]
    sizes = tmap.group_sizes()[image]
    patch_rgb = _patch_means(rgb, tmap.grid)  # (M, 3)
    slots = group.clamp_min(0).numpy()
    total = np.zeros((int(slots.max()) + 1, 3))
    np.add.at(total, slots, patch_rgb)
    counts = np.bincount(slots, minlength=len(total))[:, None]
    mean = total[slots] / np.maximum(counts[slots], 1)
    painted = 0.65 * mean + 0.35 * _palette(slots)
    merged = (sizes > 1).numpy()
    colour = _per_pixel(torch.from_numpy(np.where(merged[:, None], painted, 0.0)), tmap.grid, rgb.shape)
    out = np.where(_per_pixel(torch.from_numpy(merged), tmap.grid, rgb.shape)[..., None], colour, rgb)
    out = np.where(~_per_pixel(tmap.kept[image], tmap.grid, rgb.shape)[..., None], out * DIM, out)
    border = _borders(_per_pixel(group, tmap.grid, rgb.shape), _per_pixel(torch.from_numpy(merged), tmap.grid, rgb.shape))
    out[border] = BORDER_COLOUR
    return out


def _picture(axis: Axes, picture: np.ndarray, title: str) -> None:
    axis.imshow(picture, interpolation="nearest")
    axis.set_title(title, fontsize=7)
    axis.set_xticks([])
    axis.set_yticks([])


def _per_pixel(values: Tensor, grid: tuple[int, int], shape: tuple[int, ...]) -> np.ndarray:
    """Per-patch values (M,) or (M, K) spread over the image's pixels: (H, W) or (H, W, K)."""
    rows, cols = grid
    array = values.numpy() if isinstance(values, Tensor) else np.asarray(values)
    array = array.reshape(rows, cols, *array.shape[1:])
    return array.repeat(shape[0] // rows, axis=0).repeat(shape[1] // cols, axis=1)


def _patch_means(rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    height, width = rgb.shape[0] // rows, rgb.shape[1] // cols
    cropped = rgb[: rows * height, : cols * width]
    return cropped.reshape(rows, height, cols, width, 3).mean(axis=(1, 3)).reshape(rows * cols, 3)


def _palette(slots: np.ndarray) -> np.ndarray:
    """A fixed, well-spread colour per token index (golden-ratio hues)."""
    hue = (slots * 0.618033988749895) % 1.0
    return np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (hue + shift)) for shift in (0.0, 1 / 3, 2 / 3)], axis=-1)


def _borders(group_px: np.ndarray, merged_px: np.ndarray) -> np.ndarray:
    """Pixels on the edge between two tokens, where at least one side is a merged group."""
    edge = np.zeros(group_px.shape, dtype=bool)
    right = (group_px[:, 1:] != group_px[:, :-1]) & (merged_px[:, 1:] | merged_px[:, :-1])
    down = (group_px[1:] != group_px[:-1]) & (merged_px[1:] | merged_px[:-1])
    edge[:, 1:] |= right
    edge[1:] |= down
    return edge
