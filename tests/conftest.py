from pathlib import Path

import pytest
import timm
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED_DATA / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED_DATA / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
SHARED_IMAGES = SHARED_DATA / "images" / "imagenet-sample-images"

requires_shared = pytest.mark.skipif(
    not all(p.exists() for p in [*WEIGHTS.values(), SHARED_IMAGES]), reason="../shared/data not present"
)

# Small instances of every supported family: (timm name, build kwargs). img_size keeps them cheap.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 96}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96}),
    "deit3": ("deit3_small_patch16_224", {"img_size": 64, "depth": 4}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4, "num_classes": 10}),
    "gap_no_cls": ("vit_wee_patch16_reg1_gap_256", {"img_size": 96, "depth": 4, "num_classes": 10}),
}


def build_family(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return build_family("vit")
