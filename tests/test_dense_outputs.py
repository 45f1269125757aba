"""Dense outputs of a reduced model (issue 25.5): forward_intermediates on the patch grid, the patch map,
prune_intermediate_layers."""
import copy
import inspect

import pytest
import torch
from conftest import build_family

import vitprune
from vitprune.models import image_size
from vitprune.patch import record_tokens
from vitprune.reducers import PatchGrid, index_holders, merge_holders, merge_tokens, tome_match
from vitprune.reducers.sources import patch_groups, whole_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

# class token; 4 registers; Eva rotary + registers; a non-square grid; NaFlexVit (class token, registers, rotary)
FAMILIES = ["vit", "registers", "dinov3_rotary_registers", "non_square", "naflex_radio_rotary"]
METHODS = {
    "tome": {"method": "tome", "r": 3},
    "evit": {"method": "evit", "keep": 0.6, "layers": [1, 2]},
    "evit_drop": {"method": "evit", "keep": 0.5, "fuse": False, "layers": [1]},
    "ats": {"method": "ats", "keep": 0.6, "layers": [1, 2]},
    "zerotprune": {"method": "zerotprune", "keep": 0.7, "layers": [1, 2]},
    "ppt_prune": {"method": "ppt", "r": 6, "threshold": 0.0, "layers": [1, 2]},
    "ppt_pool": {"method": "ppt", "r": 6, "threshold": 1.0, "layers": [1, 2]},
}
# timm's output formats, each option on and off at least once
FORMATS = [{"output_fmt": fmt, "return_prefix_tokens": prefix, "norm": norm, "intermediates_only": only,
            "output_dict": as_dict}
           for fmt, prefix, norm, only, as_dict in [("NCHW", False, False, False, False), ("NLC", True, True, False, False),
                                                    ("NCHW", True, False, True, False), ("NLC", False, True, True, False),
                                                    ("NCHW", True, False, False, True), ("NLC", False, True, True, True)]]


def _formats(model):
    """The formats the model's timm class takes (Eva's forward_intermediates has no output_dict)."""
    takes_dict = "output_dict" in inspect.signature(type(model).forward_intermediates).parameters
    if takes_dict:
        return FORMATS
    return [{key: value for key, value in fmt.items() if key != "output_dict"} for fmt in FORMATS
            if not fmt["output_dict"]]


def _model(family):
    model = build_family(family)
    if family == "vit":  # 4 blocks are enough, and keep the test fast
        model.blocks = model.blocks[:4]
    return model


def _images(model, batch=2, seed=1):
    height, width = image_size(model)
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _flat(out):
    """The tensors of a forward_intermediates result, in order (final features marked)."""
    if isinstance(out, dict):
        return [(key == "image_features", t) for key in sorted(out) for t in _flat_list(out[key])]
    if isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
        return [(True, out[0])] + [(False, t) for t in _flat_list(out[1])]
    return [(False, t) for t in _flat_list(out)]


def _flat_list(items):
    if isinstance(items, torch.Tensor):
        return [items]
    return [t for item in items for t in (item if isinstance(item, tuple) else (item,))]


def _unreduced(family):
    """A model, images, the formats its class takes and timm's unreduced outputs in each (flattened)."""
    model = _model(family)
    x = _images(model)
    formats = _formats(model)
    with torch.inference_mode():
        return model, x, formats, [_flat(model.forward_intermediates(x, **fmt)) for fmt in formats]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_no_op_plan_gives_timms_dense_outputs_bit_identically(family):
    model, x, formats, base = _unreduced(family)
    with torch.inference_mode():
        base_early = model.forward_intermediates(x, indices=[0, -2], stop_early=True)
        vitprune.apply(model, method="tome", r=0)
        for fmt, expected in zip(formats, base, strict=True):
            got = _flat(model.forward_intermediates(x, **fmt))
            assert [final for final, _ in got] == [final for final, _ in expected]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, expected, strict=True)), fmt
        early = model.forward_intermediates(x, indices=[0, -2], stop_early=True)
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(_flat(early), _flat(base_early), strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_outputs_have_timms_shapes_and_the_reduced_models_final_features(family):
    model, x, formats, base = _unreduced(family)
    with torch.inference_mode():
        for method, kwargs in METHODS.items():
            vitprune.apply(model, **kwargs)
            logits, features = model(x), model.forward_features(x)
            assert features.shape[1] < base[0][0][1].shape[1], method  # it did reduce
            last = model.forward_intermediates(x, **formats[0])[1][-1]
            assert last.shape == base[0][-1][1].shape and not torch.equal(last, base[0][-1][1])  # not timm's blocks
            shown = formats if method == "tome" else formats[:2]  # every format once; the layout is the method's own
            for fmt, expected in zip(shown, base, strict=False):
                got = _flat(model.forward_intermediates(x, **fmt))
                assert [(final, t.shape) for final, t in got if not final] == \
                    [(final, t.shape) for final, t in expected if not final], (method, fmt)
                for _, final in (item for item in got if item[0]):
                    assert torch.equal(final, features)  # the reduced tokens, as forward_features gives them
                    assert torch.equal(model.forward_head(final), logits)


def _reference_patch_maps(trace, num_layers):
    """Per block, the patch map the N x M source matrix implies (record_tokens(sources=True)): the row
    of the whole token holding each patch, -1 where no whole token does (dropped, or fused by EViT)."""
    maps = []
    for entry in trace[-num_layers:]:
        group, _ = patch_groups(entry["source"])
        whole = whole_tokens(entry["source"]).gather(1, group.clamp_min(0))
        maps.append(torch.where((group >= 0) & whole, group, -1))
    return maps


@pytest.mark.parametrize("family", ["vit", "dinov3_rotary_registers", "eva02_rotary_swiglu"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_patch_map_follows_the_sources_and_holds_the_reduced_features(family, method):
    """The O(N) integer map agrees with the source matrix in every block; a patch held by a token has
    exactly that token's features from the reduced forward pass; a dropped patch keeps the features
    it had when it entered the block that dropped it."""
    model = vitprune.apply(_model(family), **METHODS[method])
    x = _images(model, batch=3)
    depth = len(model.blocks)
    with torch.inference_mode(), record_tokens(model, sources=True) as trace:
        reduced = vitprune.reduced_intermediates(model, x)
        reference = _reference_patch_maps(trace, depth)
        dense = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        features = model.forward_features(x)
        normed = model.forward_intermediates(x, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)[0]
    assert len(reduced) == len(dense) == depth
    dropped_somewhere = False
    for layer, (block, expected, grid) in enumerate(zip(reduced, reference, dense, strict=True)):
        assert torch.equal(block.patch_map, expected), layer
        held = block.patch_map >= 0
        rows = block.tokens.gather(1, block.patch_map.clamp_min(0).unsqueeze(-1).expand(-1, -1, grid.shape[-1]))
        assert torch.equal(grid[held], rows[held])
        if layer:
            before = reduced[layer - 1].patch_map >= 0
            newly_dropped = before & ~held
            dropped_somewhere |= bool(newly_dropped.any())
            assert torch.equal(grid[newly_dropped], dense[layer - 1][newly_dropped])  # as it entered this block
            assert torch.equal(grid[~before], dense[layer - 1][~before])  # and it keeps them
    last = reduced[-1].patch_map
    rows = features.gather(1, last.clamp_min(0).unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    assert torch.equal(normed[last >= 0], rows[last >= 0])  # the last block: forward_features' own tokens
    assert dropped_somewhere == (method not in ("tome", "ppt_pool"))


@pytest.mark.parametrize("method", ["ats", "ppt_prune", "tome"])
def test_a_batch_gives_each_images_dense_outputs(method):
    model = vitprune.apply(_model("registers"), **METHODS[method])
    x = _images(model, batch=3)
    with torch.inference_mode():
        batch = model.forward_intermediates(x, return_prefix_tokens=True, intermediates_only=True)
        alone = [model.forward_intermediates(x[i:i + 1], return_prefix_tokens=True, intermediates_only=True)
                 for i in range(3)]
    for layer, (patches, prefix) in enumerate(batch):
        torch.testing.assert_close(patches, torch.cat([one[layer][0] for one in alone]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prefix, torch.cat([one[layer][1] for one in alone]), rtol=1e-5, atol=1e-5)


def test_a_head_only_plan_computes_the_last_blocks_patch_tokens_for_dense_outputs():
    model = vitprune.apply(_model("vit"), method="tome", r=3, head_only=True)
    x = _images(model)
    with torch.inference_mode():
        logits = model(x)
        final, dense = model.forward_intermediates(x, output_fmt="NLC")
        assert dense[-1].shape == (2, 36, 192)
        torch.testing.assert_close(model.forward_head(final), logits, rtol=1e-5, atol=1e-5)


def test_prune_intermediate_layers_keeps_the_reductions_or_refuses():
    model = vitprune.apply(_model("vit"), method="evit", keep=0.5, layers=[1])
    x = _images(model)
    pruned = copy.deepcopy(model)
    assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
    assert len(pruned.blocks) == 3 and vitprune.plan_of(pruned) == vitprune.plan_of(model)
    with torch.inference_mode():
        full = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        kept = pruned.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(full, kept, strict=True))
    with pytest.raises(vitprune.VitpruneError, match="would remove block 1, where the plan reduces"):
        copy.deepcopy(model).prune_intermediate_layers([0])
    head_only = vitprune.apply(_model("vit"), method="tome", r=2, head_only=True)
    with pytest.raises(vitprune.VitpruneError, match="head-only"):
        head_only.prune_intermediate_layers(2)


def test_dense_outputs_refuse_what_has_no_patch_grid_in_one_line():
    model = vitprune.apply(_model("vit"), method="transform", keep=0.6, layers=[1])
    x = _images(model)
    for call in (lambda: model.forward_intermediates(x), lambda: vitprune.reduced_intermediates(model, x)):
        with pytest.raises(vitprune.VitpruneError, match="cannot put transform's tokens back on the patch grid"):
            call()
    tome = vitprune.apply(_model("vit"), method="tome", r=2)
    for bad, match in (({"indices": 9}, "indices must be"), ({"indices": [0, 7]}, "indices must be"),
                       ({"indices": []}, "indices must be"),
                       ({"output_fmt": "NHWC"}, "output_fmt must be")):
        with pytest.raises(vitprune.VitpruneError, match=match):
            tome.forward_intermediates(x, **bad)
    for call in (tome.forward_intermediates, lambda images: vitprune.reduced_intermediates(tome, images)):
        with pytest.raises(vitprune.VitpruneError, match="empty batch"):
            call(x[:0])
    with pytest.raises(vitprune.VitpruneError, match="not token-reduced"):
        vitprune.reduced_intermediates(_model("vit"), x)
    assert len(tome.get_intermediate_layers(x, n=2)) == 2  # timm's older call goes through the reduced path


def test_merge_holders_name_the_row_each_token_was_merged_into():
    torch.manual_seed(0)
    tokens = torch.eye(11).unsqueeze(0).repeat(2, 1, 1)  # token j is the unit vector j: where it goes is visible
    matching = tome_match(torch.randn(2, 11, 8), num_prefix=2, r=3)
    merged, _ = merge_tokens(tokens, torch.ones(2, 11, 1), matching, num_prefix=2)
    holders = merge_holders(matching, 11, num_prefix=2)
    assert torch.equal((merged > 0).sum(dim=1), torch.ones(2, 11, dtype=torch.int64))  # one holder per token
    assert torch.equal(merged.argmax(dim=1), holders)


def test_index_holders_skip_padding_and_a_grid_keeps_what_was_dropped():
    index = torch.tensor([[0, 2, 3, 3]])
    holders = index_holders(index, 5, valid=torch.tensor([[True, True, True, False]]))
    assert holders.tolist() == [[0, -1, 1, 2, -1]]  # the padding repeat of token 3 holds nothing
    x = torch.arange(5.0).view(1, 5, 1)
    grid = PatchGrid.start(x, num_prefix=1).follow(holders, x)  # patches 0..3 were rows 1..4
    assert grid.holder.tolist() == [[-1, 1, 2, -1]]
    reduced = torch.tensor([[[10.0], [12.0], [13.0]]])
    assert grid.dense(reduced).flatten().tolist() == [1.0, 12.0, 13.0, 4.0]
