"""Model factory: resolve timm model names, build supported ViTs and load their weights."""

from __future__ import annotations

import argparse
import difflib
import os
import pickle
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.layers import to_2tuple
from timm.models import beit, eva, naflexvit, vision_transformer, vision_transformer_relpos
from timm.models.naflexvit import NaFlexVit
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from vitprune.blocks import block_kind
from vitprune.checks import is_whole
from vitprune.errors import VitpruneError
from vitprune.io import file_sha256

SUPPORTED_MODELS_HINT = (
    "vitprune supports timm's VisionTransformer (pre- and post-norm blocks, any MLP, hybrid stems: vit_*, deit*, "
    "*_reg*, siglip, aimv2, vitamin), Eva (eva02_*, DINOv3, Perception Encoder, RoPE ViTs), BEiT (beit*), "
    "relative-position ViT (vit_relpos_*, vit_srelpos_*) and NaFlexVit (naflexvit_*, on image batches) models"
)
TORCH_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
# Training scripts nest the weights under one of these keys (timm, DeiT, Lightning, EMA variants).
STATE_DICT_WRAPPER_KEYS = ("model", "state_dict", "model_ema", "state_dict_ema")
DDP_PREFIX = "module."
MISMATCH_EXAMPLES = 3
LAYER_NORM_EPS = "layer_norm_eps"  # a model_args key vitprune applies after timm's build
# Memory: what cannot fit is refused before any work, naming the largest value that could.
FLOAT_BYTES = 4  # activations are float32 (autocast halves some; the estimate stays on the safe side)
RESIDUAL_COPIES = 6  # the block input, its norm, q, k, v and the attention output, tokens x width each
CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def resolve_model_name(name: str) -> str:
    """Turn a timm name or short alias (``deit_small``) into a timm model name, keeping any ``.tag``."""
    architecture, _, tag = name.strip().partition(".")
    if not architecture:
        raise VitpruneError(f"unknown model {name!r}; give a timm model name such as vit_tiny_patch16_224")
    resolved = _resolve_architecture(architecture)
    if not tag:
        return resolved
    _check_pretrained_tag(resolved, tag)
    return f"{resolved}.{tag}"


def _resolve_architecture(architecture: str) -> str:
    if timm.is_model(architecture):
        return architecture
    if timm.is_model(f"{architecture}_patch16_224"):
        return f"{architecture}_patch16_224"
    prefixed = [m for m in timm.list_models() if m.startswith(architecture + "_")]
    patch16 = [m for m in prefixed if "patch16" in m]
    candidates = patch16 or prefixed
    if candidates:
        return min(candidates, key=lambda m: (len(m), m))
    suggestions = difflib.get_close_matches(architecture, timm.list_models(), n=3)
    if suggestions:
        raise VitpruneError(f"unknown model {architecture!r}; did you mean: {', '.join(suggestions)}?")
    raise VitpruneError(f"unknown model {architecture!r}; timm has no model with a similar name")


def _check_pretrained_tag(architecture: str, tag: str) -> None:
    known_tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{architecture}.*")]
    if tag not in known_tags:
        available = ", ".join(known_tags) or "none"
        raise VitpruneError(f"unknown pretrained tag {tag!r} for {architecture}; available tags: {available}")


# Why the timm ViT classes and blocks vitprune does not reduce are refused (the part that blocks it).
UNSUPPORTED_PARTS = {
    "rope_mixed": "rotary embeddings other than one rotation per patch (mixed: learned per block and head; "
                  "multimodal), which vitprune does not carry through reduced tokens",
    "EvaBlockPostNorm": "post-norm Eva blocks, which vitprune's block kinds do not cut",
    "VisionTransformerSAM": "windowed attention with a relative position bias and a convolutional neck (SAM's "
                            "image encoder, for dense prediction)",
    "ParallelScalingBlock": "attention and MLP in parallel on the same tokens, so no reduction can sit between them",
    "DiffParallelScalingBlock": "attention and MLP in parallel on the same tokens, so no reduction can sit between "
                                "them",
    "ParallelThingsBlock": "attention and MLP in parallel on the same tokens, so no reduction can sit between them",
    "DiffAttention": "differential attention (the difference of two softmax maps), which vitprune's attention "
                     "scores do not compute",
}


# ViT classes with a relative position bias, which vitprune gathers for the kept tokens (pruning only)
RELATIVE_POSITION_CLASSES = (beit.Beit, vision_transformer_relpos.VisionTransformerRelPos)
# NaFlexVit rotary embeddings vitprune carries: one rotation per patch, shared by every block and head.
NAFLEX_ROTARY = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3")


def is_supported_vit(model: nn.Module) -> str | None:
    """None when vitprune can reduce tokens in ``model``, else a short reason naming the part that
    blocks it, such as 'found ResNet'."""
    name = type(model).__name__
    if isinstance(model, eva.Eva):
        if getattr(model, "rope_mixed", False):
            return f"found {name} with {UNSUPPORTED_PARTS['rope_mixed']}"
        if model.patch_drop is not None:
            return f"found {name} with patch dropout, whose kept patches vitprune's rotary embeddings do not follow"
    elif isinstance(model, NaFlexVit):
        if model.rope is not None and type(model.rope).__name__ not in NAFLEX_ROTARY:
            return f"found {name} with {type(model.rope).__name__} ({UNSUPPORTED_PARTS['rope_mixed']})"
        if model.patch_drop is not None:
            return f"found {name} with patch dropout, which drops patches in training before vitprune's reductions"
    elif not isinstance(model, (VisionTransformer, *RELATIVE_POSITION_CLASSES)):
        return f"found {name}" + (f" with {UNSUPPORTED_PARTS[name]}" if name in UNSUPPORTED_PARTS else "")
    # The adapter cuts blocks it knows (vitprune.blocks); subclasses and look-alikes are refused.
    for block in model.blocks:
        if block_kind(block) is None:
            part = block if type(block).__name__ in UNSUPPORTED_PARTS else getattr(block, "attn", block)
            why = UNSUPPORTED_PARTS.get(type(part).__name__, "which vitprune cannot cut between attention and MLP")
            return f"found {type(model).__name__} with {type(part).__name__} ({why})"
    return None


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens (class, distillation and register tokens)."""
    return int(model.num_prefix_tokens)


def has_class_token(model: nn.Module) -> bool:
    return bool(model.has_class_token) if isinstance(model, NaFlexVit) else model.cls_token is not None


def stem_of(model: nn.Module) -> nn.Module:
    """The module that turns images into patch tokens: `patch_embed` (hybrid CNN stems included), or
    NaFlexVit's `embeds` (patch projection, position embedding and prefix tokens in one)."""
    return model.embeds if isinstance(model, NaFlexVit) else model.patch_embed


def image_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) the model is built for. NaFlexVit takes any size: its `img_size` when built with
    one, else its pretrained config's input size."""
    if isinstance(model, NaFlexVit):
        size = model.embeds.default_img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[1:]
    else:
        size = model.patch_embed.img_size
    height, width = to_2tuple(size)
    return int(height), int(width)


def size_record(model: nn.Module) -> int | list[int]:
    """The model's input size as artifacts and reports record it, and `create_model` takes it back:
    one side when square, else [height, width]."""
    height, width = image_size(model)
    return height if height == width else [height, width]


def set_image_size(model: nn.Module, img_size: int | tuple[int, int] | list[int]) -> None:
    """Make `model` run at `img_size` (a side, or (height, width)): timm resamples a ViT's position
    embedding once. NaFlexVit resamples its own on every call, so its size is only recorded, as timm's
    constructor records an img_size (which it ignores when the config gives a position embedding grid)."""
    if isinstance(model, NaFlexVit):
        model.embeds.default_img_size = to_2tuple(img_size)
    else:
        model.set_input_size(img_size=img_size)


def grid_size(model: nn.Module) -> tuple[int, int]:
    """(rows, columns) of patch tokens at the model's `image_size`."""
    if isinstance(model, NaFlexVit):
        return model.embeds.dynamic_feat_size(image_size(model))
    return tuple(int(side) for side in model.patch_embed.grid_size)


def outputs_embeddings(model: nn.Module) -> bool:
    """The model has no classifier head (timm num_classes=0): its output is the pooled embedding."""
    return model.num_classes == 0


def use_pre_logits(model: nn.Module) -> nn.Module:
    """Remove the classifier head in place (timm's `reset_classifier(0)`): the model then outputs its
    pre-logits embedding, what `forward_head(x, pre_logits=True)` returns (pooled, fc_norm'ed), and
    every command treats it as an embedding model. Returns the model."""
    model.reset_classifier(0)
    return model


def device_memory_bytes(device: str | torch.device = "cpu") -> int:
    """All the memory a run on `device` can have: the GPU's, or the machine's (its cgroup's limit when lower)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = CGROUP_LIMIT.read_text().strip()
    except OSError:
        return total
    return min(total, int(limit)) if limit.isdigit() else total


def image_bytes(model: nn.Module, img_size: int) -> int:
    """The activations one image at `img_size` holds at once in a block of `model` (no reduction
    assumed): the residual stream and its copies, one head-stack of attention scores (the reducers
    read them), the MLP's hidden layer; plus the image and its position embedding."""
    tokens = (img_size // patch_size_of(model)) ** 2 + int(model.num_prefix_tokens)
    block = model.blocks[0]
    width, heads, hidden = block.attn.qkv.in_features, block.attn.num_heads, block.mlp.fc1.out_features
    per_token = (RESIDUAL_COPIES + 1) * width + hidden + heads * tokens
    return FLOAT_BYTES * (tokens * per_token + 3 * img_size * img_size)


def check_image_fits(model: nn.Module, img_size: int, memory: int, param: str, where: str = "the CPU") -> None:
    """Refuse an input size at which one image alone exceeds `memory` bytes, naming `param` and the
    largest size that fits."""
    one = image_bytes(model, img_size)
    if one <= memory:
        return
    low, high = 1, max(img_size // patch_size_of(model), 1)  # in patches per side
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if image_bytes(model, middle * patch_size_of(model)) <= memory else (low, middle - 1)
    raise VitpruneError(f"input size {img_size} ({param}) cannot fit in memory: one image needs about "
                        f"{one / 2**30:.1f} GiB of activations, more than {where}'s {memory / 2**30:.1f} GiB; the "
                        f"largest that fits is about {low * patch_size_of(model)}", param=param)


def load_checkpoint_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint file into a plain state_dict (unwrapped, without a DDP 'module.' prefix)."""
    path = Path(path)
    if not path.exists():
        raise VitpruneError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise VitpruneError(f"cannot read checkpoint {path}: it is a folder, not a file")
    loaded = _read_checkpoint_file(path)
    state_dict = _unwrap_state_dict(loaded, path)
    return {_strip_ddp_prefix(key): value for key, value in state_dict.items()}


def _read_checkpoint_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        reader: Callable[[], Any] = partial(safetensors.torch.load_file, path, device="cpu")
    elif suffix in TORCH_CHECKPOINT_SUFFIXES:
        reader = partial(_torch_load_weights_only, path)
    else:
        expected = ", ".join((SAFETENSORS_SUFFIX, *TORCH_CHECKPOINT_SUFFIXES))
        raise VitpruneError(
            f"cannot read checkpoint {path}: unknown file type {suffix or '(none)'!r} (expected {expected})"
        )
    try:
        return reader()
    except Exception as error:  # any failure to parse the file is a bad input, not a bug
        raise VitpruneError(f"cannot read checkpoint {path}: {_checkpoint_read_reason(error)}") from error


def _torch_load_weights_only(path: Path) -> Any:
    # weights_only never runs code from the file; DeiT-style training checkpoints also hold an argparse.Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoint_read_reason(error: Exception) -> str:
    if isinstance(error, EOFError):
        return "the file is empty or truncated"
    message = str(error)
    marker = "WeightsUnpickler error:"
    if isinstance(error, pickle.UnpicklingError) and marker in message:
        # torch's message is a long advert for weights_only=False; the useful part follows the marker.
        detail = _first_line(message.split(marker, 1)[1])
        return f"not a plain PyTorch weights file ({detail})"
    return _first_line(message) or type(error).__name__


def _unwrap_state_dict(loaded: Any, path: Path) -> Mapping[str, Any]:
    if not isinstance(loaded, Mapping):
        raise VitpruneError(f"cannot read checkpoint {path}: it holds a {type(loaded).__name__}, not a state_dict")
    for key in STATE_DICT_WRAPPER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    not_tensors = [key for key, value in loaded.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise VitpruneError(
            f"cannot read checkpoint {path}: not a state_dict ({not_tensors[0]!r} is a "
            f"{type(loaded[not_tensors[0]]).__name__}, not a tensor)"
        )
    if not loaded:
        raise VitpruneError(f"cannot read checkpoint {path}: it holds no tensors")
    return loaded


def _strip_ddp_prefix(key: str) -> str:
    return key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key


def create_model(
    name: str,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    img_size: int | tuple[int, int] | None = None,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a supported timm ViT in eval mode, weighted from ``checkpoint``, timm's pretrained weights or random init.

    Returns the model and ``{"model", "tag", "checkpoint", "checkpoint_sha256", "img_size"}``, where
    ``model`` is the timm architecture name without the tag. ``model_args`` (a converted transformers
    model's sizes, vitprune.hf) are timm's build arguments, plus ``layer_norm_eps``; the info keeps them.
    """
    full_name = resolve_model_name(name)
    architecture, _, given_tag = full_name.partition(".")
    timm_args = {key: value for key, value in (model_args or {}).items() if key != LAYER_NORM_EPS}
    build_kwargs = {**timm_args, **_build_kwargs(img_size, num_classes)}
    _refuse_unsupported_architecture(full_name, build_kwargs)

    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    if checkpoint_path is not None:
        state_dict = load_checkpoint_state_dict(checkpoint_path)  # a bad file fails before the build
        model = _build(full_name, pretrained=False, **build_kwargs)
        _raise_if_unsupported(model, architecture)
        load_state_dict_into(model, state_dict, source=str(checkpoint_path))
        tag = given_tag or None  # describes the checkpoint only if the user said so
    elif pretrained:
        model = _build_pretrained(full_name, **build_kwargs)
        tag = model.pretrained_cfg.get("tag") or given_tag or None  # timm picks the default tag
    else:
        model = _build(full_name, pretrained=False, **build_kwargs)
        tag = None
    _raise_if_unsupported(model, architecture)
    if isinstance(model, NaFlexVit) and img_size is not None:
        set_image_size(model, img_size)
    _set_layer_norm_eps(model, (model_args or {}).get(LAYER_NORM_EPS))
    model.eval()

    info = {
        "model": architecture,
        "tag": tag,
        "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
        "checkpoint_sha256": file_sha256(checkpoint_path) if checkpoint_path is not None else None,
        "img_size": size_record(model),
    }
    if model_args:
        info["model_args"] = dict(model_args)
    return model, info


def _set_layer_norm_eps(model: nn.Module, eps: float | None) -> None:
    """timm builds LayerNorm with eps 1e-6; a converted model keeps its own (transformers' ViT: 1e-12)."""
    if eps is not None:
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = float(eps)


def patch_size_of(model: nn.Module) -> int:
    """The side of the model's square patches in pixels: the stride from pixels to tokens (a hybrid
    stem's CNN stride times its patch size)."""
    if isinstance(model, NaFlexVit):
        return int(model.embeds.patch_size[0])
    embed = model.patch_embed
    size, grid = getattr(embed, "img_size", None), getattr(embed, "grid_size", None)
    if size is not None and grid is not None:
        return int((size[0] if isinstance(size, (tuple, list)) else size) // grid[0])
    patch = embed.patch_size
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the images the model is built for: non-square sizes and hybrid
    stems (a CNN before the patch projection) too."""
    if isinstance(model, NaFlexVit):
        return (int(model.in_chans), *image_size(model))
    first_conv = next(module for module in model.patch_embed.modules() if isinstance(module, nn.Conv2d))
    return (int(first_conv.in_channels), *image_size(model))


def _check_patch_multiple(model: nn.Module, img_size: int | tuple[int, int] | None) -> None:
    """One rule everywhere: an input size (square, or (height, width)) is a whole number of patches."""
    if img_size is not None and any(side % patch_size_of(model) for side in to_2tuple(img_size)):
        raise VitpruneError(f"img_size must be a multiple of the patch size {patch_size_of(model)}, got {img_size}",
                            param="img_size")


def checked_size(img_size: object, what: str = "img_size", param: str | None = "img_size") -> int | tuple[int, int]:
    """An input size: one side, or (height, width), of positive whole numbers (a square pair gives its side);
    `what` names it in the error, `param` is the parameter it came from (None: a file's field)."""
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(is_whole(side, 1) for side in img_size):
        return int(img_size[0]) if img_size[0] == img_size[1] else (int(img_size[0]), int(img_size[1]))
    if not is_whole(img_size, 1):
        raise VitpruneError(f"{what} must be a positive integer or (height, width), got {img_size!r}", param=param)
    return int(img_size)


def _build_kwargs(img_size: int | tuple[int, int] | list[int] | None, num_classes: int | None) -> dict[str, Any]:
    img_size = None if img_size is None else checked_size(img_size)
    if num_classes is not None and not is_whole(num_classes, 0):
        raise VitpruneError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    kwargs = {"img_size": img_size, "num_classes": num_classes}
    return {key: value for key, value in kwargs.items() if value is not None}


def _refuse_unsupported_architecture(full_name: str, build_kwargs: dict[str, Any]) -> None:
    """Check the architecture and the input size before any weights are read or downloaded; a meta-device
    build allocates nothing."""
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(full_name, pretrained=False, **build_kwargs)
    except Exception:
        if build_kwargs.get("img_size") is not None:  # a size the stem cannot take (a hybrid's CNN stride)
            try:
                with torch.device("meta"):
                    default = timm.create_model(full_name, pretrained=False)
            except Exception:
                return
            _check_patch_multiple(default, build_kwargs["img_size"])
        return  # the real build reports the error, and the built model is checked again
    _raise_if_unsupported(skeleton, full_name.partition(".")[0])
    size = build_kwargs.get("img_size")  # model_args may give (height, width)
    _check_patch_multiple(skeleton, size)
    if size is not None:  # before the build allocates the position embedding; the longer side bounds it
        check_image_fits(skeleton, size if isinstance(size, int) else max(size), device_memory_bytes(), "img_size")


def _raise_if_unsupported(model: nn.Module, architecture: str) -> None:
    reason = is_supported_vit(model)
    if reason is not None:
        raise VitpruneError(f"{architecture} is not a supported ViT ({reason}); {SUPPORTED_MODELS_HINT}")


def _build(full_name: str, *, pretrained: bool, **build_kwargs: int) -> nn.Module:
    try:
        return timm.create_model(full_name, pretrained=pretrained, **build_kwargs)
    except Exception as error:  # bad img_size/num_classes combinations surface here
        raise VitpruneError(f"cannot build {full_name}: {_first_line(str(error)) or type(error).__name__}") from error


def _build_pretrained(full_name: str, **build_kwargs: int) -> nn.Module:
    architecture = full_name.partition(".")[0]
    pretrained_cfg = timm.models.get_pretrained_cfg(full_name)
    if pretrained_cfg is None or not (pretrained_cfg.hf_hub_id or pretrained_cfg.url or pretrained_cfg.file):
        raise VitpruneError(
            f"{architecture} has no pretrained weights in timm; give a checkpoint (or use random weights)"
        )
    try:
        # timm fetches through the Hugging Face hub, so HF_HUB_OFFLINE and the HF cache apply.
        return timm.create_model(full_name, pretrained=True, **build_kwargs)
    except Exception as error:
        reason = _first_line(str(error)) or type(error).__name__
        raise VitpruneError(
            f"could not get pretrained weights for {full_name} (offline and not in the Hugging Face cache?): "
            f"{reason}; give a checkpoint (or use random weights)"
        ) from error


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Strictly load a checkpoint state_dict after timm's own conversion (pos-embed resampling etc.)."""
    model_name = type(model).__name__
    architecture = getattr(model, "pretrained_cfg", {}).get("architecture") or model_name
    try:
        converted = _checkpoint_filter_for(architecture)(dict(state_dict), model)
    except Exception as error:
        reason = _first_line(str(error)) or type(error).__name__
        raise VitpruneError(f"checkpoint {source} does not fit {architecture}: {reason}") from error
    mismatch = describe_state_dict_mismatch(converted, model)
    if mismatch:
        raise VitpruneError(f"checkpoint {source} does not fit {architecture}: {mismatch}")
    not_finite = next((key for key, value in converted.items()
                       if value.is_floating_point() and not torch.isfinite(value).all()), None)
    if not_finite is not None:
        raise VitpruneError(f"checkpoint {source} holds non-finite weights (NaN or infinity in {not_finite})")
    model.load_state_dict(converted, strict=True)


def _checkpoint_filter_for(architecture: str) -> Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]:
    # timm.models.deit re-exports the ViT filter and registers it with adapt_layer_scale=True
    # (maps the original DeiT-III 'gamma_1' keys to 'ls1.gamma'); mirror that choice.
    for module in (eva, beit, vision_transformer_relpos, naflexvit):
        if timm.models.is_model_in_modules(architecture, [module.__name__.rpartition(".")[2]]):
            return module.checkpoint_filter_fn
    is_deit = timm.models.is_model_in_modules(architecture, ["deit"])
    return partial(vision_transformer.checkpoint_filter_fn, adapt_layer_scale=is_deit)


def describe_state_dict_mismatch(state_dict: Mapping[str, Tensor], model: nn.Module) -> str:
    """One-line summary of missing/unexpected keys and shape mismatches; empty when the state_dict fits."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:MISMATCH_EXAMPLES])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:MISMATCH_EXAMPLES])})")
    if mismatched:
        examples = ", ".join(
            f"{key}: {list(state_dict[key].shape)} vs {list(expected[key].shape)}"
            for key in mismatched[:MISMATCH_EXAMPLES]
        )
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {examples})")
    head_note = _head_class_count_note(state_dict, expected)
    if head_note:
        parts.append(head_note)
    return ", ".join(parts)


def _head_class_count_note(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    key = "head.weight"
    if key not in state_dict or key not in expected:
        return ""
    checkpoint_classes, model_classes = state_dict[key].shape[0], expected[key].shape[0]
    if checkpoint_classes == model_classes:
        return ""
    return f"the checkpoint's head has {checkpoint_classes} classes but the model's has {model_classes}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""
