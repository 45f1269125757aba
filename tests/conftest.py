import contextlib
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from timm.models.naflexvit import NaFlexVit

from vitprune.models import set_image_size

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = {
    "vit_tiny_patch16_224": SHARED_DATA / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth",
    "deit_tiny_patch16_224": SHARED_DATA / "weights" / "deit_tiny_patch16_224.lnfixed.pth",
}
SHARED_IMAGES = SHARED_DATA / "images" / "imagenet-sample-images"

requires_shared = pytest.mark.skipif(
    not all(p.exists() for p in [*WEIGHTS.values(), SHARED_IMAGES]), reason="../shared/data not present"
)

# Small instances of every supported family: (timm name, build kwargs). img_size keeps them cheap.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 96}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96}),
    "deit3": ("deit3_small_patch16_224", {"img_size": 64, "depth": 4}),
    "registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 98, "depth": 4, "num_classes": 10}),
    "gap_no_cls": ("vit_wee_patch16_reg1_gap_256", {"img_size": 96, "depth": 4, "num_classes": 10}),
}
# position embedding grid = the image's patch grid: no resampling (ONNX has no antialiased resize)
NAFLEX_TINY = {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2, "num_classes": 10,
               "pos_embed_grid_size": (4, 4)}
# Every other block and stem kind the adapter runs (issue 25), as tiny random models.
BLOCK_FAMILIES = {
    "glu_mlp": ("vit_giant_patch14_dinov2", {"img_size": 56, "depth": 4, "embed_dim": 96, "num_heads": 2,
                                             "num_classes": 10}),
    "swiglu_map": ("aimv2_large_patch14_224", {"img_size": 56, "depth": 4, "embed_dim": 64, "num_heads": 2,
                                               "num_classes": 10}),
    "attention_pool": ("vit_base_patch16_siglip_224", {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2,
                                                        "num_classes": 10}),
    "hybrid": ("vit_tiny_r_s16_p8_224", {"img_size": 64, "depth": 4, "num_classes": 10}),
    "geglu_stem": ("vitamin_small_224", {"img_size": 64, "depth": 4, "num_classes": 10}),
    "res_post": ("vit_base_patch16_rpn_224", {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2,
                                              "num_classes": 10}),
    "qk_norm_layer_scale": ("vit_tiny_patch16_224", {"img_size": 64, "depth": 4, "qk_norm": True, "init_values": 0.1,
                                                     "num_classes": 10}),
    # the Eva class: rotary embeddings carried through reductions
    "eva02_rotary_swiglu": ("eva02_tiny_patch14_224", {"img_size": 84, "depth": 4, "embed_dim": 64, "num_heads": 2,
                                                       "num_classes": 10}),
    "dinov3_rotary_registers": ("vit_small_patch16_dinov3", {"img_size": 96, "depth": 4, "embed_dim": 64,
                                                             "num_heads": 2, "num_classes": 10}),
    "pe_rotary_attention_pool": ("vit_pe_core_tiny_patch16_384", {"img_size": 96, "depth": 4, "embed_dim": 64,
                                                                  "num_heads": 2, "num_classes": 10}),
    "non_square": ("vit_tiny_patch16_224", {"img_size": (64, 96), "depth": 4, "num_classes": 10}),
    # relative position biases gathered for the kept tokens (pruning methods only): BEiT (q/v biases, gamma layer
    # scale, a per-block table plus a shared one, mean pooling + fc_norm); RelPosMlp per block with a class
    # token; a shared RelPosBias table on post-norm blocks without a class token
    "beit_rel_pos": ("beit_base_patch16_224", {"img_size": 64, "depth": 4, "embed_dim": 64, "num_heads": 2,
                                               "use_shared_rel_pos_bias": True, "init_values": 0.5, "head_init_scale": 1.0,
                                               "num_classes": 10}),
    "relpos_mlp_cls": ("vit_relpos_medium_patch16_cls_224", {"img_size": 64, "depth": 4, "embed_dim": 64,
                                                             "num_heads": 2, "init_values": 0.5, "num_classes": 10}),
    "relpos_shared_res_post": ("vit_relpos_small_patch16_rpn_224", {"img_size": 64, "depth": 4, "embed_dim": 64,
                                                                    "num_heads": 2, "shared_rel_pos": True,
                                                                    "init_values": 0.5,
                                                                    "rel_pos_type": "bias", "num_classes": 10}),
    # NaFlexVit on image batches: factorized position embedding, registers pooled with the patches (average);
    # SigLIP-2 style attention pooling; RADIO style class token + registers with rotary embeddings
    "naflex_factorized_gap": ("naflexvit_base_patch16_parfac_gap", {**NAFLEX_TINY, "pool_include_prefix": True}),
    "naflex_siglip_map": ("naflexvit_base_patch16_siglip", NAFLEX_TINY),
    "naflex_radio_rotary": ("naflexvit_base_patch16_radio_v3", {**NAFLEX_TINY, "rope_type": "axial"}),
}



def build_family(family: str, seed: int = 0) -> torch.nn.Module:
    name, kwargs = {**FAMILIES, **BLOCK_FAMILIES}[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm starts BEiT's bias tables at zero, RelPosMlp's near: larger, so a wrong gather shows
        for param_name, param in model.named_parameters():
            if param_name.endswith("relative_position_bias_table") or "rel_pos.mlp.fc2" in param_name:
                param.normal_(std=1.0)
    if isinstance(model, NaFlexVit):  # timm ignores img_size next to a position grid; vitprune.create_model records it
        set_image_size(model, kwargs["img_size"])
    return model


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return build_family("vit")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: the test machine's cores are shared, and one thread avoids
    OpenMP oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def labelled_images(tmp_path_factory) -> Path:
    """12 labelled images, 3 classes (index folders), with enough texture to give distinct logits."""
    root = tmp_path_factory.mktemp("labelled_images")
    generator = torch.Generator().manual_seed(0)
    for label in range(3):
        for index in range(4):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8)
            pixels[..., label] = 255 - 40 * index
            path = root / str(label) / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(path)
    return root


@contextlib.contextmanager
def interrupted_after_epoch(monkeypatch, epoch: int):
    """Stop a fine-tuning run with Ctrl-C right after `epoch`'s metrics (and checkpoint) are written;
    the run's own code is restored on leaving, so the test can resume it."""
    import vitprune.finetune.run as finetune_run

    write_metrics = finetune_run.write_metrics_csv

    def crash_after_epoch(rows, path):
        write_metrics(rows, path)
        if rows[-1]["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(finetune_run, "write_metrics_csv", crash_after_epoch)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(finetune_run, "write_metrics_csv", write_metrics)
