"""A Hugging Face transformers ViT, DeiT or DINOv2 folder (config.json + model.safetensors) as the
equal timm model: the config mapped to timm's arguments, the weights renamed, and both models' outputs
compared on random input before the timm model is used."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitprune.errors import VitpruneError
from vitprune.io import file_sha256
from vitprune.models import create_model, load_checkpoint_state_dict, load_state_dict_into

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
TOLERANCE = 1e-4  # largest absolute difference of logits (or embeddings) allowed on random input
CHECK_BATCH = 2
EXTRA_HINT = "pip install 'vitprune[hf]'"


@dataclass(frozen=True)
class Family:
    timm_name: str  # the timm architecture, built with the folder's sizes
    prefix: str  # of the backbone's weights when the checkpoint has a head
    heads: tuple[tuple[str, str], ...]  # (transformers head, timm head)
    output: str  # what the transformers model's output is compared on: logits, first_token or pooler_output


FAMILIES = {
    "ViTForImageClassification": Family("vit_base_patch16_224", "vit.", (("classifier", "head"),), "logits"),
    "ViTModel": Family("vit_base_patch16_224", "", (), "first_token"),
    "DeiTForImageClassificationWithTeacher": Family(
        "deit_base_distilled_patch16_224", "deit.",
        (("cls_classifier", "head"), ("distillation_classifier", "head_dist")), "logits"),
    "Dinov2Model": Family("vit_small_patch14_dinov2", "", (), "pooler_output"),
}
RENAMES = (  # transformers names (without the backbone prefix) -> timm names
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(\w+)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_before|norm1)\.(\w+)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:layernorm_after|norm2)\.(\w+)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(\w+)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(\w+)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(\w+)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (r"layernorm\.(\w+)", r"norm.\1"),
)
QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(\w+)")
DROPPED = re.compile(r"embeddings\.mask_token|pooler\..*")  # masked-image pre-training and ViTModel's tanh pooler


def is_transformers_folder(source: str | Path) -> bool:
    """A folder with a transformers config.json (and no vitprune.json)."""
    path = Path(source)
    return path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / "vitprune.json").is_file()


def load_transformers(folder: str | Path, img_size: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The timm model equal to the transformers model in `folder`, and its create_model info."""
    folder = Path(folder)
    config = _read_config(folder)
    architecture = (config.get("architectures") or ["?"])[0]
    family = FAMILIES.get(architecture)
    if family is None:
        raise VitpruneError(f"{folder}: a transformers {architecture} is not supported; vitprune converts "
                            f"{', '.join(FAMILIES)}", param="model")
    weights = next((folder / name for name in WEIGHTS_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise VitpruneError(f"{folder} has no {' or '.join(WEIGHTS_FILES)}", param="model")
    state_dict = timm_state_dict(load_checkpoint_state_dict(weights), family, str(weights))
    head = state_dict.get("head.weight")
    model_args = {**timm_args(config, family), "num_classes": 0 if head is None else int(head.shape[0])}
    model, info = create_model(family.timm_name, pretrained=False, model_args=model_args)
    load_state_dict_into(model, state_dict, source=str(weights))
    check_equal_outputs(folder, architecture, family, model)
    if img_size is not None and img_size != info["img_size"]:
        model.set_input_size(img_size=img_size)
        info["img_size"] = img_size
    info.update(checkpoint=str(weights), checkpoint_sha256=file_sha256(weights))
    return model, info


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise VitpruneError(f"cannot read {folder / CONFIG_FILE}: {error}", param="model") from None
    if not isinstance(config, dict):
        raise VitpruneError(f"{folder / CONFIG_FILE} is not a transformers config", param="model")
    return config


def timm_args(config: dict[str, Any], family: Family) -> dict[str, Any]:
    """timm VisionTransformer arguments for a transformers config (refused where timm's block differs)."""
    for key, expected in (("hidden_act", "gelu"), ("num_channels", 3), ("use_swiglu_ffn", False)):
        if config.get(key, expected) != expected:
            raise VitpruneError(f"a transformers model with {key}={config[key]!r} has no timm equal "
                                f"(vitprune converts {key}={expected!r})", param="model")
    try:
        hidden = int(config["hidden_size"])
        args = {"img_size": int(config["image_size"]), "patch_size": int(config["patch_size"]), "embed_dim": hidden,
                "depth": int(config["num_hidden_layers"]), "num_heads": int(config["num_attention_heads"]),
                "qkv_bias": bool(config.get("qkv_bias", True)),
                "layer_norm_eps": float(config.get("layer_norm_eps", 1e-12))}
        if "layerscale_value" in config:  # DINOv2: layer scale, and the MLP width as a ratio
            args.update(mlp_ratio=float(config.get("mlp_ratio", 4)), init_values=float(config["layerscale_value"]))
        else:
            args["mlp_ratio"] = int(config["intermediate_size"]) / hidden
    except (KeyError, TypeError, ValueError) as error:
        raise VitpruneError(f"the transformers config lacks a usable {error}", param="model") from None
    return args


def timm_state_dict(state_dict: dict[str, Tensor], family: Family, source: str) -> dict[str, Tensor]:
    """transformers weight names -> timm's; query/key/value joined into timm's qkv."""
    converted: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    heads = dict(family.heads)
    for key, value in state_dict.items():
        head, _, param = key.partition(".")
        if head in heads:
            converted[f"{heads[head]}.{param}"] = value
            continue
        name = key[len(family.prefix):] if key.startswith(family.prefix) else key
        if DROPPED.fullmatch(name):
            continue
        match = QKV.fullmatch(name)
        if match:
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        converted[_rename(name, key, source)] = value
    for (layer, param), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise VitpruneError(f"{source}: layer {layer} lacks some of its query/key/value {param}", param="model")
        converted[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return converted


def _rename(name: str, key: str, source: str) -> str:
    for pattern, replacement in RENAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise VitpruneError(f"{source}: weight {key!r} has no counterpart in timm's ViT", param="model")


def check_equal_outputs(folder: Path, architecture: str, family: Family, model: nn.Module) -> None:
    """The transformers model and the converted one agree on random input, within TOLERANCE."""
    try:
        import transformers  # why: the optional hf extra, needed only to check a converted folder
    except ImportError:
        raise VitpruneError(f"converting a transformers folder needs the transformers package: {EXTRA_HINT}",
                            param="model") from None
    transformers.utils.logging.disable_progress_bar()  # a loading bar would break the one-line errors
    try:
        reference = getattr(transformers, architecture).from_pretrained(str(folder)).eval()
    except Exception as error:  # transformers raises many types for folders it cannot load
        raise VitpruneError(f"transformers cannot load {folder}: {str(error).splitlines()[0]}", param="model") from None
    size = model.patch_embed.img_size
    images = torch.randn(CHECK_BATCH, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        output = reference(pixel_values=images)
        expected = output.last_hidden_state[:, 0] if family.output == "first_token" else getattr(output, family.output)
        difference = (model.eval()(images) - expected).abs().max().item()
    if not difference <= TOLERANCE:
        raise VitpruneError(f"the timm model converted from {folder} differs from the transformers model by "
                            f"{difference:.2e} (more than {TOLERANCE:g}) on random input; not used", param="model")
