"""A transformers ViT / DeiT / DINOv2 folder converts to the equal timm model, and every command takes it."""
import json

import pytest
import torch

import vitprune
from vitprune.cli import run
from vitprune.errors import VitpruneError
from vitprune.hf import load_transformers

transformers = pytest.importorskip("transformers")  # the hf extra

TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
        "image_size": 32, "patch_size": 8}
MODELS = {
    "vit": ("ViTForImageClassification", "ViTConfig", {"num_labels": 5}),
    "vit_backbone": ("ViTModel", "ViTConfig", {}),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", {"num_labels": 5}),
    "dinov2": ("Dinov2Model", "Dinov2Config", {"layerscale_value": 0.1}),
}


def save_random(folder, kind: str):
    architecture, config_class, extra = MODELS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, architecture)(getattr(transformers, config_class)(**TINY, **extra)).eval()
    with torch.no_grad():  # non-trivial layer norms, so a wrong mapping of them shows
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_random_transformers_model_converts_to_timm_with_equal_outputs(tmp_path, kind):
    reference = save_random(tmp_path, kind)
    model, info = load_transformers(tmp_path)
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        output = reference(pixel_values=images)
        expected = output.logits if hasattr(output, "logits") else output.last_hidden_state[:, 0]
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-4)
    assert info["model_args"]["embed_dim"] == 64 and info["checkpoint"].endswith("model.safetensors")
    assert model.num_classes == (5 if kind in ("vit", "deit") else 0)


def test_apply_on_a_transformers_folder_writes_an_artifact_that_loads(tmp_path, capsys):
    save_random(tmp_path / "hf", "vit")
    out = tmp_path / "artifact"
    assert run(["apply", str(tmp_path / "hf"), "--method", "evit", "--keep", "0.7", "--layers", "1", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "vit_base_patch16_224" and report["gmacs"] < report["gmacs_base"]
    base, _ = load_transformers(tmp_path / "hf")
    reference = vitprune.apply(base, method="evit", keep=0.7, layers=[1])
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(vitprune.load(out)(images), reference(images), rtol=0, atol=0)


def test_a_conversion_that_disagrees_is_refused(tmp_path, monkeypatch):
    save_random(tmp_path, "vit")
    monkeypatch.setattr("vitprune.hf.RENAMES", tuple(
        (pattern, "blocks.\\1.norm2.\\2" if "norm1" in replacement else
         "blocks.\\1.norm1.\\2" if "norm2" in replacement else replacement)
        for pattern, replacement in __import__("vitprune.hf", fromlist=["RENAMES"]).RENAMES))
    with pytest.raises(VitpruneError, match="differs from the transformers model by"):
        load_transformers(tmp_path)


def test_an_unsupported_transformers_architecture_is_one_error_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SwinModel"], "model_type": "swin"}))
    assert run(["apply", str(tmp_path), "--method", "tome", "--r", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a transformers SwinModel is not supported" in err[0]
