"""DVT cascade: stage grammar, batched gather/scatter, calibration to a budget, GMACs accounting,
artifact round trip, CLI errors."""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import vitprune
from vitprune.cascade import (
    CascadeModel,
    StageTable,
    build_cascade,
    calibrate_thresholds,
    confidence,
    evaluate,
    load_cascade,
    parse_stages,
    save_cascade,
    simulate,
    stage_table,
)
from vitprune.data import resize_images
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs
from vitprune.patch import model_img_size, plan_of

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_IMAGES = SHARED_DATA / "images" / "imagenet-sample-images"
VIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    """A random vit_tiny at 64 px whose head is scaled up, so confidences spread out."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    with torch.no_grad():
        model.head.weight.mul_(60)
    return model


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _midpoint_threshold(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring confidences: float noise cannot flip a decision."""
    ordered = values.sort().values
    k = max(1, min(len(ordered) - 1, int(len(ordered) * quantile)))
    return float((ordered[k - 1] + ordered[k]) / 2)


# ---------------------------------------------------------------- grammar

def test_parse_sizes_only() -> None:
    plans = parse_stages("112, 160px,224", depth=12, base_size=224)
    assert [p.img_size for p in plans] == [112, 160, 224]
    assert all(not p.reductions for p in plans)


def test_parse_plans_at_model_size() -> None:
    plans = parse_stages("evit:0.5,evit:0.7,none", depth=12, base_size=224)
    assert [p.img_size for p in plans] == [224, 224, 224]
    assert [p.method for p in plans] == ["evit", "evit", "none"]
    assert plans[0].layers == [3, 6, 9] and {r.keep for r in plans[1].reductions} == {0.7}


def test_parse_mixed_forms() -> None:
    plans = parse_stages("160:evit:0.7,tome:13,ats:0.5,224:none", depth=12, base_size=224)
    assert [p.img_size for p in plans] == [160, 224, 224, 224]
    assert [p.method for p in plans] == ["evit", "tome", "ats", "none"]
    assert plans[1].reductions[0].r == 13 and len(plans[1].reductions) == 12


def test_stages_are_plan_lines_and_print_back() -> None:
    text = "tome:r=8,protect=0.2@0-5+evit:keep=0.7@6,9+head-only+160px; ppt:r=40,threshold=0.0001@3,6,9+224px"
    plans = parse_stages(text, depth=12, base_size=224)
    assert plans[0].img_size == 160 and plans[0].head_only and plans[0].layers == [0, 1, 2, 3, 4, 5, 6, 9]
    assert "; ".join(plan.describe() for plan in plans) == text
    assert parse_stages("; ".join(plan.describe() for plan in plans), depth=12, base_size=224) == plans


@pytest.mark.parametrize("text, fragment", [
    ("", "no stages"),
    ("224", "at least 2 stages"),
    ("112,,224", "empty stage"),
    ("abc,224", "unknown method 'abc'"),
    ("evit,224", "evit needs keep"),
    ("evit:0.5:3,224", "evit keep must be a number in (0, 1], got '0.5:3'"),
    ("evit:x,224", "evit keep must be a number in (0, 1], got 'x'"),
    ("evit:nan,224", "evit keep must be a number in (0, 1], got nan"),
    ("evit:1.5,224", "evit keep must be a number in (0, 1]"),
    ("tome:2.5,224", "tome r must be a whole number in [0, 1000000], got 2.5"),
    ("tome:-1,224", "tome r must be a whole number in [0, 1000000]"),
    ("tome:r=8@0-5+evit:keep=0.7@5;224px", "a layer appears twice"),
    ("tome:r=8,q=1;224px", "q is not a parameter of tome (it takes r, protect)"),
    ("100,224", "multiple of the patch size 16"),
    ("0,224", "multiple of the patch size"),
    ("-16,224", "not a whole input size"),
    ("1.5e2,224", "not a whole input size"),
    ("112,112", "appears twice"),
    ("evit:0.7,224:evit:0.7", "appears twice"),
    ("evit:0.7;evit:keep=0.7@3,6,9+224px", "appears twice"),
])
def test_parse_bad_grammar(text: str, fragment: str) -> None:
    with pytest.raises(VitpruneError, match=None) as caught:
        parse_stages(text, depth=12, base_size=224)
    message = str(caught.value)
    assert fragment in message and "\n" not in message


# ---------------------------------------------------------------- the module

def test_stages_share_weights_and_own_pos_embed(base: torch.nn.Module) -> None:
    cascade = build_cascade(base, parse_stages("32,48:tome:2,64", depth=12, base_size=64))
    small, middle, full = cascade.stages
    assert small.blocks[0].attn.qkv.weight is base.blocks[0].attn.qkv.weight
    assert full.pos_embed is base.pos_embed  # same size: even the position embedding is shared
    assert small.pos_embed.shape[1] == 1 + 4 and middle.pos_embed.shape[1] == 1 + 9
    assert model_img_size(base) == 64 and plan_of(base) is None  # the base is left as it was
    assert cascade.input_size == 64 and cascade.stage_sizes == [32, 48, 64]


def test_batched_equals_each_image_alone(base: torch.nn.Module, images: torch.Tensor) -> None:
    cascade = build_cascade(base, parse_stages("32,48:evit:0.5,64", depth=12, base_size=64))
    with torch.no_grad():
        first = confidence(cascade.stages[0](resize_images(images, 32)))
        second = confidence(cascade.stages[1](resize_images(images, 48)))
    cascade.set_thresholds([_midpoint_threshold(first, 0.6), _midpoint_threshold(second, 0.5)])
    with torch.no_grad():
        batched = cascade.run(images)
        for i in range(len(images)):
            one = images[i:i + 1]
            for stage_index, (stage, size) in enumerate(zip(cascade.stages, cascade.stage_sizes, strict=True)):
                logits = stage(resize_images(one, size))
                last = stage_index == len(cascade.stages) - 1
                if last or float(confidence(logits)) >= cascade.thresholds[stage_index]:
                    break
            assert int(batched.exit_stage[i]) == stage_index
            torch.testing.assert_close(batched.logits[i:i + 1], logits, atol=2e-4, rtol=1e-4)
    assert set(batched.exit_stage.tolist()) == {0, 1, 2}  # the test exercises every stage
    assert torch.equal(cascade(images), batched.logits)


def test_all_images_leave_early(base: torch.nn.Module, images: torch.Tensor) -> None:
    cascade = build_cascade(base, parse_stages("32,64", depth=12, base_size=64), thresholds=[0.0])
    with torch.no_grad():
        run = cascade.run(images, count_macs=True)
        assert torch.equal(run.logits, cascade.stages[0](resize_images(images, 32)))
    assert run.exit_stage.tolist() == [0] * len(images)
    assert torch.allclose(run.gmacs_per_image, torch.tensor(cascade.stage_gmacs[0], dtype=torch.float64))


def test_gmacs_counted_from_the_stages_each_image_ran(base: torch.nn.Module, images: torch.Tensor) -> None:
    cascade = build_cascade(base, parse_stages("32,64:ats:0.9,64:tome:3", depth=12, base_size=64))
    assert cascade.stage_gmacs[0] == pytest.approx(count_macs(cascade.stages[0]).gmacs)
    with torch.no_grad():
        first = confidence(cascade.stages[0](resize_images(images, 32)))
        second = confidence(cascade.stages[1](images))
        leave_first = _midpoint_threshold(first, 0.7)
        cascade.set_thresholds([leave_first, _midpoint_threshold(second[first < leave_first], 0.5)])
        run = cascade.run(images, count_macs=True)
    assert set(run.exit_stage.tolist()) == {0, 1, 2}
    stage_cost = [
        torch.full((len(images),), cascade.stage_gmacs[0], dtype=torch.float64),
        count_macs(cascade.stages[1], images).gmacs_per_image,  # ATS: per image
        torch.full((len(images),), cascade.stage_gmacs[2], dtype=torch.float64),
    ]
    expected = torch.stack(stage_cost).cumsum(0).gather(0, run.exit_stage[None])[0]
    torch.testing.assert_close(run.gmacs_per_image, expected)
    assert stage_cost[1].unique().numel() > 1  # ATS: the cost of stage 2 differs per image
    # the cached table, simulated, gives the same exits and costs as running the module
    table = stage_table(cascade, images, progress=False)
    exits, spent = simulate(table, torch.tensor([cascade.thresholds]))
    assert torch.equal(exits[0], run.exit_stage)
    torch.testing.assert_close(spent[0], run.gmacs_per_image)


# ---------------------------------------------------------------- calibration

def _random_table(stages: int, images: int, seed: int) -> tuple[StageTable, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    conf = torch.rand(stages, images, generator=generator)
    labels = torch.randint(0, 3, (images,), generator=generator)
    # later stages are right more often; confident images are right more often
    right = torch.rand(stages, images, generator=generator) < (0.3 + 0.2 * torch.arange(stages)[:, None] + 0.3 * conf)
    prediction = torch.where(right, labels[None], (labels[None] + 1) % 3)
    costs = torch.tensor([0.3, 0.6, 1.2, 1.5][:stages], dtype=torch.float64)[:, None].expand(stages, images).clone()
    return StageTable(conf, prediction, costs), labels


def _brute_force(table: StageTable, labels: torch.Tensor, budget: float) -> tuple[int, float]:
    options = [torch.cat([c.unique(), torch.tensor([math.inf])]).tolist() for c in table.confidence[:-1]]
    best = (-1, math.inf)
    for combo in itertools.product(*options):
        exits, spent = simulate(table, torch.tensor([combo]))
        cost = float(spent.mean())
        right = int((table.prediction.gather(0, exits)[0] == labels).sum())
        if cost <= budget + 1e-9 and (right, -cost) > (best[0], -best[1]):
            best = (right, cost)
    return best


@pytest.mark.parametrize("stages, budget", [(2, 0.7), (3, 0.9), (3, 0.45)])
def test_thresholds_meet_the_budget_with_the_best_accuracy(stages: int, budget: float) -> None:
    table, labels = _random_table(stages, 24, seed=stages)
    found = calibrate_thresholds(table, labels, budget)
    exits, spent = simulate(table, torch.tensor([found.thresholds]))
    assert float(spent.mean()) <= budget + 1e-9
    assert found.mean_gmacs == pytest.approx(float(spent.mean()))
    right = int((table.prediction.gather(0, exits)[0] == labels).sum())
    assert found.accuracy == pytest.approx(100 * right / 24)
    assert (right, found.mean_gmacs) == pytest.approx(_brute_force(table, labels, budget))
    assert sum(found.exit_fraction) == pytest.approx(1.0)


def test_budget_below_the_first_stage_is_refused() -> None:
    table, labels = _random_table(2, 10, seed=0)
    with pytest.raises(VitpruneError, match="below the first stage"):
        calibrate_thresholds(table, labels, 0.2)


def test_evaluate_reports_exit_histogram() -> None:
    table, labels = _random_table(3, 20, seed=5)
    figures = evaluate(table, [2.0, -1.0], labels, labels)  # nobody leaves at 1, everybody at 2
    assert [e["images"] for e in figures["exits"]] == [0, 20, 0]
    assert figures["gmacs"] == pytest.approx(0.9)
    assert figures["top1"] == figures["agreement"]


# ---------------------------------------------------------------- artifact

def test_artifact_round_trip(base: torch.nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    info = {"model": "vit_tiny_patch16_224", "tag": None, "checkpoint": None, "checkpoint_sha256": None}
    cascade = build_cascade(base, parse_stages("32,48:tome:2,64", depth=12, base_size=64), criterion="entropy",
                            info=info)
    with torch.no_grad():
        first = confidence(cascade.stages[0](resize_images(images, 32)), "entropy")
        cascade.set_thresholds([_midpoint_threshold(first, 0.5), math.inf])
    save_cascade(tmp_path / "c", cascade, info, report={"x": 1}, report_md="# r\n")
    loaded = vitprune.load(tmp_path / "c")
    assert isinstance(loaded, CascadeModel)
    assert loaded.thresholds == cascade.thresholds and loaded.criterion == "entropy"
    assert [p.to_dict() for p in loaded.plans] == [p.to_dict() for p in cascade.plans]
    with torch.no_grad():
        assert torch.equal(loaded(images), cascade(images))
    metadata = json.loads((tmp_path / "c" / "cascade.json").read_text())
    assert metadata["stages"][1]["threshold"] is None  # +inf: nobody leaves at stage 2
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c" / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(base.state_dict())  # the weights once, not per stage
    with pytest.raises(VitpruneError, match="already exists"):
        save_cascade(tmp_path / "c", cascade, info)


def test_load_refuses_a_broken_cascade(tmp_path: Path) -> None:
    (tmp_path / "cascade.json").write_text("{not json")
    with pytest.raises(VitpruneError, match="cannot read"):
        load_cascade(tmp_path)
    with pytest.raises(VitpruneError, match="no cascade.json"):
        load_cascade(tmp_path / "missing")


@pytest.fixture(scope="module")
def cascade_json(base: torch.nn.Module) -> dict:
    """cascade.json of a three-stage cascade (the folder needs no weights: the file is checked first)."""
    from vitprune.cascade import cascade_metadata

    info = {"model": "vit_tiny_patch16_224", "tag": None, "checkpoint": None, "checkpoint_sha256": None}
    cascade = build_cascade(base, parse_stages("32,48,64", depth=12, base_size=64), thresholds=[0.5, 0.6], info=info)
    return cascade_metadata(cascade, info)


def _set(data: dict, path: tuple, value: object) -> None:
    """data[path[0]][path[1]]... = value; the value DELETE removes the key."""
    for key in path[:-1]:
        data = data[key]
    if value is DELETE:
        del data[path[-1]]
    else:
        data[path[-1]] = value


DELETE = object()


@pytest.mark.parametrize("path, value, fragment", [
    (("stages", 1, "threshold"), "abc", "stages[1].threshold must be a number or null, got 'abc'"),
    (("stages", 0, "threshold"), DELETE, "stages[0].threshold is missing"),
    (("stages", 2, "gmacs"), None, "stages[2].gmacs must be a number >= 0, got None"),
    (("stages", 1, "plan"), "evit:0.5", "stages[1].plan: a plan must be a JSON object, got str"),
    (("stages", 1, "plan", "reductions"), [{"layer": 3, "method": "nope"}], "stages[1].plan: reductions[0].method"),
    (("stages", 0), [1, 2], "stages[0] must be an object, got [1, 2]"),
    (("stages",), [], "stages must be a list of at least 2 stages, got []"),
    (("stages",), DELETE, "stages is missing"),
    (("model",), DELETE, "model is missing"),
    (("model", "img_size"), "64", "model.img_size must be a whole number >= 1, got '64'"),
    (("model", "name"), 7, "model.name must be a timm model name, got 7"),
    (("criterion",), "margin", "criterion must be maxprob or entropy, got 'margin'"),
    (("format",), 2, "has format 2; this vitprune reads format 1"),
])
def test_a_broken_cascade_json_is_refused_naming_the_file_and_field(cascade_json: dict, tmp_path: Path, path: tuple,
                                                                    value: object, fragment: str) -> None:
    from vitprune.cascade import read_cascade_metadata

    metadata = copy.deepcopy(cascade_json)
    _set(metadata, path, value)
    (tmp_path / "cascade.json").write_text(json.dumps(metadata))
    for read in (read_cascade_metadata, load_cascade, vitprune.load):
        with pytest.raises(VitpruneError) as caught:
            read(tmp_path)
        assert str(caught.value).startswith(str(tmp_path / "cascade.json")) and fragment in str(caught.value)


@pytest.mark.parametrize("content", ["[1, 2]", "null", "\"cascade\""])
def test_a_cascade_json_that_is_no_object_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "cascade.json").write_text(content)
    with pytest.raises(VitpruneError, match=r"cascade\.json: must be a JSON object, got "):
        load_cascade(tmp_path)


def test_cascade_json_is_strict_json(base: torch.nn.Module, tmp_path: Path) -> None:
    info = {"model": "vit_tiny_patch16_224", "tag": None, "checkpoint": None, "checkpoint_sha256": None}
    cascade = build_cascade(base, parse_stages("32,64", depth=12, base_size=64), thresholds=[math.inf], info=info)
    save_cascade(tmp_path / "c", cascade, info)
    text = (tmp_path / "c" / "cascade.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text)["stages"][0]["threshold"] is None


# ---------------------------------------------------------------- CLI

def _image_folder(root: Path, count: int = 6) -> Path:
    root.mkdir()
    for i in range(count):
        Image.new("RGB", (48, 40), (30 * i, 255 - 30 * i, 90)).save(root / f"im{i}.png")
    return root


@pytest.mark.parametrize("extra, fragment", [
    (["--stages", "112,abc", "--target-ratio", "0.6"], "unknown method 'abc'"),
    (["--stages", "112,224", "--target-ratio", "0.6", "--target-gmacs", "0.5"], "give one budget, not several"),
    (["--stages", "112,224"], "give a budget: --target-gmacs or --target-ratio"),
    (["--stages", "112,224", "--target-ratio", "1.5"], "--target-ratio is a fraction of the base GMACs and must be in"),
    (["--stages", "112,224", "--target-gmacs", "0.01"], "below the first stage"),
    (["--stages", "112,224", "--target-ratio", "0.6", "--holdout", "1"], "--holdout"),
    (["--stages", "112,224", "--target-ratio", "0.6", "--criterion", "margin"], "unknown --criterion"),
])
def test_cli_bad_input_exits_2_with_one_line(extra: list[str], fragment: str, tmp_path: Path, capsys) -> None:
    from vitprune.cli import run

    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    code = run(["cascade", "vit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--no-frontier",
                "-o", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and fragment in err and "\n" not in err
    assert not out.exists()


def test_cli_refuses_a_class_index_the_model_lacks_before_building_stages(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    from vitprune.cli import run
    from vitprune.commands import cascade as command

    data = _image_folder(tmp_path / "imgs")
    (data / "labels.csv").write_text("file,class_index\n" + "".join(
        f"im{i}.png,{5000 if i == 3 else i}\n" for i in range(6)))
    monkeypatch.setattr(command, "build_cascade", lambda *args, **kwargs: pytest.fail("stages were built first"))
    out = tmp_path / "out"
    code = run(["cascade", "vit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--stages", "64,112",
                "--target-ratio", "0.6", "--no-frontier", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err
    assert str(data / "im3.png") in err and "5000" in err and "1000 classes" in err
    assert not out.exists()


@pytest.mark.parametrize("changes, param", [
    ({"criterion": "margin"}, "criterion"),
    ({"holdout": 1.0}, "holdout"),
    ({"batch_size": 0}, "batch_size"),
    ({"workers": -1}, "workers"),
    ({"target_ratio": 1.5}, "target_ratio"),
    ({"target_ratio": None, "target_gmacs": -1.0}, "target_gmacs"),
    ({"target_gmacs": 0.5}, ("target_gmacs", "target_ratio")),  # two budgets: both are named
    ({"onnx": True}, "output"),
])
def test_request_checked_before_any_model(changes: dict, param: str | tuple[str, ...] | None, tmp_path: Path, monkeypatch) -> None:
    import dataclasses

    from vitprune.commands import cascade as command

    monkeypatch.setattr(command, "load_base", lambda *args, **kwargs: pytest.fail("a model was built first"))
    request = command.CascadeRequest(model="vit_tiny_patch16_224", stages="64,112", data=tmp_path, target_ratio=0.5,
                                     no_pretrained=True)
    with pytest.raises(VitpruneError) as caught:
        command.run_cascade(dataclasses.replace(request, **changes))
    assert caught.value.param == param
    assert all(name in str(caught.value) for name in caught.value.params)


@pytest.mark.slow
def test_cli_writes_a_loadable_cascade(tmp_path: Path, capsys) -> None:
    from vitprune.cli import run

    data = _image_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    code = run(["cascade", "vit_tiny_patch16_224", "--no-pretrained", "--data", str(data), "--stages", "64,112",
                "--target-ratio", "0.3", "--no-frontier", "--holdout", "0.5", "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["holdout"]["n_images"] == 3 and not report["data"]["labelled"]
    assert report["calibration"]["mean_gmacs"] <= report["budget"]["gmacs"] + 1e-9
    assert sorted(p.name for p in out.iterdir()) == ["cascade.json", "curve.png", "model.safetensors",
                                                     "report.json", "report.md"]
    cascade = vitprune.load(out)
    assert isinstance(cascade, CascadeModel) and cascade.stage_sizes == [64, 112]
    assert cascade.thresholds == [report["stages"][0]["threshold"]]


# ---------------------------------------------------------------- real weights (skipped without ../shared)

@pytest.mark.slow
@pytest.mark.skipif(not VIT_TINY_WEIGHTS.is_file(), reason="shared weights not present")
def test_real_weights_cascade_runs_batched_within_budget() -> None:
    from vitprune.data import find_images, load_images, transform_for
    from vitprune.models import create_model

    torch.set_num_threads(1)
    model, _ = create_model("vit_tiny_patch16_224", checkpoint=VIT_TINY_WEIGHTS)
    image_set = find_images(SAMPLE_IMAGES, limit=48)
    images, labels = load_images(image_set, transform_for(model), num_workers=0, progress=False)
    cascade = build_cascade(model, parse_stages("160,224", depth=12, base_size=224))
    table = stage_table(cascade, images, progress=False)
    budget = 0.8 * count_macs(model).gmacs
    found = calibrate_thresholds(table, labels, budget)
    cascade.set_thresholds(found.thresholds)
    with torch.no_grad():
        run = cascade.run(images, count_macs=True)
    assert float(run.gmacs_per_image.mean()) <= budget + 1e-6
    assert 100 * float((run.logits.argmax(1) == labels).double().mean()) == pytest.approx(found.accuracy)
    # the cascade is at least as right as its own first stage alone on the calibration images
    assert found.accuracy >= 100 * float((table.prediction[0] == labels).double().mean())


# ---------------------------------------------------------------- ONNX

@pytest.mark.slow
def test_onnx_cascade_matches_pytorch(base: torch.nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    from vitprune.cascade import OnnxCascade, export_cascade_onnx

    cascade = build_cascade(base, parse_stages("32,48:tome:2,64:evit:0.7", depth=12, base_size=64))
    with torch.no_grad():
        first = confidence(cascade.stages[0](resize_images(images, 32)))
        second = confidence(cascade.stages[1](resize_images(images, 48)))
        leave_first = _midpoint_threshold(first, 0.5)
        cascade.set_thresholds([leave_first, _midpoint_threshold(second[first < leave_first], 0.5)])
        expected = cascade.run(images)
    export_cascade_onnx(cascade, tmp_path / "onnx")
    manifest = json.loads((tmp_path / "onnx" / "cascade_onnx.json").read_text())
    assert [s["file"] for s in manifest["stages"]] == ["stage1.onnx", "stage2.onnx", "stage3.onnx"]
    runner = OnnxCascade(tmp_path / "onnx", provider="cpu", threads=1)
    logits, exits = runner.run(images.numpy())
    assert exits.tolist() == expected.exit_stage.tolist()
    assert set(exits.tolist()) == {0, 1, 2}
    torch.testing.assert_close(torch.from_numpy(logits), expected.logits, atol=2e-3, rtol=1e-3)
    with pytest.raises(VitpruneError, match="not an exported cascade"):
        OnnxCascade(tmp_path)


def test_parse_plan_file_stage(tmp_path: Path) -> None:
    from vitprune.plan import make_plan

    plan = make_plan("tome", 12, r=5, img_size=192)
    (tmp_path / "vitprune.json").write_text(json.dumps({"plan": plan.to_dict()}))
    stages = parse_stages(f"@{tmp_path},none", depth=12, base_size=224)
    assert stages[0].reductions == plan.reductions and stages[0].img_size == 192
    with pytest.raises(VitpruneError, match="plan file not found"):
        parse_stages(f"@{tmp_path / 'missing.json'},none", depth=12, base_size=224)


@pytest.mark.slow
def test_onnx_cascade_verifies_the_stage_graphs_sha256(base: torch.nn.Module, images: torch.Tensor,
                                                        tmp_path: Path) -> None:
    import onnx

    from vitprune.cascade import OnnxCascade, export_cascade_onnx
    from vitprune.io import file_sha256

    cascade = build_cascade(base, parse_stages("32,64", depth=12, base_size=64), thresholds=[0.5])
    folder = export_cascade_onnx(cascade, tmp_path / "onnx")
    manifest = json.loads((folder / "cascade_onnx.json").read_text())
    assert [s["sha256"] for s in manifest["stages"]] == [file_sha256(folder / s["file"]) for s in manifest["stages"]]
    OnnxCascade(folder, provider="cpu", threads=1)  # as written: verified and loaded

    graph = onnx.load(str(folder / "stage2.onnx"))
    graph.doc_string = "optimised offline"
    onnx.save(graph, str(folder / "stage2.onnx"))
    with pytest.raises(VitpruneError) as caught:
        OnnxCascade(folder, provider="cpu", threads=1)
    assert str(caught.value) == (f"{folder / 'stage2.onnx'} changed since it was written (sha256 mismatch with "
                                 "cascade_onnx.json); pass verify=False to load it anyway")
    logits, _ = OnnxCascade(folder, provider="cpu", threads=1, verify=False).run(images[:2].numpy())
    assert logits.shape == (2, 1000)

    (folder / "stage2.onnx").unlink()
    with pytest.raises(VitpruneError, match="is missing stage2.onnx"):
        OnnxCascade(folder, provider="cpu", verify=False)


@pytest.mark.parametrize("path, value, fragment", [
    (("stages", 0, "threshold"), "abc", "stages[0].threshold must be a number or null, got 'abc'"),
    (("stages", 1, "file"), "../stage2.onnx", "stages[1].file must be a file name in the folder"),
    (("stages", 0, "sha256"), "xyz", "stages[0].sha256 must be 64 hexadecimal digits or null"),
    (("input_size",), DELETE, "input_size is missing"),
])
def test_a_broken_onnx_manifest_is_refused_naming_the_file_and_field(tmp_path: Path, path: tuple, value: object,
                                                                     fragment: str) -> None:
    from vitprune.cascade import OnnxCascade

    stages = [{"file": f"stage{i}.onnx", "sha256": None, "img_size": size, "threshold": 0.5, "exit_always": False,
               "gmacs": 0.1} for i, size in ((1, 32), (2, 64))]
    manifest = {"format": 1, "criterion": "maxprob", "input_size": 64, "stages": stages}
    _set(manifest, path, value)
    (tmp_path / "cascade_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(VitpruneError) as caught:
        OnnxCascade(tmp_path, provider="cpu")
    assert str(caught.value).startswith(str(tmp_path / "cascade_onnx.json")) and fragment in str(caught.value)
