"""vitprune show: source tracking (groups partition the patches, kept + dropped = patches, logits
unchanged), the token-map PNG's grid, the cascade exit grid, the CLI's bad inputs, apply's tokens.png."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
from conftest import build_family
from PIL import Image

from vitprune.cascade import build_cascade, parse_stages, save_cascade
from vitprune.cli import run
from vitprune.data import resize_images
from vitprune.patch import apply_plan, record_tokens
from vitprune.plan import Plan, Reduction, make_plan
from vitprune.show import (
    cascade_exits_figure,
    exit_rows,
    token_maps,
    token_maps_figure,
    token_maps_png,
)
from vitprune.show.draw import DPI, grid_inches

IMAGES = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    return build_family("vit")  # 96 px: 36 patches, one class token


def _reduced(model: torch.nn.Module, plan: Plan) -> torch.nn.Module:
    return apply_plan(copy.deepcopy(model), plan)


@pytest.mark.parametrize("family", ["vit", "registers", "gap_no_cls"])
def test_tome_groups_partition_the_patches_at_every_layer(family):
    base = build_family(family)
    model = _reduced(base, make_plan("tome", len(base.blocks), r=4))
    images = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(0))
    maps = token_maps(model, images)
    assert [m.layer for m in maps] == list(range(len(base.blocks)))
    num_patch = maps[0].grid[0] * maps[0].grid[1]
    for tmap in maps:
        assert tmap.merges and tmap.group.shape == (2, num_patch)
        assert (tmap.group >= model.num_prefix_tokens).all() and tmap.kept.all()  # every patch in one patch token
        for image in range(2):  # each patch in exactly one token, and every patch token holds some patch
            groups = tmap.group[image].unique().tolist()
            assert groups == list(range(model.num_prefix_tokens, int(tmap.tokens[image])))
            assert torch.allclose(tmap.share[image], 1 / tmap.group_sizes()[image].float())  # 1/size each


def test_evit_and_ats_kept_plus_dropped_is_every_patch(vit):
    evit = _reduced(vit, make_plan("evit", 12, keep=0.5, layers=[2, 5]))
    ats = _reduced(vit, make_plan("ats", 12, keep=0.6, layers=[3, 4, 5]))
    first, second = token_maps(evit, IMAGES)
    assert (first.kept.sum(1) == 18).all() and (first.fused.sum(1) == 18).all()  # ceil(0.5 * 36) kept
    assert (first.group >= 1).all()  # every dropped patch lives on in the fused token
    assert (second.kept.sum(1) <= 10).all() and (second.kept.sum(1) >= 9).all()  # 10 kept, one may be the fused
    for tmap in (first, second, *token_maps(ats, IMAGES)):
        assert not tmap.merges
        assert ((tmap.kept.sum(1) + tmap.dropped.sum(1)) == 36).all()
        assert not (tmap.kept & tmap.dropped).any()
    for tmap in token_maps(ats, IMAGES):  # ATS keeps whole tokens or none: kept = patch tokens left
        assert (tmap.kept.sum(1) == tmap.tokens - 1).all() and not tmap.fused.any()
        assert ((tmap.group == -1) == tmap.dropped).all()


def test_source_tracking_leaves_the_logits_and_is_off_by_default(vit):
    plan = Plan((Reduction(1, "tome", r=3), Reduction(4, "evit", keep=0.7), Reduction(7, "evit", keep=0.7)))
    model = _reduced(vit, plan)
    with torch.no_grad():
        plain = model(IMAGES)
        with record_tokens(model) as trace:
            model(IMAGES)
        with record_tokens(model, sources=True) as tracked:
            same = model(IMAGES)
    assert torch.allclose(plain, same, rtol=0, atol=1e-5)  # the reducers' decisions are the same
    assert all("source" not in entry for entry in trace) and all("source" in entry for entry in tracked)
    maps = token_maps(model, IMAGES)
    assert [tmap.merges for tmap in maps] == [True, False, False]  # each block in its method's style


def test_png_grid_is_images_by_one_plus_reducing_blocks(vit):
    model = _reduced(vit, make_plan("evit", 12, keep=0.7))  # blocks 3, 6, 9
    figure = token_maps_figure(model, IMAGES[:2])
    assert [ax.get_subplotspec().get_geometry()[:2] for ax in figure.axes] == [(2, 4)] * 8
    assert "layer 6: evit:keep=0.7" in figure.axes[2].get_title()
    png = Image.open(io.BytesIO(token_maps_png(model, IMAGES[:2])))
    width, height = grid_inches(2, 4)
    assert png.size == (round(width * DPI), round(height * DPI))


def test_cascade_grid_groups_images_by_exit_stage(vit):
    base = copy.deepcopy(vit)
    with torch.no_grad():
        base.head.weight.mul_(60)
    cascade = build_cascade(base, parse_stages("48,96", depth=12, base_size=96, patch_size=16))
    images = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(5))
    first = cascade.stages[0](resize_images(images, 48))
    confidence = first.detach().softmax(-1).max(-1).values.sort().values
    cascade.set_thresholds([float(confidence[1] + confidence[2]) / 2])  # 3 of 5 leave at stage 1
    exits = cascade.run(images).exit_stage
    counts = [int((exits == index).sum()) for index in range(2)]
    figure = cascade_exits_figure(cascade, images)
    columns = max(counts)
    assert len(figure.axes) == sum(exit_rows(counts)) * columns
    assert sum(len(ax.images) for ax in figure.axes) == 5
    labels = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    assert [f"{counts[i]} of 5 images exit here" in labels[i] for i in range(2)] == [True, True]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("show_images")
    for i in range(3):
        Image.new("RGB", (40, 36), (60 * i, 200 - 50 * i, 90)).save(root / f"im{i}.png")
    return root


@pytest.mark.slow
def test_cli_writes_the_png_and_refuses_bad_input(image_dir, tmp_path, capsys):
    args = ["show", "vit_tiny", "--no-pretrained", "--img-size", "32", "--method", "tome", "--r", "2",
            "--data", str(image_dir), "--workers", "0"]
    out = tmp_path / "show.png"
    assert run([*args, "-o", str(out)]) == 0
    assert Image.open(out).size == tuple(round(v * DPI) for v in grid_inches(3, 13))  # 12 blocks merge
    capsys.readouterr()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not an image")
    cases = [([*args, "-o", str(out)], "already exists; pass --force"),
             ([*args[:-4], "--data", str(tmp_path / "missing"), "-o", str(tmp_path / "a.png")], "not found"),
             ([*args[:-4], "--data", str(broken), "-o", str(tmp_path / "b.png")], "cannot read image"),
             ([*args, "-o", str(tmp_path / "c.jpg")], "must be a .png file")]
    for argv, message in cases:
        assert run(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not any((tmp_path / name).exists() for name in ("a.png", "b.png", "c.jpg"))


def test_cli_draws_a_cascade_folder(vit, image_dir, tmp_path, capsys):
    info = {"model": "vit_tiny_patch16_224", "tag": None, "checkpoint": None, "checkpoint_sha256": None}
    base = build_family("vit")
    cascade = build_cascade(base, parse_stages("64,96:evit:0.7", depth=12, base_size=96, patch_size=16),
                            thresholds=[math.inf], info=info)
    save_cascade(tmp_path / "c", cascade, info)
    out = tmp_path / "exits.png"
    assert run(["show", str(tmp_path / "c"), "--data", str(image_dir), "-o", str(out), "--workers", "0"]) == 0
    assert out.stat().st_size > 0  # threshold +inf: all three exit at the last stage, one row of three
    assert Image.open(out).size[0] > Image.open(out).size[1]
    assert run(["show", str(tmp_path / "c"), "--method", "tome", "--data", str(image_dir), "-o",
                str(tmp_path / "x.png")]) == 2
    assert "--method does not apply to a cascade folder" in capsys.readouterr().err


@pytest.mark.slow
def test_apply_writes_tokens_png_linked_from_the_report(image_dir, tmp_path):
    out = tmp_path / "art"
    assert run(["apply", "vit_tiny", "--no-pretrained", "--img-size", "32", "--method", "evit", "--keep", "0.7",
                "--data", str(image_dir), "--workers", "0", "-o", str(out)]) == 0
    assert Image.open(out / "tokens.png").size == tuple(round(v * DPI) for v in grid_inches(3, 4))
    assert "![Token maps" in (out / "report.md").read_text() and "(tokens.png)" in (out / "report.md").read_text()
