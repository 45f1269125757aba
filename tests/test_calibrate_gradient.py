"""`calibrate --search gradient`: the soft forward is the reduced model's, the straight-through
estimator trains only the rate logits, the GMACs move to the budget, and the command writes a plan."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vitprune import calibrate
from vitprune.budget import Budget
from vitprune.calibrate import gradient
from vitprune.cli import run
from vitprune.flops import count_macs
from vitprune.patch import apply_plan, tokens_before
from vitprune.plan import read_plan_file

TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "64"]
FAST = ["--img-sizes", "64", "--search-images", "4", "--bench-repeats", "1", "--bench-batch", "2", "--threads", "1"]


def _setup(name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=4, **kwargs).eval()
    setup = calibrate.prepare(model, [64], True, Budget("ratio", 0.6))
    setup.geometry.protect = 0.2 if setup.geometry.head_only else 0.0
    return setup


def _fixed_rates(setup):
    """Rates whose hard choice mixes the methods and counts block by block."""
    block_methods = gradient.soft_methods(setup.block_methods, setup.models[64])
    rates = gradient.make_rates(setup.geometry, block_methods, 3.0)
    with torch.no_grad():
        rates.counts.fill_(-50.0)
        rates.gates.zero_()
        for layer in range(rates.blocks):
            rates.counts[layer, (3 * layer + 2) % len(rates.grid)] = 10.0
            rates.gates[layer, layer % len(block_methods)] = 5.0
    return rates


@pytest.mark.parametrize("name,kwargs", [("vit_tiny_patch16_224", {}),
                                         ("vit_wee_patch16_reg1_gap_256", {"num_classes": 10})])
def test_hard_soft_forward_and_macs_are_the_reduced_models(name, kwargs):
    setup = _setup(name, **kwargs)
    geometry, model = setup.geometry, setup.models[64]
    rates = _fixed_rates(setup)
    shape = gradient.learned_shape(rates, geometry)
    wants = [w for w in shape.weights if w > 0]
    assert set(shape.methods) - {None} == set(rates.methods) and len(set(wants)) > 1
    scale = max(float(rates.grid[(rates.grid - rates.counts[layer].softmax(0) @ rates.grid).abs().argmin()])
                for layer in range(rates.blocks))
    plan = calibrate.shape_plan(shape, scale, geometry.tokens_at[64], geometry.num_prefix, geometry.head_only,
                                geometry.protect)
    reduced = apply_plan(copy.deepcopy(model), plan)
    path = gradient.walk(rates, model, geometry)
    assert path.macs.sum().item() / 1e9 == pytest.approx(count_macs(reduced).gmacs, rel=1e-9)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        soft = gradient.soft_logits(model, tokens_before(model, images, 0), path, geometry.num_prefix)
        torch.testing.assert_close(soft, reduced(images), atol=1e-4, rtol=1e-4)


def test_straight_through_gives_gradients_to_the_rates_and_none_to_the_weights():
    setup = _setup("vit_tiny_patch16_224")
    model = copy.deepcopy(setup.models[64]).requires_grad_(False)
    rates = _fixed_rates(setup)
    images = torch.randn(4, 3, 64, 64)
    tokens0 = tokens_before(model, images, 0)
    base = model(images)
    path = gradient.walk(rates, model, setup.geometry)
    loss = gradient.fit_loss(gradient.soft_logits(model, tokens0, path, 1), base, None) + path.macs.sum() / 1e9
    loss.backward()
    assert rates.counts.grad.abs().sum() > 0 and rates.gates.grad.abs().sum() > 0
    assert all(rates.counts.grad[layer].abs().sum() > 0 for layer in range(rates.blocks))
    assert all(param.grad is None for param in model.parameters())
    before = [param.clone() for param in setup.models[64].parameters()]
    gradient.learn_rates(setup.models[64], tokens0, base, None, setup.geometry, gradient.soft_methods(setup.block_methods, setup.models[64]), 0.02, 2.0,
                         steps=2)
    assert all(torch.equal(a, b) and b.grad is None for a, b in zip(before, setup.models[64].parameters(), strict=True))


@pytest.mark.slow
def test_a_few_steps_move_the_gmacs_to_the_budget():
    setup = _setup("vit_tiny_patch16_224")
    model, geometry = setup.models[64], setup.geometry
    images = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        base = model(images)
    target = setup.target
    learned = gradient.learn_rates(model, tokens_before(model, images, 0), base, None, geometry,
                                   gradient.soft_methods(setup.block_methods, model), target, 0.0, steps=30)
    first, last = learned.trace[0]["gmacs"], learned.trace[-1]["gmacs"]
    assert first > 1.1 * target and target <= last < first


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(8):
        Image.fromarray((rng.random((48, 48, 3)) * 255).astype("uint8")).save(folder / f"image{index:02d}.png")
    return folder


@pytest.mark.slow
def test_calibrate_search_gradient_writes_a_valid_plan(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(["calibrate", *TINY, "--data", str(image_dir), "--target-ratio", "0.6", *FAST, "--search", "gradient",
                "--gradient-steps", "3", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    cal = report["calibration"]
    assert cal["search"] == "gradient" and cal["gradient_trace"] and cal["sensitivity"] == []
    assert report["gmacs"] <= 0.6 * report["gmacs_base"] + 1e-9
    plan, _ = read_plan_file(out / "vitprune.json")
    assert plan.reductions and plan.notes["calibrated"]["budget"]["kind"] == "ratio"
    capsys.readouterr()
    code = run(["calibrate", *TINY, "--data", str(image_dir), "--target-ratio", "0.6", "--search", "genetic",
                "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--search" in err[0] and not (tmp_path / "bad").exists()
