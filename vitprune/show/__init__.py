"""See what a reduction does: token maps per reducing block, and where a cascade's images exit.

    maps = vitprune.show.token_maps(model, images)      # tensors: per patch, kept / dropped / group
    png = token_maps_png(model, images)                   # the picture `vitprune show` writes
    png = cascade_exits_png(cascade, images)              # images grouped by exit stage

Modules: maps (the per-block maps, from the reduced forward with source tracking on), draw (token
maps on the images, as the model sees them), exits (a cascade's exit grid).
"""
from __future__ import annotations

from vitprune.show.draw import display_images, token_maps_figure, token_maps_png, top1_labels
from vitprune.show.exits import cascade_exits_figure, cascade_exits_png, exit_rows
from vitprune.show.maps import TokenMap, token_maps, traced_maps

__all__ = [
    "TokenMap", "token_maps", "traced_maps", "display_images", "top1_labels", "token_maps_figure",
    "token_maps_png", "cascade_exits_figure", "cascade_exits_png", "exit_rows",
]
