"""Exact MACs: the per-block token accounting against torch's own FlopCounterMode."""
import pytest
import torch
from conftest import build_family
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitprune
from vitprune.flops import count_macs


def torch_counted_gmacs(model, x):
    # The math SDPA backend decomposes into matmuls FlopCounterMode counts (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 2 / 1e9 / x.shape[0]


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "registers"])
@pytest.mark.parametrize("kwargs", [None, {"method": "evit", "keep": 0.7}, {"method": "tome", "r": 5}, {"method": "tome", "r": 5, "protect": 0.2},
                                    {"method": "tome", "r": 5, "head_only": True}, {"method": "ats", "keep": 0.6, "layers": [1], "head_only": True},
                                    {"method": "evit", "keep": 0.5, "fuse": False}])
def test_counted_macs_match_torch_flop_counter(family, kwargs):
    model = build_family(family)
    if kwargs:
        vitprune.apply(model, **kwargs)
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    ours = count_macs(model, x).gmacs
    assert ours == pytest.approx(torch_counted_gmacs(model, x), rel=0.02)


def test_ats_macs_are_per_image():
    model = vitprune.apply(build_family("vit"), method="ats", keep=0.5, layers=[0, 2, 4])
    x = torch.randn(4, 3, 96, 96)
    report = count_macs(model, x)
    per_image = [count_macs(model, x[i:i + 1]).gmacs for i in range(4)]
    torch.testing.assert_close(report.gmacs_per_image, torch.tensor(per_image, dtype=torch.float64), rtol=1e-9, atol=0)
    assert report.gmacs == pytest.approx(sum(per_image) / 4)


def test_vit_tiny_figures_from_the_papers_formula():
    # docs/methods.md: 12 n d^2 + 2 n^2 d per block; ViT-Ti/16 at 224 is 1.26 GMACs, EViT 0.7 @ 3,6,9 is 0.82.
    model = build_family("vit")
    model.set_input_size(img_size=224)
    assert count_macs(model).gmacs == pytest.approx(1.2537, abs=1e-3)
    vitprune.apply(model, method="evit", keep=0.7)
    assert count_macs(model).gmacs == pytest.approx(0.8208, abs=1e-3)
    vitprune.apply(model, method="tome", r=13)
    assert count_macs(model).gmacs == pytest.approx(0.7345, abs=1e-3)
