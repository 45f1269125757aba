"""The Python API (`import vitprune`): every call's arguments are checked here, at the boundary, so
that a misuse is a `VitpruneError` naming the parameter, never a raw TypeError from deep inside.

`load` reads any artifact vitprune writes, a reduced ViT or a DVT cascade.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitprune.artifact import load_artifact, write_artifact
from vitprune.cascade import CASCADE_FILE, load_cascade
from vitprune.checks import is_whole
from vitprune.errors import VitpruneError
from vitprune.flops import MacsReport
from vitprune.flops import count_macs as _count_macs
from vitprune.models import create_model as _create_model
from vitprune.models import is_supported_vit
from vitprune.patch import ReducedTokens, remove_plan
from vitprune.patch import apply as _apply
from vitprune.patch import plan_of as _plan_of
from vitprune.patch import reduced_intermediates as _reduced_intermediates
from vitprune.plan import Plan
from vitprune.plan import make_plan as _make_plan


def create_model(name: str, *, pretrained: bool = True, checkpoint: str | Path | None = None,
                 img_size: int | tuple[int, int] | None = None, num_classes: int | None = None,
                 model_args: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A supported timm ViT in eval mode and its info (see `vitprune.models.create_model`)."""
    _check_text(name, "name")
    _check_bool(pretrained, "pretrained")
    if checkpoint is not None:
        _check_path(checkpoint, "checkpoint")
    if model_args is not None and not isinstance(model_args, dict):
        raise VitpruneError(f"model_args must be a dict of timm build arguments, got {_kind(model_args)}",
                            param="model_args")
    return _create_model(name, pretrained=pretrained, checkpoint=checkpoint, img_size=img_size,
                         num_classes=num_classes, model_args=model_args)


def apply(model: nn.Module, plan: Plan | None = None, *, method: str | None = None, layers: list[int] | None = None,
          img_size: int | None = None, head_only: bool = False, **settings: Any) -> nn.Module:
    """Patch a timm ViT in place to reduce tokens, by a `plan` or by one method's settings; returns it
    (see `vitprune.patch.apply`)."""
    check_model(model)
    if plan is not None and not isinstance(plan, Plan):
        raise VitpruneError(f"plan must be a vitprune.Plan, got {_kind(plan)}", param="plan")
    if method is not None:
        _check_text(method, "method")
    _check_layers(layers)
    _check_bool(head_only, "head_only")
    return _apply(model, plan, method=method, layers=None if layers is None else list(layers), img_size=img_size,
                  head_only=head_only, **settings)


def make_plan(method: str, depth: int, *, layers: list[int] | None = None, img_size: int | None = None,
              head_only: bool = False, tokens: int | None = None, **settings: Any) -> Plan:
    """The plan `method` says (a method name or the plan grammar) for a `depth`-block model (see
    `vitprune.plan.make_plan`)."""
    _check_text(method, "method")
    if not is_whole(depth, 1):
        raise VitpruneError(f"depth must be a whole number >= 1, got {depth!r}", param="depth")
    _check_layers(layers)
    _check_bool(head_only, "head_only")
    return _make_plan(method, depth, layers=None if layers is None else list(layers), img_size=img_size,
                      head_only=head_only, tokens=tokens, **settings)


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply` (the input size stays as it is); returns the model."""
    _check_module(model)
    return remove_plan(model)


def plan_of(model: nn.Module) -> Plan | None:
    """The plan `model` runs, or None for a model `apply` has not reduced."""
    _check_module(model)
    return _plan_of(model)


def count_macs(model: nn.Module, images: Tensor | None = None) -> MacsReport:
    """Exact GMACs per image of `model` on `images` (B, 3, H, W) (see `vitprune.flops.count_macs`)."""
    check_model(model)
    if images is not None:
        _check_images(images)
    return _count_macs(model, images)


def _check_images(images: object) -> None:
    """A non-empty, finite float batch (B, 3, H, W)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        got = f"shape {tuple(images.shape)}" if isinstance(images, Tensor) else _kind(images)
        raise VitpruneError(f"images must be a float tensor (batch, channels, height, width), got {got}",
                            param="images")
    if images.shape[0] == 0:
        raise VitpruneError("images is an empty batch: give at least one image", param="images")
    if not bool(torch.isfinite(images).all()):
        raise VitpruneError("images holds NaN or infinite values", param="images")


def reduced_intermediates(model: nn.Module, images: Tensor,
                          indices: int | list[int] | None = None) -> list[ReducedTokens]:
    """A reduced model's tokens after the blocks `indices` names (timm's rule: the last n for an int,
    all for None), each with its patch map (see `vitprune.patch.ReducedTokens`); the same tokens on the
    patch grid come from `model.forward_intermediates`."""
    check_model(model)
    _check_images(images)
    return _reduced_intermediates(model, images, indices)


def save(out_dir: str | Path, model: nn.Module, info: dict, *, report: dict | None = None,
         report_md: str | None = None, force: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write `model` (reduced by `apply` or not) and the `info` `create_model` returned as an artifact
    folder, atomically (see `vitprune.artifact.write_artifact`)."""
    _check_path(out_dir, "out_dir")
    check_model(model)
    if not isinstance(info, dict) or not isinstance(info.get("model"), str):  # the timm name `load` rebuilds
        raise VitpruneError(f"info must be the dict create_model returned (with the timm name as 'model'), got "
                            f"{info!r}"[:200], param="info")
    _check_bool(force, "force")
    if report is not None and not isinstance(report, dict):
        raise VitpruneError(f"report must be a dict, got {_kind(report)}", param="report")
    return write_artifact(out_dir, model, info, report=report, report_md=report_md, force=force,
                          extra_files=extra_files)


def load(path: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """The model saved at `path` in eval mode: a reduced ViT (an artifact folder or its
    .safetensors), or a `CascadeModel` (a folder written by `vitprune cascade`). `verify`: refuse
    weights that changed since they were written, or carry no hash (sha256); False loads edited artifacts."""
    _check_path(path, "path")
    _check_bool(verify, "verify")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise VitpruneError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}",
                            param="device") from error
    if (Path(path) / CASCADE_FILE).is_file():
        return load_cascade(path, device=device)
    return load_artifact(path, device=device, verify=verify)


def check_model(model: object, param: str = "model") -> None:
    """A supported timm ViT whose weights hold values (not on the meta device)."""
    _check_module(model, param)
    problem = is_supported_vit(model)
    if problem:
        raise VitpruneError(f"{param} is not a supported timm ViT ({problem})", param=param)
    if any(tensor.is_meta for tensor in (*model.parameters(), *model.buffers())):
        raise VitpruneError(f"{param} is on the meta device (its weights hold no values): load its weights first, "
                            "e.g. with model.to_empty(device='cpu') and load_state_dict", param=param)


def _check_module(model: object, param: str = "model") -> None:
    if not isinstance(model, nn.Module):
        raise VitpruneError(f"{param} must be a torch nn.Module (a timm ViT), got {_kind(model)}", param=param)


def _check_layers(layers: object) -> None:
    """None, or a list of whole block indices (a string such as "3,6" or 3.5 is refused)."""
    if layers is None:
        return
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, range)):
        raise VitpruneError(f"layers must be a list of block indices such as [3, 6, 9], got {layers!r}",
                            param="layers")
    bad = next((layer for layer in layers if not is_whole(layer, 0)), None)
    if bad is not None or any(isinstance(layer, bool) for layer in layers):
        raise VitpruneError(f"layers must be whole block indices >= 0, got {bad!r} in {list(layers)!r}",
                            param="layers")


def _check_text(value: object, param: str) -> None:
    if not isinstance(value, str):
        raise VitpruneError(f"{param} must be a string, got {_kind(value)}", param=param)


def _check_bool(value: object, param: str) -> None:
    if not isinstance(value, bool):
        raise VitpruneError(f"{param} must be True or False, got {value!r}", param=param)


def _check_path(value: object, param: str) -> None:
    if not isinstance(value, (str, os.PathLike)) or (isinstance(value, str) and not value.strip()):
        raise VitpruneError(f"{param} must be a path (str or pathlib.Path), got {value!r}", param=param)


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__
