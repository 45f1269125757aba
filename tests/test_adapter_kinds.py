"""The adapter on every block kind (issue 25) and a reduced model's life as a Python object (issue 27.9)."""
import copy
import io
import pickle

import pytest
import timm
import torch
from conftest import BLOCK_FAMILIES, build_family
from test_flops import torch_counted_gmacs

import vitprune
from vitprune.blocks import block_kind
from vitprune.flops import model_input
from vitprune.models import is_supported_vit
from vitprune.patch import has_position_bias, record_tokens, shared_position_bias
from vitprune.plan import Plan
from vitprune.reducers import channel_positions, pair_bias, position_channels, unit_rotations

METHODS = [{"method": "tome", "r": 3}, {"method": "evit", "keep": 0.6, "layers": [1]},
           {"method": "ats", "keep": 0.6, "layers": [1]}, {"method": "zerotprune", "keep": 0.7, "layers": [1]}]


def _images(model, batch):
    torch.manual_seed(2)
    return torch.randn_like(model_input(model, batch))


@pytest.mark.slow  # 1-15 s per family on 2 cores; tests/test_flops.py covers every kind in the fast tier
@pytest.mark.parametrize("family", sorted(BLOCK_FAMILIES))
def test_every_block_kind_runs_noop_batch_and_remove_exactly(family):
    model = build_family(family)
    x = _images(model, 2)
    with torch.inference_mode():
        base = model(x)
        # a no-op plan: timm's own blocks, bit-identical (ToMe is refused where a bias needs positions)
        vitprune.apply(model, Plan()) if has_position_bias(model) else vitprune.apply(model, method="tome", r=0)
        assert torch.equal(model(x), base)
        for kwargs in METHODS:
            try:
                vitprune.apply(model, **kwargs)
            except vitprune.VitpruneError as error:  # e.g. ATS needs class-token or average pooling
                assert any(why in str(error) for why in ("pools by", "class token", "combine several patches"))
                continue
            batch = model(x)
            alone = torch.cat([model(x[i:i + 1]) for i in range(2)])
            torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)
            assert batch.shape == base.shape and torch.isfinite(batch).all()
        vitprune.remove(model)
        assert torch.equal(model(x), base)


@pytest.mark.parametrize("name, part", [("vit_base_patch16_rope_mixed_224", "mixed"),
                                        ("samvit_base_patch16", "windowed attention"),
                                        ("vit_small_patch16_18x2_224", "ParallelThingsBlock"),
                                        ("vit_base_patch16_plus_240", None)])
def test_unsupported_families_are_refused_naming_the_part(name, part):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    if part is None:  # a plain VisionTransformer: supported
        assert is_supported_vit(model) is None
        return
    with pytest.raises(vitprune.VitpruneError, match=part):
        vitprune.apply(model, method="tome", r=2)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs", [{"method": "tome", "r": 4}, {"method": "ats", "keep": 0.6, "layers": [1, 3]}])
def test_a_reduced_model_pickles_saves_and_copies(kwargs):
    model = vitprune.apply(build_family("vit"), **kwargs)
    x = torch.randn(2, 3, 96, 96)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(model)), copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    with torch.inference_mode():
        expected = model(x)
        for other in copies:
            assert type(other) is type(model) and vitprune.plan_of(other) == vitprune.plan_of(model)
            assert torch.equal(other(x), expected)


def test_rotary_tokens_keep_their_rotation():
    # EViT keeping every token runs the reduced path (rotations carried per token) yet changes nothing
    model = build_family("eva02_rotary_swiglu")
    x = _images(model, 2)
    with torch.inference_mode():
        base = model(x)
        vitprune.apply(model, method="evit", keep=1.0, fuse=False, layers=[1])
        torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)


def test_merged_rotations_are_the_weighted_circular_mean():
    angles = torch.tensor([[[0.2, 1.0], [0.6, -1.0]]])  # two tokens, two frequencies
    rope = torch.cat([angles.sin(), angles.cos()], dim=-1)
    assert torch.equal(unit_rotations(rope), rope)  # one token's own rotation: bit for bit
    merged = unit_rotations(0.5 * rope[:, :1] + 0.5 * rope[:, 1:])
    torch.testing.assert_close(merged, torch.cat([torch.tensor([[[0.4, 0.0]]]).sin(),
                                                  torch.tensor([[[0.4, 0.0]]]).cos()], dim=-1))


def test_a_reduced_rotary_model_exports_to_onnx_with_parity(tmp_path):
    from vitprune.export.verify import verify_onnx
    from vitprune.onnx_runtime import export_onnx
    model = vitprune.apply(build_family("eva02_rotary_swiglu"), method="tome", r=3)
    export_onnx(model, tmp_path / "model.onnx")
    parity = verify_onnx(model, tmp_path / "model.onnx", _images(model, 2), batch_size=2, provider="cpu")
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("opset", [17, 18])
def test_an_rms_norm_model_exports_to_onnx_with_parity_and_leaves_the_exporter_as_it_was(tmp_path, opset):
    from torch.onnx._internal.torchscript_exporter.registration import registry

    from vitprune.export.verify import verify_onnx
    from vitprune.onnx_runtime import export_onnx
    model = vitprune.apply(build_family("swiglu_map"), method="tome", r=3)  # AIMv2: RmsNorm -> aten::rms_norm
    export_onnx(model, tmp_path / "model.onnx", opset=opset)
    parity = verify_onnx(model, tmp_path / "model.onnx", _images(model, 2), batch_size=2, provider="cpu")
    assert parity["passed"] and parity["max_abs_diff"] < 1e-5
    assert not registry.is_registered_op("aten::rms_norm", opset)  # lent for the export only


@pytest.mark.parametrize("family", ["eva02_rotary_swiglu", "res_post", "naflex_siglip_map"])
def test_the_gradient_search_soft_forward_runs_the_same_block_pieces(family):
    from vitprune.calibrate.gradient import Walk, soft_logits
    from vitprune.patch import tokens_before
    model = build_family(family)
    x = _images(model, 2)
    with torch.no_grad():
        soft = soft_logits(model, tokens_before(model, x, 0), Walk(), model.num_prefix_tokens)
        torch.testing.assert_close(soft, model(x), rtol=1e-5, atol=1e-5)


RELATIVE_POSITION_FAMILIES = ["beit_rel_pos", "relpos_mlp_cls", "relpos_shared_res_post"]
PRUNING = [{"method": "evit", "keep": 0.5, "fuse": False, "layers": [1]}, {"method": "ats", "keep": 0.5, "layers": [1]},
           {"method": "zerotprune", "keep": 0.5, "layers": [1, 2]}]


def test_the_pair_bias_is_the_tables_rows_and_columns_at_the_positions():
    table = torch.randn(3, 7, 7)
    query, key = torch.tensor([[0, 2, 5], [0, 1, 6]]), torch.tensor([[0, 2, 5, 6], [0, 1, 3, 6]])
    expected = torch.stack([table[:, q][:, :, k] for q, k in zip(query, key, strict=True)])
    assert torch.equal(pair_bias(table, query, key), expected)
    positions = torch.arange(5000).view(1, -1)  # ride in the tokens' dtype: bfloat16 holds whole numbers to 256
    assert torch.equal(channel_positions(position_channels(positions, torch.bfloat16)), positions)


def _masked_reference(model, x, layer, alive):
    """The unreduced model whose blocks after `layer` attend to the `alive` tokens (B, N0) only, pooled over
    them: what pruning at `layer` computes, with timm's own blocks and timm's bias over all positions."""
    tokens = vitprune.patch._embed(model, x)
    shared = shared_position_bias(model)
    mask = torch.zeros(alive.shape, dtype=tokens.dtype).masked_fill(~alive, float("-inf"))[:, None, None, :]
    for index, block in enumerate(model.blocks):
        given = shared if index <= layer else mask if shared is None else shared + mask
        tokens = block_kind(block).plain(block, tokens, given)
    tokens = model.norm(tokens)
    return torch.cat([model.forward_head(tokens[i:i + 1, alive[i]]) for i in range(x.shape[0])])


@pytest.mark.parametrize("family", ["beit_rel_pos", "relpos_shared_res_post"])  # their blocks take a shared bias
@pytest.mark.parametrize("kwargs", PRUNING[:2], ids=["evit", "ats"])
def test_pruned_tokens_keep_their_relative_position_bias(family, kwargs):
    # pruning at block 1 = the unreduced model whose later blocks mask the dropped tokens out (a wrong gather
    # of the random bias tables shows); the kept tokens are read from their sources
    model = build_family(family)
    x = _images(model, 2)
    prefix = model.num_prefix_tokens
    with torch.inference_mode():
        vitprune.apply(model, **kwargs)
        with record_tokens(model, sources=True) as trace:
            reduced = model(x)
        kept = trace[1]["source"][:, prefix:].sum(dim=1) > 0  # (B, M) the patches still standing for themselves
        assert 0 < kept.sum() < kept.numel()
        alive = torch.cat([torch.ones(x.shape[0], prefix, dtype=torch.bool), kept], dim=1)
        vitprune.remove(model)
        torch.testing.assert_close(reduced, _masked_reference(model, x, 1, alive), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["beit_rel_pos", "relpos_mlp_cls"])
def test_methods_that_combine_tokens_are_refused_on_relative_position_models(family):
    model = build_family(family)
    for kwargs in ({"method": "tome", "r": 2}, {"method": "evit", "keep": 0.7}, {"method": "ppt", "r": 4},
                   {"method": "transform", "keep": 0.7}):
        with pytest.raises(vitprune.VitpruneError, match="combine several patches.*bias per pair of token positions"):
            vitprune.apply(model, **kwargs)
    assert vitprune.apply(model, method="evit", keep=0.7, fuse=False) is model


@pytest.mark.parametrize("family", ["beit_rel_pos", "relpos_mlp_cls"])
def test_a_pruned_relative_position_model_exports_to_onnx_with_parity(tmp_path, family):
    from vitprune.export.verify import verify_onnx
    from vitprune.onnx_runtime import export_onnx
    model = vitprune.apply(build_family(family), method="evit", keep=0.5, fuse=False, layers=[1])
    export_onnx(model, tmp_path / "model.onnx")
    parity = verify_onnx(model, tmp_path / "model.onnx", _images(model, 2), batch_size=2, provider="cpu")
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4


def test_calibrate_refuses_relative_position_models_naming_what_runs():
    from vitprune.budget import Budget
    from vitprune.calibrate.prepare import prepare
    with pytest.raises(vitprune.VitpruneError, match="pruning only.*evit fuse=false, ats or zerotprune"):
        prepare(build_family("beit_rel_pos"), None, False, Budget("ratio", 0.7))


def test_supervit_refuses_relative_position_models():
    from vitprune.finetune.supervit import grid_variants
    with pytest.raises(vitprune.VitpruneError, match="supervit.*relative position bias"):
        grid_variants(build_family("relpos_mlp_cls"), (64, 48), (1.0, 0.7))


def _naflex_sequences(model, images):
    """NaFlex's patch-sequence input: the second image's last half is padding."""
    from timm.models.naflexvit import batch_patchify
    patches, (rows, columns) = batch_patchify(images, model.embeds.patch_size)
    coord = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(columns), indexing="ij"), dim=-1)
    valid = torch.ones(images.shape[0], rows * columns, dtype=torch.bool)
    valid[1, rows * columns // 2:] = False
    return {"patches": patches, "patch_coord": coord.reshape(1, -1, 2).expand(images.shape[0], -1, -1),
            "patch_valid": valid}


def test_naflex_patch_sequences_are_refused_at_call_time():
    # padding patches would be ranked, kept and merged as if they were image: one clear error, no output
    model = build_family("naflex_siglip_map")
    sequences = _naflex_sequences(model, _images(model, 2))
    with torch.inference_mode():
        base = model(sequences)
        vitprune.apply(model, method="tome", r=2)
        for call in (lambda: model(sequences),
                     lambda: model(sequences["patches"], patch_coord=sequences["patch_coord"],
                                   patch_valid=sequences["patch_valid"]),
                     lambda: model.forward_intermediates(sequences, output_fmt="NLC")):
            with pytest.raises(vitprune.VitpruneError, match="NaFlex patch sequences with padding"):
                call()
        vitprune.remove(model)
        assert torch.equal(model(sequences), base)


def test_naflex_mixed_rotary_embeddings_are_refused_naming_them():
    with torch.device("meta"):
        model = timm.create_model("naflexvit_base_patch16_gap", rope_type="mixed", depth=2)
    assert "RotaryEmbeddingMixed" in is_supported_vit(model)


def test_naflex_average_pooling_over_registers_stays_exact_with_per_image_counts():
    # timm pools the registers with the patches (pool_include_prefix): ATS's padding must not shift that mean
    model = build_family("naflex_factorized_gap")
    with torch.no_grad():  # a peaked first attention, full layer scale: the counts differ per image
        model.blocks[0].attn.qkv.weight.mul_(30)
        for block in model.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    x = _images(model, 6) * torch.linspace(0.1, 3, 6)[:, None, None, None]
    vitprune.apply(model, method="ats", keep=1.0, layers=[0])
    with torch.inference_mode(), record_tokens(model) as trace:
        batch = model(x)
    assert len(set(trace[0]["n_out"].tolist())) > 1
    with torch.inference_mode():
        torch.testing.assert_close(batch, torch.cat([model(x[i:i + 1]) for i in range(6)]), rtol=1e-5, atol=1e-5)


def test_a_reduced_naflex_model_exports_to_onnx_with_parity(tmp_path):
    from vitprune.export.verify import verify_onnx
    from vitprune.onnx_runtime import export_onnx
    model = vitprune.apply(build_family("naflex_siglip_map"), method="tome", r=2)
    export_onnx(model, tmp_path / "model.onnx")
    parity = verify_onnx(model, tmp_path / "model.onnx", _images(model, 2), batch_size=2, provider="cpu")
    assert parity["passed"] and parity["max_abs_diff"] < 1e-4


def test_a_naflex_class_token_model_runs_the_head_only_last_block_exactly():
    # RADIO style: class-token pooling, so the last block may compute the prefix tokens alone
    model = build_family("naflex_radio_rotary")
    x = _images(model, 2)
    with torch.inference_mode():
        base = model(x)
        vitprune.apply(model, method="tome", r=0, head_only=True)
        torch.testing.assert_close(model(x), base, rtol=1e-6, atol=1e-6)
    assert vitprune.count_macs(model, x[:1]).gmacs == pytest.approx(torch_counted_gmacs(model, x[:1]), rel=1e-6)


@pytest.mark.parametrize("family, extra", [("naflex_radio_rotary", {}),
                                           ("eva02_rotary_swiglu", {"dynamic_img_size": True})])
def test_a_reduced_rotary_model_refuses_another_grid_of_the_same_token_count(family, extra):
    # its rotations are made for its recorded grid: a 4 x 16 grid has the 8 x 8 grid's 64 tokens, not its rotations;
    # timm would take the other grid (NaFlex, dynamic_img_size), so every path in is checked
    if extra:
        name, kwargs = BLOCK_FAMILIES[family]
        model = timm.create_model(name, pretrained=False, **kwargs, **extra).eval()
    else:
        model = build_family(family)
    vitprune.apply(model, method="tome", r=2)
    rows, columns = _images(model, 1).shape[-2:]
    other = torch.randn(1, 3, rows // 2, columns * 2)
    with torch.inference_mode():
        model(_images(model, 1))
        for call in (model, lambda x: model.forward_intermediates(x, indices=[1]),
                     lambda x: vitprune.reduced_intermediates(model, x, indices=[1])):
            with pytest.raises(vitprune.VitpruneError, match="recorded input size"):
                call(other)
