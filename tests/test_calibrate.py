"""`vitprune calibrate`: the search meets its budget, holds images out, writes a plan `apply --plan` takes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune
import vitprune.calibrate.images as calibrate_images
from vitprune.budget import Budget
from vitprune.calibrate import PROTECT_WEIGHTS, Score, Shape, pareto_mask, shape_plan
from vitprune.cli import run
from vitprune.commands.calibrate import CalibrateRequest, run_calibrate
from vitprune.errors import VitpruneError
from vitprune.patch import plan_of

TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "64"]
FAST = ["--img-sizes", "64,48", "--search-images", "4", "--refine-steps", "2", "--bench-repeats", "1",
        "--bench-batch", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(10):
        pixels = (rng.random((48, 48, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"image{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def calibrated(image_dir, tmp_path_factory) -> Path:
    """One calibration on a tiny random model, shared by the tests that read its output."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs") / "calibrated"
    code = run(["calibrate", *TINY, "--data", str(image_dir), "--target-ratio", "0.6", *FAST, "-o", str(out)])
    assert code == 0
    return out


@pytest.mark.slow
def test_search_meets_the_budget_and_writes_everything(calibrated):
    report = json.loads((calibrated / "report.json").read_text())
    cal = report["calibration"]
    assert report["gmacs"] <= 0.6 * report["gmacs_base"] + 1e-9
    assert report["gmacs_reduction"] >= 0.4 - 1e-6
    assert cal["objective"] == "kl" and cal["budget"]["kind"] == "ratio"
    assert cal["images"] == {"total": 10, "calibration": 5, "holdout": 5, "search_subset": 4, "validation": 5,
                             "validation_disjoint": False, "labelled": False, "holdout_fraction": 0.5, "seed": 0, "swap_split": False, "points_per_holdout_image": 20.0}
    assert cal["frontier"] and any(row["pareto"] for row in cal["frontier"])
    assert {row["name"] for row in cal["references"]} == {"evit:keep=0.7@3,6,9", "tome:r=8@0-11", "tome:r=13@0-11",
                                                        "tome:r=16@0-11"}
    for row in cal["frontier"] + cal["references"]:
        assert row["ms_per_image"] > 0 and row["holdout"]["n_images"] == 5
    assert cal["search_seconds"] > 0
    assert (calibrated / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Frontier (held-out images)" in (calibrated / "report.md").read_text()


@pytest.mark.slow  # its fixture runs a calibration (10 s)
def test_output_loads_as_an_artifact(calibrated):
    metadata = json.loads((calibrated / "vitprune.json").read_text())
    model = vitprune.load(calibrated)
    assert plan_of(model).to_dict()["reductions"] == metadata["plan"]["reductions"]
    assert metadata["plan"]["notes"]["calibrated"]["budget"]["kind"] == "ratio"
    size = metadata["model"]["img_size"]
    assert model(torch.randn(2, 3, size, size)).shape == (2, 1000)
    # a class-token model: every calibrated plan computes only the class token in the last block
    assert metadata["plan"]["head_only"] is True and plan_of(model).head_only
    assert json.loads((calibrated / "report.json").read_text())["calibration"]["head_only"] is True


@pytest.mark.slow  # its fixture runs a calibration (10 s)
def test_protect_weight_is_chosen_on_the_calibration_images_and_used_by_every_tome_block(calibrated):
    report = json.loads((calibrated / "report.json").read_text())
    protect = report["calibration"]["tome_protect"]
    assert protect["given"] is False and [t["protect"] for t in protect["tried"]] == list(PROTECT_WEIGHTS)
    assert protect["chosen"] == min(protect["tried"], key=lambda t: t["kl"])["protect"]  # objective: KL
    tome_rows = [red for row in report["calibration"]["frontier"] for red in row["reductions"] if red["method"] == "tome"]
    assert {red["protect"] for red in tome_rows} <= {protect["chosen"]}  # every ToMe block carries the chosen weight
    assert "protect weight" in (calibrated / "report.md").read_text()


@pytest.mark.slow
def test_a_given_protect_weight_is_used_as_is(image_dir):
    torch.manual_seed(0)
    result = run_calibrate(CalibrateRequest(
        model="vit_tiny_patch16_224", data=image_dir, budget=Budget("ratio", 0.7), no_pretrained=True,
        img_size=64, img_sizes=[64], protect=0.0, search_images=3, refine_steps=1, bench_repeats=1, progress=False,
    ))
    assert result.report["calibration"]["tome_protect"] == {"chosen": 0.0, "given": True, "tried": []}
    assert all(red.settings.get("protect", 0.0) == 0.0 for red in result.plan.reductions)  # evit has no protect


@pytest.mark.slow
def test_apply_takes_the_calibrated_plan(calibrated, image_dir, tmp_path, capsys):
    report = json.loads((calibrated / "report.json").read_text())
    out = tmp_path / "applied"
    code = run(["apply", *TINY, "--plan", str(calibrated / "vitprune.json"), "--data", str(image_dir),
                "-o", str(out), "--json"])
    assert code == 0
    applied = json.loads((out / "report.json").read_text())
    # apply names the --img-size it was given; the reductions are the calibrated ones.
    assert applied["plan"] == report["plan"] + "+64px"
    assert {k: v for k, v in applied["params"].items() if k != "img_size"} == report["params"]
    assert applied["gmacs"] == pytest.approx(report["gmacs"], abs=1e-4)  # EViT/ToMe GMACs do not depend on weights
    assert json.loads(capsys.readouterr().out)["gmacs"] == applied["gmacs"]


@pytest.mark.slow
def test_holdout_is_disjoint_from_calibration(image_dir, monkeypatch):
    monkeypatch.setattr(calibrate_images, "MIN_VALIDATION_IMAGES", 4)  # the 7 calibration images leave 4 beside the search
    torch.manual_seed(0)
    result = run_calibrate(CalibrateRequest(
        model="vit_tiny_patch16_224", data=image_dir, budget=Budget("ratio", 0.7), no_pretrained=True,
        img_size=64, img_sizes=[64], holdout=0.3, search_images=3, refine_steps=1, bench_repeats=1, progress=False,
    ))
    calibration, holdout = set(result.calibration_files), set(result.holdout_files)
    assert not calibration & holdout
    assert len(calibration | holdout) == 10 and len(holdout) == 3
    swapped = run_calibrate(CalibrateRequest(
        model="vit_tiny_patch16_224", data=image_dir, budget=Budget("ratio", 0.7), no_pretrained=True,
        img_size=64, img_sizes=[64], holdout=0.3, swap_split=True, search_images=3, refine_steps=0, bench_repeats=1,
        progress=False,
    ))
    assert set(swapped.calibration_files) == holdout and set(swapped.holdout_files) == calibration
    assert result.report["calibration"]["chosen"]["holdout"]["n_images"] == 3
    # Finalists are re-ranked on the calibration images the search did not run on, when enough are left.
    images = result.report["calibration"]["images"]
    assert (images["search_subset"], images["validation"], images["validation_disjoint"]) == (3, 4, True)
    assert all(row["validation"]["n_images"] == 4 for row in result.report["calibration"]["frontier"])
    images = swapped.report["calibration"]["images"]
    assert (images["search_subset"], images["validation"], images["validation_disjoint"]) == (3, 3, False)
    assert result.report["gmacs"] <= 0.7 * result.report["gmacs_base"] + 5e-5  # the report rounds to 4 decimals


@pytest.mark.parametrize("budget_args, message", [
    ([], "give a budget"),
    (["--target-ratio", "0.5", "--target-gmacs", "1"], "give one budget"),
    (["--target-ratio", "0"], "must be in (0, 1]"),
    (["--target-ratio", "1.2"], "must be in (0, 1]"),
    (["--target-gmacs", "0.000001"], "out of reach"),
    (["--max-drop", "-1"], "--max-drop must be zero or more points"),
    (["--target-ratio", "0.5", "--protect", "-0.1"], "--protect must be a finite weight"),
    (["--target-ratio", "0.5", "--holdout", "1"], "--holdout must be a fraction in (0, 1)"),
    (["--target-ratio", "0.5", "--objective", "loss"], "--objective must be one of kl, agreement, top1"),
])
def test_bad_budgets_exit_2_and_write_nothing(budget_args, message, image_dir, tmp_path, capsys):
    out = tmp_path / "never"
    code = run(["calibrate", *TINY, "--data", str(image_dir), *budget_args, *FAST, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_empty_image_folder_exits_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = run(["calibrate", *TINY, "--data", str(empty), "--target-ratio", "0.5", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no images found" in err[0]
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(image_dir, tmp_path, capsys):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "vitprune.json").write_text("{}")
    code = run(["calibrate", *TINY, "--data", str(image_dir), "--target-ratio", "0.6", *FAST, "-o", str(existing)])
    assert code == 2 and "--force" in capsys.readouterr().err


def test_shape_plan_respects_method_limits():
    shape = Shape(224, ("tome", "evit", None, "tome"), (1.0, 1.0, 1.0, 1.0), "test")
    plan = shape_plan(shape, scale=1000.0, num_tokens=197, num_prefix=1)
    tome0, evit1, tome3 = plan.reductions
    assert tome0.r == 98  # at most half the 196 patch tokens
    assert evit1.keep == pytest.approx(0.2, abs=0.01)  # never below evit.MIN_SEARCH_KEEP
    assert tome3.layer == 3 and tome3.r <= (1 + 20 + 1) // 2
    plan.validate(4)
    assert shape_plan(shape, scale=0.0, num_tokens=197, num_prefix=1).reductions == ()


def test_pareto_mask_and_budget_checks():
    assert pareto_mask([(1.0, (0.1,)), (0.8, (0.2,)), (0.9, (0.3,)), (0.8, (0.2,))]) == [True, True, False, True]
    assert Budget.from_targets(target_latency_ms=12, batch=8).batch == 8
    with pytest.raises(VitpruneError, match="batch"):
        Budget.from_targets(target_latency_ms=12, batch=0)


def test_paired_gain_separates_a_real_gain_from_noise():
    def score(kl):
        kl = torch.tensor(kl, dtype=torch.float64)
        return Score(gmacs=1.0, kl=float(kl.mean()), agreement=100.0, top1=None, n_images=len(kl),
                     per_image={"kl": kl, "disagree": torch.zeros_like(kl)})
    tome = score([0.10, 0.20, 0.30, 0.40] * 25)
    gain, error = score([0.08, 0.18, 0.28, 0.38] * 25).paired_gain(tome, "kl")  # better on every image
    assert gain == pytest.approx(0.02) and gain > 2 * error
    gain, error = score([0.05, 0.25, 0.25, 0.43] * 25).paired_gain(tome, "kl")  # better on average, by luck
    assert 0 < gain < 2 * error


def test_shape_plans_leave_the_last_block_to_head_only():
    shape = Shape(224, ("tome",) * 12, (1.0,) * 12, "constant")
    plan = shape_plan(shape, 8, num_tokens=197, num_prefix=1, head_only=True)
    assert plan.head_only and plan.layers == list(range(11))
    assert shape_plan(shape, 8, num_tokens=197, num_prefix=1).layers == list(range(12))


@pytest.mark.parametrize("field, value", [("search_images", 0), ("refine_steps", -1), ("bench_repeats", 0),
                                          ("holdout", 0.0), ("objective", "loss"), ("protect", float("nan")),
                                          ("img_sizes", [64, 0]), ("img_sizes", [64, 50])])
def test_bad_requests_name_their_parameter(field, value, image_dir):
    request = CalibrateRequest(model="vit_tiny_patch16_224", data=image_dir, budget=Budget("ratio", 0.5),
                               no_pretrained=True, img_size=64, progress=False, **{field: value})
    with pytest.raises(VitpruneError, match=field) as caught:
        run_calibrate(request)
    assert caught.value.param == field


@pytest.mark.slow
def test_a_ratio_of_one_keeps_every_block_whole(image_dir):
    torch.manual_seed(0)
    result = run_calibrate(CalibrateRequest(
        model="vit_tiny_patch16_224", data=image_dir, budget=Budget("ratio", 1.0), no_pretrained=True,
        img_size=64, img_sizes=[64], protect=0.0, search_images=3, refine_steps=1, bench_repeats=1, progress=False,
    ))
    report = result.report
    assert report["gmacs"] <= report["gmacs_base"] + 1e-9
    assert report["calibration"]["target_gmacs"] == report["gmacs_base"]
    assert result.plan.reductions == () and result.plan.head_only  # the head-only last block alone fits
    assert report["calibration"]["frontier"]
