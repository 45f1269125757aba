"""The methods registry: each method is one module, and a new one needs nothing else.

A toy method defined here (keep the first patch tokens), with a parameter of a name no built-in
method uses (`share`), is registered the way a module in vitprune/methods/ registers, and then runs
through the plan grammar, the adapter, FLOPs, artifacts, the cascade, calibrate and the CLI without
any other change.
"""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import build_family
from PIL import Image

import vitprune
from vitprune import methods
from vitprune.calibrate import Shape, policy, shape_plan
from vitprune.calibrate.prepare import usable_methods
from vitprune.cascade import parse_stages
from vitprune.cli import run
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.methods import Method, Param
from vitprune.plan import Plan, make_plan


class KeepFirst(Method):
    name = "keepfirst"
    paper = "none: a test of the registry"
    params = (Param("share", float, "share of the patch tokens kept", high=1.0, low_open=True),)

    def default_layers(self, depth):
        return [depth // 2]

    def reduce(self, x, ctx, settings):
        kept = ctx.num_prefix + math.ceil(settings["share"] * (x.shape[1] - ctx.num_prefix))
        size = None if ctx.state.size is None else ctx.state.size[:, :kept]
        return x[:, :kept], replace(ctx.state, size=size)


@pytest.fixture
def keepfirst(monkeypatch):
    monkeypatch.setitem(methods._REGISTRY, "keepfirst", KeepFirst())


def test_the_registry_knows_the_methods():
    assert methods.names() == ("evit", "ats", "tome", "zerotprune", "ppt", "transform")
    assert policy.block_methods() == ("evit", "tome", "ppt")
    assert methods.get("evit").default_layers(12) == [3, 6, 9]
    assert methods.get("ats").default_layers(12) == list(range(3, 12))
    assert methods.get("tome").default_layers(12) == list(range(12))
    assert methods.get("zerotprune").default_layers(12) == [3, 6, 9] and methods.get("zerotprune").needs_attention
    with pytest.raises(VitpruneError, match="unknown method 'prune'; choose one of evit, ats, tome, zerotprune, ppt, transform"):
        methods.get("prune")


def test_a_new_method_is_one_module_and_one_registration(keepfirst, tmp_path):
    model = build_family("vit")
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        base = model(x)
    plan = make_plan("keepfirst:share=0.5", len(model.blocks))
    assert plan.layers == [6] and plan.describe() == "keepfirst:share=0.5@6" and plan.params()["share"] == 0.5
    assert make_plan("keepfirst", 12, share=0.5) == plan
    assert Plan.from_dict(plan.to_dict()) == plan
    vitprune.apply(model, plan)
    with torch.inference_mode():
        reduced = model(x)
    assert reduced.shape == base.shape and not torch.allclose(reduced, base)
    assert count_macs(model).tokens_per_block[7] == 1 + 18  # 36 patch tokens -> 18 after block 6
    vitprune.save(tmp_path / "artifact", model, {"model": "vit_tiny_patch16_224", "img_size": 96})
    assert vitprune.plan_of(vitprune.load(tmp_path / "artifact")) == plan
    stages = parse_stages("keepfirst:share=0.5@3,6;none", depth=12, base_size=96)
    assert stages[0].reductions[0].method == "keepfirst" and stages[0].layers == [3, 6]
    with pytest.raises(VitpruneError, match=r"keepfirst share must be a number in \(0, 1\], got 2.0") as caught:
        make_plan("keepfirst:share=2", 12)
    assert caught.value.param == "share"


def test_the_cli_takes_a_registered_method_with_its_own_parameter(keepfirst, capsys):
    args = ["apply", "vit_tiny", "--no-pretrained", "--img-size", "96", "--method", "keepfirst:share=0.5@3", "--json"]
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == "keepfirst:share=0.5@3+96px"
    assert run(["apply", "vit_tiny", "--no-pretrained", "--method", "keepfirst:shares=0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: shares is not a parameter of keepfirst (it takes share)"
    assert run(["methods", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)["methods"]}
    assert listed["keepfirst"]["params"][0]["name"] == "share" and listed["keepfirst"]["calibrate"] == "rate"


def test_calibrate_searches_a_registered_method(keepfirst):
    """Calibrate's default policy reads the new method's first parameter (a share in (0, 1])."""
    assert "keepfirst" in policy.block_methods()
    model = build_family("vit")
    assert "keepfirst" in usable_methods(model)
    shape = Shape(96, ("keepfirst",) * 12, (1.0,) * 12, "toy")
    plan = shape_plan(shape, 9, num_tokens=37, num_prefix=1)
    assert {red.method for red in plan.reductions} == {"keepfirst"} and plan.reductions[0].share == 0.75


def test_the_cascade_cli_runs_a_registered_method(keepfirst, tmp_path, capsys):
    data = tmp_path / "images"
    data.mkdir()
    for index in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(data / f"{index}.png")
    code = run(["cascade", "vit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--stages",
                "keepfirst:share=0.5+64px;112px", "--target-ratio", "0.5", "--no-frontier", "--holdout", "0.5",
                "--json"])
    assert code == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["stages"][0]["plan"] == "keepfirst:share=0.5@6+64px"


EVERY_PARAMETER = {  # each registered method with every parameter set away from its default
    "evit": "evit:keep=0.6,fuse=false@2,5",
    "ats": "ats:keep=0.5@3-11",
    "tome": "tome:r=3,protect=0.2@0-10",
    "zerotprune": "zerotprune:keep=0.6,similar=0.25,iters=5@3,6,9",
    "ppt": "ppt:r=4,threshold=0.0001@3,6,9",
    "transform": "transform:keep=0.5,neighbours=3,temperature=0.05@4,8",
}


def test_every_registered_method_is_in_the_round_trip():
    assert set(EVERY_PARAMETER) == set(methods.names())


@pytest.mark.parametrize("text", [*EVERY_PARAMETER.values(), "tome:r=2@0-5+evit:keep=0.7@6,9+head-only+80px"])
def test_a_plan_line_reads_back_as_the_same_plan(text):
    plan = make_plan(text, 12)
    assert plan.describe() == text and make_plan(plan.describe(), 12) == plan and hash(plan) == hash(make_plan(text, 12))
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.slow
def test_a_report_plan_line_pastes_back_as_method_with_the_same_gmacs(capsys):
    args = ["apply", "vit_tiny", "--no-pretrained", "--img-size", "96", "--json"]
    assert run([*args, "--method", "tome", "--r", "2", "--protect", "0.1", "--layers", "0-6"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["plan"] == "tome:r=2,protect=0.1@0-6+96px"
    assert run([*args, "--method", first["plan"] + "+evit:keep=0.7@8,10"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert run([*args, "--method", mixed["plan"]]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["plan"] == mixed["plan"] == "tome:r=2,protect=0.1@0-6+evit:keep=0.7@8,10+96px"
    assert again["gmacs"] == mixed["gmacs"] < first["gmacs"]
