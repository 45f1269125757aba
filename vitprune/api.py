"""`vitprune.load`: any artifact vitprune writes, a reduced ViT or a DVT cascade."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vitprune.artifact import load_artifact
from vitprune.cascade import CASCADE_FILE, load_cascade


def load(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """The model saved at `path` in eval mode: a reduced ViT (an artifact folder or its
    .safetensors), or a `CascadeModel` (a folder written by `vitprune cascade`). `verify`: refuse
    weights that changed since they were written (sha256); False loads edited artifacts."""
    if (Path(path) / CASCADE_FILE).is_file():
        return load_cascade(path, device=device)
    return load_artifact(path, device=device, verify=verify)
