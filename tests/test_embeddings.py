"""Embedding models: cosine and retrieval fidelity, calibrate's embedding objectives, cascade's refusal,
and the attention score of EViT / ATS on models without a class token."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest import build_family
from PIL import Image

import vitprune
import vitprune.evaluation
from vitprune.cli import run
from vitprune.errors import VitpruneError
from vitprune.metrics import embedding_metrics, embedding_terms, nearest_neighbours
from vitprune.models import use_pre_logits
from vitprune.patch import record_tokens, tokens_before
from vitprune.reducers import received_attention

TINY_EMBED = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("embed_images")
    rng = np.random.default_rng(1)
    for index in range(8):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(folder / f"img{index}.png")
    return folder


# -- metrics ----------------------------------------------------------------------------------------

def test_identical_embeddings_agree_fully():
    embeddings = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    metrics = embedding_metrics(embeddings, embeddings.clone())
    assert metrics["cosine_mean"] == pytest.approx(1.0) and metrics["cosine_p5"] == pytest.approx(1.0)
    assert metrics["retrieval_agreement"] == 100.0 and metrics["recall_at_1"] == 100.0
    assert metrics["recall_at_5"] == 100.0 and metrics["n_images"] == 20
    assert embedding_terms(embeddings, embeddings)["nn_miss"].sum() == 0


def test_known_neighbours_and_a_swapped_pair():
    # points on a line: each one's nearest neighbour (by angle) is known
    angles = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0, 1.5])
    base = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert nearest_neighbours(base, 1).squeeze(1).tolist() == [1, 0, 1, 2, 3, 4]
    # the model swaps images 4 and 5: their own cosines drop, and the neighbours of 4 and 5 change
    model = base[[0, 1, 2, 3, 5, 4]]
    metrics = embedding_metrics(model, base)
    # model neighbours: 0->1, 1->0, 2->1, 3->2 (as the base), 4 (angle 1.5)->5, 5 (angle 1.0)->3
    assert nearest_neighbours(model, 1).squeeze(1).tolist() == [1, 0, 1, 2, 5, 3]
    assert metrics["retrieval_agreement"] == pytest.approx(100 * 4 / 6)
    cosine = torch.tensor([1, 1, 1, 1, np.cos(0.5), np.cos(0.5)], dtype=torch.float64)
    assert metrics["cosine_mean"] == pytest.approx(float(cosine.mean()))
    assert metrics["cosine_p5"] == pytest.approx(float(torch.quantile(cosine, 0.05)))
    with pytest.raises(VitpruneError, match="does not match"):
        embedding_metrics(model, base[:5])


# -- apply, export, cascade on an embedding model -----------------------------------------------------

def test_pre_logits_are_forward_head_pre_logits_for_the_reduced_model_too():
    model = build_family("vit")
    x = torch.randn(2, 3, 96, 96)
    vitprune.apply(model, method="evit", keep=0.7)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        use_pre_logits(model)
        torch.testing.assert_close(model(x), expected)


@pytest.mark.slow
def test_a_num_classes_0_model_reports_cosine_and_retrieval(images, tmp_path, capsys):
    from vitprune.commands.apply import ApplyRequest, run_apply

    request = ApplyRequest(model="vit_tiny_patch16_224", no_pretrained=True, img_size=32, method="tome", r=4,
                           features=True, data=images, workers=0, progress=False, output=tmp_path / "out")
    report = run_apply(request).report
    assert report["output"] == "embedding (dim 192)" and report["data"]["labelled"] is False
    assert 0 < report["cosine_mean"] < 1 and report["cosine_p5"] <= report["cosine_mean"]
    assert 0 <= report["retrieval_agreement"] <= 100 and report["recall_at_1"] == report["retrieval_agreement"]
    assert "top1" not in report and "agreement" not in report
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "cosine with base" in markdown and "retrieval agreement" in markdown
    loaded = vitprune.load(tmp_path / "out")
    assert loaded.num_classes == 0  # the artifact is the embedding model


@pytest.mark.slow
def test_cascade_refuses_an_embedding_model(images, tmp_path, capsys):
    assert run(["apply", *TINY_EMBED, "--features", "--method", "tome", "--r", "2", "-o", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    code = run(["cascade", str(tmp_path / "e"), "--stages", "tome:4,base", "--data", str(images),
                "--target-ratio", "0.8", "-o", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "embedding" in err[0] and "no confidence" in err[0]
    assert not (tmp_path / "c").exists()


# -- calibrate --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_calibrate_objective_cosine_on_an_embedding_model(images, tmp_path):
    out = tmp_path / "cal"
    code = run(["calibrate", *TINY_EMBED, "--features", "--data", str(images), "--target-ratio", "0.7",
                "--objective", "cosine", "--img-sizes", "32", "--search-images", "4", "--refine-steps", "1",
                "--bench-repeats", "1", "--bench-batch", "2", "--threads", "1", "-o", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["objective"] == "cosine" and report["gmacs"] <= 0.7 * report["gmacs_base"] + 1e-9
    assert "cosine_mean" in report and "retrieval_agreement" in report["calibration"]["chosen"]["holdout"]
    assert "NN agree %" in (out / "report.md").read_text()


def test_objectives_of_the_other_kind_are_refused(images, tmp_path, capsys):
    assert run(["calibrate", *TINY_EMBED, "--features", "--data", str(images), "--target-ratio", "0.7",
                "--objective", "kl"]) == 2
    assert "outputs an embedding; use cosine or retrieval" in capsys.readouterr().err
    assert run(["calibrate", *TINY_EMBED, "--data", str(images), "--target-ratio", "0.7", "--objective", "retrieval"]) == 2
    assert "use the features option" in capsys.readouterr().err


# -- models without a class token -------------------------------------------------------------------

def test_received_attention_equals_the_dense_column_mean():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 11, 8, generator=generator), torch.randn(2, 3, 11, 8, generator=generator)
    bias = torch.randn(2, 1, 1, 11, generator=generator)
    dense = ((q * 0.3) @ k.transpose(-2, -1) + bias).softmax(dim=-1).mean(dim=2)
    chunked = received_attention(q, k, 0.3, bias, chunk=4)
    assert chunked.shape == (2, 3, 11)
    torch.testing.assert_close(chunked, dense)
    torch.testing.assert_close(chunked.sum(dim=-1), torch.ones(2, 3))
    weight = torch.ones(2, 11)
    weight[:, 7:] = 0  # padded queries do not count
    torch.testing.assert_close(received_attention(q, k, 0.3, bias, weight, chunk=4),
                               ((q[:, :, :7] * 0.3) @ k.transpose(-2, -1) + bias).softmax(dim=-1).mean(dim=2))


def test_the_gap_model_falls_back_to_received_attention_and_reduces(monkeypatch):
    model = build_family("gap_no_cls")
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    seen = []
    monkeypatch.setattr("vitprune.methods.base.received_attention",
                        lambda *args, **kwargs: seen.append(1) or received_attention(*args, **kwargs))
    vitprune.apply(model, method="evit", keep=0.5, layers=[1])
    with torch.inference_mode(), record_tokens(model) as trace:
        model(x)
    assert seen and trace[1]["n_out"].tolist() == [1 + 18 + 1] * 3  # register + ceil(0.5 * 36) + fused
    report_scores = vitprune.evaluation.token_scores(model)
    assert report_scores == [{"layer": 1, "method": "evit", "score": "mean attention received (no class token)"}]


def test_ats_on_the_gap_model_pools_only_real_tokens():
    model = build_family("gap_no_cls")
    with torch.no_grad():  # sharper attention (scaled queries and keys): a different kept count per image
        for block in model.blocks[1:3]:
            block.attn.qkv.weight[: 2 * model.embed_dim] *= 5
    vitprune.apply(model, method="ats", keep=1.0, layers=[1, 2])
    x = torch.randn(4, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.5, 1, 2, 4]).view(4, 1, 1, 1)
    with torch.inference_mode(), record_tokens(model) as trace:
        batch = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert len(set(trace[2]["n_out"].tolist())) > 1  # per-image counts: the batch is padded
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


def test_attention_pooled_models_run_evit_and_refuse_ats():
    torch.manual_seed(0)
    siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=2, embed_dim=64,
                               num_heads=2).eval()
    vitprune.apply(siglip, method="evit", keep=0.5, layers=[1])
    with torch.inference_mode():
        assert siglip(torch.randn(1, 3, 32, 32)).shape == (1, 64)
    assert tokens_before(siglip, torch.randn(1, 3, 32, 32), 0).shape[1] == 4  # no prefix token at all
    with pytest.raises(VitpruneError, match="needs class-token or average pooling"):
        vitprune.apply(siglip, method="ats", keep=0.5)
