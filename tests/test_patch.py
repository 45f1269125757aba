"""The timm adapter on every supported family: shapes, identities, batch consistency, refusals."""
import copy

import pytest
import torch
from conftest import FAMILIES, build_family

import vitprune
from vitprune.errors import VitpruneError
from vitprune.patch import logits_from, plan_of, record_tokens, remove_plan, tokens_before
from vitprune.plan import Plan, Reduction, make_plan
from vitprune.reducers.common import _TABLES

CLS_FAMILIES = [f for f in FAMILIES if f != "gap_no_cls"]


def images_for(model, batch=3, seed=0):
    size = model.patch_embed.img_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(model, x):
    with torch.inference_mode():
        return model(x)


@pytest.mark.parametrize("family", CLS_FAMILIES)
@pytest.mark.parametrize("method,kwargs", [("evit", {"keep": 0.5}), ("ats", {"keep": 0.6}), ("tome", {"r": 3})])
def test_every_family_runs_every_method_and_reduces_tokens(family, method, kwargs):
    model = build_family(family)
    x = images_for(model)
    base = run(model, x)
    vitprune.apply(model, method=method, **kwargs)
    out = run(model, x)
    assert out.shape == base.shape and torch.isfinite(out).all()
    with torch.inference_mode(), record_tokens(model) as trace:
        model(x)
    tokens_in = [entry["n_in"].float().mean().item() for entry in trace]
    assert tokens_in[-1] < tokens_in[0]
    assert isinstance(model, type(build_family(family)))  # still its timm class


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_prefix_tokens_are_never_reduced(family):
    model = build_family(family)
    prefix = model.num_prefix_tokens
    x = images_for(model, batch=2)
    for method, kwargs in [("evit", {"keep": 0.3}), ("tome", {"r": model.patch_embed.num_patches}), ("ats", {"keep": 0.2})]:
        vitprune.apply(model, method=method, **kwargs)
        with torch.inference_mode(), record_tokens(model) as trace:
            model(x)
        assert min(entry["n_out"].min().item() for entry in trace) > prefix


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "registers"])
def test_keep_everything_is_the_unreduced_model(family):
    model = build_family(family)
    x = images_for(model)
    base = run(model, x)
    vitprune.apply(model, method="evit", keep=1.0, fuse=False, layers=[1, 2])
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=1e-5)
    vitprune.apply(model, method="tome", r=0)
    torch.testing.assert_close(run(model, x), base, atol=1e-5, rtol=1e-5)
    remove_plan(model)
    assert plan_of(model) is None
    torch.testing.assert_close(run(model, x), base)


@pytest.mark.parametrize("method,kwargs", [("ats", {"keep": 0.5}), ("tome", {"r": 4}), ("evit", {"keep": 0.5})])
def test_batched_equals_one_image_at_a_time(method, kwargs):
    # ATS pads each batch to its largest kept count: the padding must not change any image's logits.
    model = vitprune.apply(build_family("vit"), method=method, **kwargs)
    x = images_for(model, batch=4)
    batched = run(model, x)
    single = torch.cat([run(model, x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_ats_keeps_a_different_count_per_image():
    model = build_family("vit")
    # Make the CLS attention peaked for one image and flat for another by scaling its input.
    vitprune.apply(model, method="ats", keep=1.0, layers=[0])
    x = images_for(model, batch=6)
    with torch.inference_mode(), record_tokens(model) as trace:
        model(x)
    assert len(set(trace[0]["n_out"].tolist())) > 1


def test_gap_model_runs_every_method_but_protect():
    # without a class token EViT and ATS rank tokens by the mean attention they receive (tests/test_embeddings.py)
    model = build_family("gap_no_cls")
    x = images_for(model)
    for kwargs in ({"method": "evit", "keep": 0.7}, {"method": "ats", "keep": 0.7}, {"method": "tome", "r": 4}):
        vitprune.apply(model, **kwargs)
        assert torch.isfinite(run(model, x)).all()
    with pytest.raises(VitpruneError, match="no class token"):
        vitprune.apply(model, method="tome", r=4, protect=0.2)


def test_mixed_plan_tome_then_evit_then_ats():
    model = build_family("vit")
    plan = Plan(reductions=(Reduction(0, "tome", r=2), Reduction(1, "tome", r=2), Reduction(4, "evit", keep=0.7),
                            Reduction(8, "ats", keep=0.5), Reduction(9, "ats", keep=0.5)))
    vitprune.apply(model, plan)
    x = images_for(model)
    assert torch.isfinite(run(model, x)).all()


@pytest.mark.parametrize("reductions,message", [
    ([(12, "evit", {"keep": 0.5})], "out of range"),
    ([(3, "evit", {"keep": 1.5})], r"evit keep must be a number in \(0, 1\], got 1.5"),
    ([(3, "evit", {"keep": 0.0})], "evit keep must be a number in"),
    ([(3, "evit", {})], "evit needs keep"),
    ([(3, "tome", {"r": -1})], r"tome r must be a whole number in \[0, 1000000\]"),
    ([(3, "tome", {"r": 2.5})], r"tome r must be a whole number in \[0, 1000000\]"),
    ([(3, "tome", {"r": 10**23})], r"tome r must be a whole number in \[0, 1000000\], got 1000"),
    ([(3, "ats", {"keep": 0.5}), (5, "tome", {"r": 2})], "ats must be the last"),
    ([(3, "magic", {"keep": 0.5})], "unknown method"),
    ([(3, "tome", {"r": 2, "protect": -0.1})], r"tome protect must be a number in \[0, 1000\]"),
    ([(3, "tome", {"r": 2, "protect": float("nan")})], r"tome protect must be a number in \[0, 1000\]"),
    ([(3, "ats", {"keep": 1e12})], r"ats keep must be a ratio in \(0, 1\] or a whole token count in \[2, 1000000\]"),
    ([(3, "ats", {"keep": float("inf")})], "ats keep must be"),
    ([(3, "tome", {"r": 38})], r"tome r must be at most 37 \(the tokens entering this model\), got 38"),
    ([(3, "ats", {"keep": 38})], r"ats keep must be at most 37"),
])
def test_bad_plans_are_refused(reductions, message):
    plan = Plan(reductions=tuple(Reduction(layer, method, **settings) for layer, method, settings in reductions))
    with pytest.raises(VitpruneError, match=message):
        vitprune.apply(build_family("vit"), plan)


def test_a_setting_of_another_method_is_refused():
    with pytest.raises(VitpruneError, match="protect is not a parameter of evit"):
        Reduction(3, "evit", keep=0.5, protect=0.2)
    with pytest.raises(VitpruneError, match="r is not a parameter of evit"):
        make_plan("evit", 12, keep=0.7, r=3)


def test_reductions_are_values():
    red = Reduction(3, "evit", keep=0.7)
    assert red == Reduction(3, "evit", keep=0.7, fuse=True) and hash(red) == hash(Reduction(3, "evit", keep=0.7))
    assert red.keep == 0.7 and red.fuse is True and red.settings == {"keep": 0.7, "fuse": True}
    assert red.replace(keep=0.5).keep == 0.5 and red.keep == 0.7
    assert copy.deepcopy(red) == red
    with pytest.raises(AttributeError):
        red.keep = 0.1
    assert Reduction.from_dict(red.to_dict()) == red


def test_make_plan_defaults_scale_with_depth():
    assert make_plan("evit", 12, keep=0.7).layers == [3, 6, 9]
    assert make_plan("evit", 24, keep=0.7).layers == [6, 12, 18]
    assert make_plan("ats", 12, keep=1.0).layers == list(range(3, 12))
    assert make_plan("tome", 12, r=8).layers == list(range(12))
    with pytest.raises(VitpruneError, match="evit needs keep"):
        make_plan("evit", 12)


def test_plan_round_trips_through_dict():
    plan = make_plan("evit", 12, keep=0.7, img_size=160)
    assert Plan.from_dict(plan.to_dict()) == plan


def test_img_size_plan_resamples_position_embedding():
    model = build_family("vit")
    vitprune.apply(model, make_plan("evit", 12, keep=0.7, img_size=64))
    assert run(model, torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_cached_prefix_tokens_give_the_same_logits():
    model = vitprune.apply(build_family("vit"), method="ats", keep=0.6, layers=[4, 6])
    x = images_for(model)
    tokens = tokens_before(model, x, 4)
    with torch.inference_mode():
        torch.testing.assert_close(logits_from(model, tokens, 4, tokens.shape[1]), model(x))
    with pytest.raises(VitpruneError, match="cannot start"):
        logits_from(model, tokens, 5, tokens.shape[1])


def test_training_mode_backpropagates_through_reduction():
    model = vitprune.apply(build_family("vit"), method="evit", keep=0.5)
    model.train()
    out = model(images_for(model, batch=2))
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("method,kwargs", [("tome", {"r": 3}), ("ats", {"keep": 0.5})])
def test_shape_tables_cached_in_inference_mode_serve_autograd_and_change_nothing(method, kwargs):
    # The reducers build their shape-only index tables once (vitprune.reducers.common.shape_table);
    # one first built under inference mode must still serve a training step, and equal a fresh one.
    model = vitprune.apply(build_family("vit"), method=method, **kwargs)
    x = images_for(model, batch=2)
    cached = run(model, x)
    _TABLES.clear()
    torch.testing.assert_close(run(model, x), cached, atol=0, rtol=0)
    run(model, x[:1])
    model.train()
    model(x[:1]).sum().backward()
    assert model.blocks[-1].attn.qkv.weight.grad is not None


def test_deepcopy_keeps_the_plan():
    model = vitprune.apply(build_family("vit"), method="tome", r=3)
    clone = copy.deepcopy(model)
    x = images_for(model)
    torch.testing.assert_close(run(clone, x), run(model, x))


def test_ats_static_padding_mode_gives_the_same_logits():
    # Export sets a fixed padded width (static shapes); eager packs the real tokens. Same maths.
    model = vitprune.apply(build_family("vit"), method="ats", keep=0.5)
    x = images_for(model, batch=4)
    packed = run(model, x)
    with torch.inference_mode():  # any width >= the cap works: K = ceil(0.5 * 37) = 19 tokens, 18 patches
        static = model.vitprune_forward(x, pad_to=30)
    torch.testing.assert_close(static, packed, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_head_only_last_block_is_exact_and_cheaper(family):
    model = build_family(family)
    x = images_for(model)
    expected = run(model, x)
    base_macs = vitprune.count_macs(model).gmacs
    vitprune.apply(model, Plan(head_only=True))
    torch.testing.assert_close(run(model, x), expected, rtol=1e-4, atol=1e-5)
    assert vitprune.count_macs(model).gmacs < base_macs
    # only the prefix tokens leave the last block
    assert model.forward_features(x).shape[1] == model.num_prefix_tokens


@pytest.mark.parametrize("method,kwargs", [("evit", {"keep": 0.5}), ("ats", {"keep": 0.6}), ("tome", {"r": 3})])
def test_head_only_after_a_reduction_changes_nothing_but_the_cost(method, kwargs):
    model = build_family("vit")
    x = images_for(model, batch=4)
    layers = [2, 5, 8]
    vitprune.apply(model, method=method, layers=layers, **kwargs)
    expected, macs = run(model, x), vitprune.count_macs(model, x).gmacs
    vitprune.apply(model, method=method, layers=layers, head_only=True, **kwargs)
    torch.testing.assert_close(run(model, x), expected, rtol=1e-4, atol=1e-5)
    assert vitprune.count_macs(model, x).gmacs < macs
    # the cached-tokens path (calibrate) starts at the head-only block at the latest
    tokens = tokens_before(model, x, 2)
    with torch.inference_mode():
        torch.testing.assert_close(logits_from(model, tokens, 2, tokens.shape[1]), expected, rtol=1e-4, atol=1e-5)


def test_head_only_plans_are_checked():
    assert make_plan("tome", 12, r=4, head_only=True).layers == list(range(11))
    with pytest.raises(VitpruneError, match="head-only last block already"):
        make_plan("tome", 12, r=4, layers=[3, 11], head_only=True)
    with pytest.raises(VitpruneError, match="class-token pooling"):
        vitprune.apply(build_family("gap_no_cls"), method="tome", r=2, head_only=True)
    plan = make_plan("evit", 12, keep=0.7, head_only=True)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.describe().endswith("+head-only")
    assert Plan.from_dict({"reductions": []}).head_only is False  # plans written before the option


@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_tome_protect_runs_keeps_the_token_count_and_zero_is_plain_tome(family):
    model = build_family(family)
    x = images_for(model)
    plain = run(vitprune.apply(model, method="tome", r=3), x)
    assert torch.equal(run(vitprune.apply(model, method="tome", r=3, protect=0.0), x), plain)
    # random weights attend almost evenly: a large weight makes the attention, not similarity, decide
    vitprune.apply(model, method="tome", r=3, protect=50.0)
    with torch.inference_mode(), record_tokens(model) as trace:
        protected = model(x)
    assert torch.isfinite(protected).all()
    if family in ("vit", "deit_distilled"):  # layer-scale families start near the identity: nothing to see
        assert (protected - plain).abs().max() > 1e-3
    vitprune.apply(model, method="tome", r=3)
    with torch.inference_mode(), record_tokens(model) as plain_trace:
        model(x)
    assert [e["n_out"].tolist() for e in trace] == [e["n_out"].tolist() for e in plain_trace]


def test_tome_protect_needs_a_class_token_and_round_trips():
    with pytest.raises(VitpruneError, match="no class token"):
        vitprune.apply(build_family("gap_no_cls"), method="tome", r=2, protect=0.2)
    with pytest.raises(VitpruneError, match="protect is not a parameter of evit"):
        make_plan("evit", 12, keep=0.7, protect=0.2)
    plan = make_plan("tome", 12, r=8, protect=0.2)
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.params()["protect"] == 0.2 and "protect=0.2" in plan.describe()
    old = plan.to_dict()  # plans written before protect existed read as plain ToMe
    for red in old["reductions"]:
        del red["protect"]
    assert Plan.from_dict(old) == make_plan("tome", 12, r=8) and "protect" not in make_plan("tome", 12, r=8).params()
