"""The methods registry: each method is one module, and a new one needs nothing else.

A toy method defined here (keep the first patch tokens) is registered the way a module in
vitprune/methods/ registers, and then runs through plans, the adapter, FLOPs, artifacts, the
cascade grammar and the CLI without any other change.
"""
import math
from dataclasses import replace

import pytest
import torch
from conftest import build_family

import vitprune
from vitprune import methods
from vitprune.cascade import parse_stages
from vitprune.cli import run
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.methods import Method, Param
from vitprune.plan import Plan, make_plan


class KeepFirst(Method):
    name = "keepfirst"
    params = (Param("keep", float, "share of the patch tokens kept", check=lambda value: 0 < value <= 1,
                    rule="in (0, 1]"),)
    stage_param = "keep"

    def describe(self, settings):
        return f"keepfirst keep={settings['keep']:g}"

    def default_layers(self, depth):
        return [depth // 2]

    def reduce(self, x, ctx, settings):
        kept = ctx.num_prefix + math.ceil(settings["keep"] * (x.shape[1] - ctx.num_prefix))
        size = None if ctx.state.size is None else ctx.state.size[:, :kept]
        return x[:, :kept], replace(ctx.state, size=size)


@pytest.fixture
def keepfirst(monkeypatch):
    monkeypatch.setitem(methods._REGISTRY, "keepfirst", KeepFirst())


def test_the_registry_knows_the_methods():
    assert methods.names() == ("evit", "ats", "tome", "zerotprune", "ppt", "transform")
    assert methods.searchable() == ("evit", "tome", "ppt")
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
    plan = make_plan("keepfirst", len(model.blocks), keep=0.5)
    assert plan.layers == [6] and plan.describe() == "keepfirst keep=0.5 @ 6" and plan.params()["keep"] == 0.5
    assert Plan.from_dict(plan.to_dict()) == plan
    vitprune.apply(model, plan)
    with torch.inference_mode():
        reduced = model(x)
    assert reduced.shape == base.shape and not torch.allclose(reduced, base)
    assert count_macs(model).tokens_per_block[7] == 1 + 18  # 36 patch tokens -> 18 after block 6
    vitprune.save(tmp_path / "artifact", model, {"model": "vit_tiny_patch16_224", "img_size": 96})
    assert vitprune.plan_of(vitprune.load(tmp_path / "artifact")) == plan
    stages = parse_stages("keepfirst:0.5,none", depth=12, base_size=96)
    assert stages[0].reductions[0].method == "keepfirst"
    with pytest.raises(VitpruneError, match=r"keepfirst keep must be in \(0, 1\]"):
        make_plan("keepfirst", 12, keep=2.0)


def test_the_cli_takes_a_registered_method(keepfirst, capsys):
    args = ["apply", "vit_tiny", "--no-pretrained", "--img-size", "96", "--method", "keepfirst", "--keep", "0.5"]
    assert run(args) == 0
    assert "keepfirst keep=0.5" in capsys.readouterr().err
