"""Per-block token maps: which original patches each reducing block keeps, drops, fuses or merges.

    maps = vitprune.show.token_maps(model, images)     # one TokenMap per reducing block
    maps[0].group[0].view(maps[0].grid)                 # image 0: the token holding each patch

The maps come from one forward pass with source tracking on (`record_tokens(model, sources=True)`,
see vitprune.reducers.sources), which leaves the logits exactly as they are without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.models import grid_size
from vitprune.patch import record_tokens
from vitprune.plan import Reduction
from vitprune.reducers.sources import patch_groups, whole_tokens


@dataclass(frozen=True)
class TokenMap:
    """The tokens at the output of one reducing block, on the patch grid (M = grid[0] * grid[1] patches)."""

    layer: int
    reduction: Reduction
    grid: tuple[int, int]  # patch rows, patch columns
    group: Tensor  # (B, M) long: the output token holding each patch; -1 where no token does (dropped)
    kept: Tensor  # (B, M) bool: held by a token made of whole patches (a kept or merged token)
    share: Tensor  # (B, M) float: the patch's weight in its token (1/size when merged; class attention when fused)
    tokens: Tensor  # (B,) tokens left after the block, prefix tokens included (per image: ATS)

    @property
    def fused(self) -> Tensor:
        """(B, M) bool: patches folded into a fused token (EViT), neither kept nor gone."""
        return (self.group >= 0) & ~self.kept

    @property
    def dropped(self) -> Tensor:
        """(B, M) bool: patches no kept or merged token stands for (gone or fused)."""
        return ~self.kept

    @property
    def merges(self) -> bool:
        """The block's method merges tokens into groups (drawn as groups, not kept/dropped)."""
        return self.reduction.spec.merges

    def group_sizes(self) -> Tensor:
        """(B, M) the number of patches in each patch's token (0 where dropped)."""
        counts = torch.zeros(self.group.shape[0], int(self.group.max()) + 2, dtype=torch.long)
        counts.scatter_add_(1, self.group + 1, torch.ones_like(self.group))
        return torch.where(self.group >= 0, counts[:, 1:].gather(1, self.group.clamp_min(0)), 0)


def token_maps(model: nn.Module, images: Tensor) -> list[TokenMap]:
    """The token map of every reducing block of `model` (a ViT reduced by `vitprune.apply`) on
    `images`, a preprocessed batch (B, C, H, W): per patch, the token holding it, kept or dropped."""
    return traced_maps(model, images)[0]


@torch.inference_mode()
def traced_maps(model: nn.Module, images: Tensor) -> tuple[list[TokenMap], Tensor]:
    """(the token maps, the logits (B, classes) of the same forward pass)."""
    if images.ndim != 4:
        raise VitpruneError(f"images must be a (B, C, H, W) batch, got shape {list(images.shape)}")
    param = next(model.parameters())
    with record_tokens(model, sources=True) as trace:
        logits = model(images.to(device=param.device, dtype=param.dtype)).float().cpu()
    grid = grid_size(model)
    maps = [_token_map(entry, grid) for entry in trace if isinstance(entry["reduction"], Reduction)]
    return maps, logits


def _token_map(entry: dict, grid: tuple[int, int]) -> TokenMap:
    source = entry["source"].float()
    group, share = patch_groups(source)
    whole = whole_tokens(source)
    kept = (group >= 0) & whole.gather(1, group.clamp_min(0))
    return TokenMap(layer=entry["layer"], reduction=entry["reduction"], grid=grid, group=group, kept=kept,
                    share=share, tokens=entry["n_out"].long())
