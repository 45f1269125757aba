"""Model name resolution, architecture checks and checkpoint loading."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from vitprune.errors import VitpruneError
from vitprune.io import file_sha256
from vitprune.models import (
    create_model,
    has_class_token,
    is_supported_vit,
    load_checkpoint_state_dict,
    num_prefix_tokens,
    resolve_model_name,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"
DEIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "deit_tiny_patch16_224.lnfixed.pth"
TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(TINY, pretrained=False).state_dict()


@pytest.fixture(scope="module")
def sample_input() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_reference_logits(tiny_state_dict: dict, sample_input: torch.Tensor) -> torch.Tensor:
    reference = timm.create_model(TINY, pretrained=False).eval()
    reference.load_state_dict(tiny_state_dict)
    return _logits(reference, sample_input)


def _zero_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A correctly shaped state_dict without paying for a real random init."""
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False)
    return {key: torch.zeros(value.shape) for key, value in skeleton.state_dict().items()}


def _logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("deit_small", "deit_small_patch16_224"),
        ("vit_tiny", "vit_tiny_patch16_224"),
        ("deit3_small", "deit3_small_patch16_224"),
        ("deit_tiny_distilled", "deit_tiny_distilled_patch16_224"),
        ("vit_tiny_patch16_224", "vit_tiny_patch16_224"),
        ("vit_tiny_patch16_224.augreg_in21k_ft_in1k", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
        ("vit_tiny.augreg_in21k", "vit_tiny_patch16_224.augreg_in21k"),
        ("vit_base_patch16_reg4", "vit_base_patch16_reg4_gap_256"),
    ],
)
def test_resolve_model_name(name: str, expected: str) -> None:
    assert resolve_model_name(name) == expected


def test_unknown_model_suggests_close_names() -> None:
    expected = r"^unknown model 'vit_tinyy_patch16_224'; did you mean: .*vit_tiny_patch16_224.*\?$"
    with pytest.raises(VitpruneError, match=expected):
        resolve_model_name("vit_tinyy_patch16_224")
    with pytest.raises(VitpruneError, match="unknown model 'zzqqxx'"):
        resolve_model_name("zzqqxx")


def test_unknown_pretrained_tag_lists_tags() -> None:
    expected = "unknown pretrained tag 'nosuch' for vit_tiny_patch16_224; available tags: .*augreg_in21k_ft_in1k"
    with pytest.raises(VitpruneError, match=expected):
        resolve_model_name("vit_tiny.nosuch")


@pytest.mark.parametrize(("name", "found"), [("resnet18", "ResNet"), ("convnext_atto", "ConvNeXt")])
def test_non_vit_models_are_refused(name: str, found: str) -> None:
    with pytest.raises(VitpruneError) as raised:
        create_model(name, pretrained=False)
    message = str(raised.value)
    assert message.startswith(f"{name} is not a supported ViT (found {found}); vitprune supports")
    assert "\n" not in message


def test_vit_with_non_standard_blocks_is_refused() -> None:
    with pytest.raises(VitpruneError, match=r"found VisionTransformer with ParallelThingsBlock \(attention and MLP in parallel"):
        create_model("vit_small_patch16_18x2_224", pretrained=False)


def test_unsupported_model_is_refused_before_pretrained_download() -> None:
    # Would need the network if the check came after fetching weights.
    with pytest.raises(VitpruneError, match="not a supported ViT"):
        create_model("resnet18", pretrained=True)


def test_random_model_info_and_token_helpers() -> None:
    model, info = create_model("vit_tiny", pretrained=False)
    assert not model.training
    assert is_supported_vit(model) is None
    assert info == {"model": TINY, "tag": None, "checkpoint": None, "checkpoint_sha256": None, "img_size": 224}
    assert num_prefix_tokens(model) == 1 and has_class_token(model)

    distilled, _ = create_model("deit_tiny_distilled", pretrained=False)
    assert num_prefix_tokens(distilled) == 2 and is_supported_vit(distilled) is None

    with torch.device("meta"):  # shape-only build; a real 86M-parameter init would be slow
        registers = timm.create_model("vit_base_patch16_reg4_gap_256")
    assert num_prefix_tokens(registers) == 4 and not has_class_token(registers)


def _save_raw_pth(path: Path, state_dict: dict) -> None:
    torch.save(state_dict, path)


def _save_under_model(path: Path, state_dict: dict) -> None:
    torch.save({"model": state_dict, "epoch": 3}, path)


def _save_ddp_under_state_dict(path: Path, state_dict: dict) -> None:
    torch.save({"state_dict": {f"module.{key}": value for key, value in state_dict.items()}}, path)


def _save_safetensors(path: Path, state_dict: dict) -> None:
    safetensors.torch.save_file({key: value.contiguous() for key, value in state_dict.items()}, path)


@pytest.mark.parametrize(
    ("file_name", "save"),
    [
        ("raw.pth", _save_raw_pth),
        ("wrapped.pth", _save_under_model),
        ("ddp.pt", _save_ddp_under_state_dict),
        ("weights.safetensors", _save_safetensors),
        ("pytorch_model.bin", _save_raw_pth),
        ("last.ckpt", _save_under_model),
    ],
)
def test_checkpoint_round_trip(
    tmp_path: Path,
    tiny_state_dict: dict,
    sample_input: torch.Tensor,
    tiny_reference_logits: torch.Tensor,
    file_name: str,
    save,
) -> None:
    path = tmp_path / file_name
    save(path, tiny_state_dict)

    model, info = create_model(TINY, checkpoint=path)

    assert torch.equal(_logits(model, sample_input), tiny_reference_logits)
    assert info["checkpoint"] == str(path)
    assert info["checkpoint_sha256"] == file_sha256(path) and len(info["checkpoint_sha256"]) == 64
    assert set(load_checkpoint_state_dict(path)) == set(tiny_state_dict)


def test_corrupt_checkpoint(tmp_path: Path) -> None:
    for name in ("corrupt.pth", "corrupt.safetensors"):
        path = tmp_path / name
        path.write_bytes(os.urandom(4096))
        with pytest.raises(VitpruneError, match=f"^cannot read checkpoint {path}: ") as raised:
            create_model(TINY, checkpoint=path)
        assert "\n" not in str(raised.value)


def test_empty_and_non_state_dict_checkpoints(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(VitpruneError, match="empty or truncated"):
        load_checkpoint_state_dict(empty)
    not_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_state_dict)
    with pytest.raises(VitpruneError, match="holds a list, not a state_dict"):
        load_checkpoint_state_dict(not_state_dict)
    unknown_type = tmp_path / "weights.npz"
    unknown_type.write_bytes(b"x")
    with pytest.raises(VitpruneError, match="unknown file type '.npz'"):
        load_checkpoint_state_dict(unknown_type)


def test_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(VitpruneError, match=f"^checkpoint not found: {path}$"):
        create_model(TINY, checkpoint=path)


def test_mismatched_checkpoint_names_shape_mismatches(tmp_path: Path) -> None:
    path = tmp_path / "vit_small.pth"
    torch.save(_zero_state_dict("vit_small_patch16_224"), path)
    with pytest.raises(VitpruneError) as raised:
        create_model(TINY, checkpoint=path)
    message = str(raised.value)
    assert message.startswith(f"checkpoint {path} does not fit {TINY}: ")
    assert "shape mismatches (e.g. cls_token: [1, 1, 384] vs [1, 1, 192]" in message
    assert "\n" not in message


def test_head_class_count_mismatch_is_named(tmp_path: Path, tiny_state_dict: dict) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, path)
    expected = r"head.weight: \[1000, 192\] vs \[10, 192\].*head has 1000 classes but the model's has 10"
    with pytest.raises(VitpruneError, match=expected):
        create_model(TINY, checkpoint=path, num_classes=10)


def test_missing_and_unexpected_keys_are_counted(tmp_path: Path, tiny_state_dict: dict) -> None:
    state_dict = dict(tiny_state_dict)
    del state_dict["norm.weight"]
    state_dict["extra.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    expected = r"1 missing keys \(e.g. norm.weight\), 1 unexpected keys \(e.g. extra.weight\)"
    with pytest.raises(VitpruneError, match=expected):
        create_model(TINY, checkpoint=path)


def test_checkpoint_at_224_loads_into_smaller_model(tmp_path: Path, tiny_state_dict: dict) -> None:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_state_dict, path)
    model, info = create_model(TINY, checkpoint=path, img_size=160)
    assert info["img_size"] == 160
    assert model.pos_embed.shape == (1, 1 + 10 * 10, 192)
    assert torch.equal(model.cls_token, tiny_state_dict["cls_token"])
    assert _logits(model, torch.randn(1, 3, 160, 160)).shape == (1, 1000)


def test_a_non_square_model_saves_and_loads_at_its_own_size(tmp_path: Path) -> None:
    import vitprune
    model, info = create_model(TINY, pretrained=False, img_size=(64, 96), model_args={"depth": 2})
    assert info["img_size"] == [64, 96] and create_model(TINY, pretrained=False, img_size=[64, 64])[1]["img_size"] == 64
    vitprune.apply(model, method="tome", r=4)
    vitprune.save(tmp_path / "art", model, info)
    loaded = vitprune.load(tmp_path / "art")
    x = torch.randn(2, 3, 64, 96)
    assert torch.equal(_logits(loaded, x), _logits(model, x))


@pytest.mark.parametrize("size", [(64, 0), (64,), "64x96", (64, 96.5), (60, 96)])
def test_a_bad_size_pair_is_refused_naming_img_size(size: object) -> None:
    with pytest.raises(VitpruneError, match="img_size") as error:
        create_model(TINY, pretrained=False, img_size=size)
    assert error.value.param == "img_size"


@pytest.mark.parametrize(("name", "weights"), [(TINY, VIT_TINY_WEIGHTS), ("deit_tiny", DEIT_TINY_WEIGHTS)])
def test_shared_real_weights_load_strictly(name: str, weights: Path) -> None:
    if not weights.is_file():
        pytest.skip(f"shared weights not found: {weights}")
    model, info = create_model(name, checkpoint=weights)
    assert info["checkpoint_sha256"] == file_sha256(weights)
    for key, value in load_checkpoint_state_dict(weights).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_pretrained_offline_fails_fast_and_cleanly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so patch the constant as well as the environment.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    started = time.monotonic()
    with pytest.raises(VitpruneError) as raised:
        create_model(TINY, pretrained=True)
    message = str(raised.value)
    assert message.startswith(
        f"could not get pretrained weights for {TINY} (offline and not in the Hugging Face cache?): "
    )
    assert message.endswith("; give a checkpoint (or use random weights)")
    assert "\n" not in message
    assert time.monotonic() - started < 10


def test_model_without_pretrained_weights() -> None:
    with pytest.raises(VitpruneError, match="has no pretrained weights in timm"):
        create_model("vit_base_patch16_reg4_gap_256", pretrained=True)


def test_bad_build_arguments() -> None:
    with pytest.raises(VitpruneError, match="img_size must be a positive integer"):
        create_model(TINY, pretrained=False, img_size=0)
    with pytest.raises(VitpruneError, match="num_classes must be a non-negative integer"):
        create_model(TINY, pretrained=False, num_classes=-1)
