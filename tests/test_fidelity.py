"""Real weights, real images: the published off-the-shelf figures (docs/methods.md) hold.

vit_tiny_patch16_224 (augreg_in21k_ft_in1k) on the 1000 shared ImageNet images scores 82.8 top-1.
Off the shelf, EViT keep 0.7 @ 3,6,9 loses about 3 points and ToMe r=13 about 1.5; we accept
each within 1 point of that reading.
"""
import pytest
import torch
from conftest import SHARED_IMAGES, WEIGHTS, requires_shared

import vitprune
from vitprune.data import find_images, load_images, predict, transform_for
from vitprune.flops import count_macs
from vitprune.metrics import classification_metrics
from vitprune.models import create_model

pytestmark = requires_shared


@pytest.fixture(scope="module")
def vit_tiny_eval():
    model, _ = create_model("vit_tiny_patch16_224", checkpoint=WEIGHTS["vit_tiny_patch16_224"])
    images, labels = load_images(find_images(SHARED_IMAGES), transform_for(model), progress=False)
    base_logits = predict(model, images, progress=False)
    return model, images, labels, base_logits


def evaluate(model, images, labels, base_logits):
    return classification_metrics(predict(model, images, progress=False), labels, base_logits)


@pytest.mark.slow
def test_base_accuracy_matches_provenance(vit_tiny_eval):
    _, _, labels, base_logits = vit_tiny_eval
    metrics = classification_metrics(base_logits, labels, None)
    assert metrics["top1"] == pytest.approx(82.8, abs=0.15)
    assert metrics["top5"] == pytest.approx(96.4, abs=0.15)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs,gmacs,drop", [
    ({"method": "evit", "keep": 0.7}, 0.821, 3.0),
    ({"method": "tome", "r": 13}, 0.738, 1.5),  # 0.735 before its merges were counted (issue 25)
])
def test_off_the_shelf_accuracy_matches_the_papers_reading(vit_tiny_eval, kwargs, gmacs, drop):
    base, images, labels, base_logits = vit_tiny_eval
    import copy

    model = vitprune.apply(copy.deepcopy(base), **kwargs)
    metrics = evaluate(model, images, labels, base_logits)
    assert count_macs(model).gmacs == pytest.approx(gmacs, abs=0.002)
    assert 82.8 - metrics["top1"] == pytest.approx(drop, abs=1.0)
    assert metrics["agreement"] > 85


@pytest.mark.slow
def test_ats_reduces_compute_and_stays_close(vit_tiny_eval):
    base, images, labels, base_logits = vit_tiny_eval
    import copy

    model = vitprune.apply(copy.deepcopy(base), method="ats", keep=1.0)
    sample = images[:200]
    gmacs = torch.cat([count_macs(model, sample[i:i + 50]).gmacs_per_image for i in range(0, 200, 50)])
    assert gmacs.mean() < 0.85 and gmacs.std() > 0.01  # ~39% fewer GMACs, a different count per image
    metrics = evaluate(model, images, labels, base_logits)
    assert metrics["agreement"] > 85 and 82.8 - metrics["top1"] < 4.5


@pytest.mark.slow
def test_tome_protect_follows_the_base_model_more_closely_at_the_same_cost(vit_tiny_eval):
    # 1000 images: plain ToMe r=13 agrees with the base on 91.2%, protect 0.2 on 92.1%, top-1 80.9 -> 81.3
    base, images, labels, base_logits = vit_tiny_eval
    import copy

    plain = vitprune.apply(copy.deepcopy(base), method="tome", r=13)
    protected = vitprune.apply(copy.deepcopy(base), method="tome", r=13, protect=0.2)
    plain_metrics = evaluate(plain, images, labels, base_logits)
    protected_metrics = evaluate(protected, images, labels, base_logits)
    assert protected_metrics["agreement"] > plain_metrics["agreement"] + 0.5
    assert protected_metrics["top1"] >= plain_metrics["top1"]
    assert count_macs(protected).gmacs == pytest.approx(count_macs(plain).gmacs, rel=0.002)  # + the class row only
