"""Exact MACs: the one rule (vitprune.flops) against torch's own FlopCounterMode, to 1e-6."""
import pytest
import timm
import torch
from conftest import BLOCK_FAMILIES, build_family
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitprune
from vitprune.flops import count_macs, model_input
from vitprune.patch import has_position_bias


def torch_counted_gmacs(model, x):
    # The math SDPA backend decomposes into matmuls FlopCounterMode counts (the fused CPU kernel is not counted).
    # Parameters that require grad trip its module tracker under inference mode (attention pooling).
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    for param, flag in zip(model.parameters(), flags, strict=True):
        param.requires_grad_(flag)
    return counter.get_total_flops() / 2 / 1e9 / x.shape[0]


def images_for(model, batch=2):
    torch.manual_seed(1)
    return torch.randn_like(model_input(model, batch))


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "registers"])
@pytest.mark.parametrize("kwargs", [None, {"method": "evit", "keep": 0.7}, {"method": "tome", "r": 5}, {"method": "tome", "r": 5, "protect": 0.2},
                                    {"method": "tome", "r": 5, "head_only": True}, {"method": "ats", "keep": 0.6, "layers": [1], "head_only": True},
                                    {"method": "evit", "keep": 0.5, "fuse": False}])
def test_counted_macs_match_torch_flop_counter(family, kwargs):
    model = build_family(family)
    if kwargs:
        vitprune.apply(model, **kwargs)
    x = images_for(model, 1)  # per image: ATS's count differs per image
    assert count_macs(model, x).gmacs == pytest.approx(torch_counted_gmacs(model, x), rel=1e-6)


@pytest.mark.parametrize("family", sorted(BLOCK_FAMILIES))
def test_every_block_kind_counts_exactly(family):
    # GLU / SwiGLU / GeGLU MLPs, attention pooling, hybrid and conv stems, post-norm blocks, q/k norm with
    # layer scale, non-square inputs: base and reduced, with images and without (the model's own size).
    # Relative position biases (BEiT, RelPos: pruning only) with their bias MLPs, per block or shared: the MLP
    # runs once per forward pass, so FlopCounterMode on a batch counts it once: batch 1 is one image's count.
    model = build_family(family)
    x = images_for(model, 1)
    assert count_macs(model, x).gmacs == pytest.approx(torch_counted_gmacs(model, x), rel=1e-6)
    pruning_only = has_position_bias(model)
    vitprune.apply(model, **({"method": "ats", "keep": 0.5, "layers": [1, 2]} if pruning_only else
                             {"method": "tome", "r": 3}))
    counted = count_macs(model, x if pruning_only else None)  # ATS's counts need the image
    assert counted.gmacs == pytest.approx(torch_counted_gmacs(model, x), rel=1e-6)
    vitprune.apply(model, method="evit", keep=0.6, layers=[1], fuse=not pruning_only)
    assert count_macs(model, x).gmacs == pytest.approx(torch_counted_gmacs(model, x), rel=1e-6)


@pytest.mark.parametrize("kwargs", [{"method": "tome", "r": 4}, {"method": "evit", "keep": 0.7},
                                    {"method": "ats", "keep": 0.7}])
@pytest.mark.parametrize("extra", [{}, {"class_token": False, "global_pool": "avg"}], ids=["cls", "gap"])
def test_a_dynamic_size_model_runs_and_counts_exactly_at_every_input_size(kwargs, extra):
    # timm's dynamic_img_size: the position embedding is resampled to each input's own (also non-square) grid
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=3, num_classes=10,
                              dynamic_img_size=True, **extra).eval()
    vitprune.apply(model, **kwargs)
    torch.manual_seed(1)
    for size in [(64, 64), (48, 80), (96, 32)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-5, atol=1e-5)
        assert count_macs(model, x[:1]).gmacs == pytest.approx(torch_counted_gmacs(model, x[:1]), rel=1e-6)


def test_ats_macs_are_per_image():
    model = vitprune.apply(build_family("vit"), method="ats", keep=0.5, layers=[0, 2, 4])
    x = torch.randn(4, 3, 96, 96)
    report = count_macs(model, x)
    per_image = [count_macs(model, x[i:i + 1]).gmacs for i in range(4)]
    torch.testing.assert_close(report.gmacs_per_image, torch.tensor(per_image, dtype=torch.float64), rtol=1e-9, atol=0)
    assert report.gmacs == pytest.approx(sum(per_image) / 4)
    assert per_image[0] == pytest.approx(torch_counted_gmacs(model, x[:1]), rel=1e-6)


def test_vit_tiny_figures_from_the_papers_formula():
    # docs/methods.md: 12 n d^2 + 2 n^2 d per block; ViT-Ti/16 at 224 is 1.26 GMACs, EViT 0.7 @ 3,6,9 is 0.82
    # (with the fused tokens' sums), ToMe r=13 0.738 with its merges (0.735 without them, before issue 25).
    model = build_family("vit")
    model.set_input_size(img_size=224)
    assert count_macs(model).gmacs == pytest.approx(1.2537, abs=1e-3)
    vitprune.apply(model, method="evit", keep=0.7)
    assert count_macs(model).gmacs == pytest.approx(0.8208, abs=1e-3)
    vitprune.apply(model, method="tome", r=13)
    assert count_macs(model).gmacs == pytest.approx(0.7379, abs=1e-4)


def test_count_macs_refuses_what_is_not_a_vit():
    with pytest.raises(vitprune.VitpruneError, match="model must be a supported timm ViT"):
        count_macs(torch.nn.Linear(3, 3))
