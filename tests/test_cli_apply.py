"""`vitprune apply` end to end, the artifact round trip, and every bad input."""
import json

import numpy as np
import pytest
import torch
from conftest import build_family
from PIL import Image

import vitprune
from vitprune.cli import run
from vitprune.errors import VitpruneError

WNIDS = ["n01440764", "n01443537"]  # ImageNet classes 0 and 1


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (root / wnid).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(root / wnid / f"{i}.png")
    return root


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "vit96.pth"
    torch.save({"model": build_family("vit").state_dict()}, path)
    return path


def apply_args(*extra):
    return ["apply", "vit_tiny", "--no-pretrained", "--img-size", "96", *extra]


@pytest.mark.slow
def test_apply_writes_an_artifact_that_loads_to_identical_logits(tmp_path, image_folder, capsys):
    out = tmp_path / "artifact"
    code = run(apply_args("--method", "evit", "--keep", "0.7", "--data", str(image_folder), "--bench",
                          "--bench-batch", "1,2", "--bench-repeats", "2", "-o", str(out), "--json"))
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("model", "method", "params", "gmacs_base", "gmacs", "top1_base", "top1", "agreement", "latency_ms"):
        assert key in report
    assert report["method"] == "evit" and report["params"]["layers"] == [3, 6, 9]
    assert report["gmacs"] < report["gmacs_base"]
    assert set(report["latency_ms"]) == {"1", "2"}
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "report.json", "report.md", "tokens.png", "vitprune.json"]

    model = vitprune.load(out)
    plan = json.loads((out / "vitprune.json").read_text())
    assert plan["model"]["name"] == "vit_tiny_patch16_224" and plan["versions"]["timm"]
    x = torch.randn(2, 3, 96, 96)
    from_file = vitprune.load(out / "model.safetensors")  # the single file is a full artifact too
    with torch.inference_mode():
        torch.testing.assert_close(model(x), from_file(x), rtol=0, atol=0)
    # and the artifact holds exactly the weights apply started from, reduced the same way
    reference = vitprune.apply(build_family("vit"), method="evit", keep=0.7)
    reference.load_state_dict(model.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.slow
def test_apply_from_checkpoint_and_from_an_artifact(tmp_path, checkpoint, capsys):
    out = tmp_path / "a"
    assert run(["apply", "vit_tiny", "--checkpoint", str(checkpoint), "--img-size", "96", "--method", "tome",
                "--r", "4", "-o", str(out), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["checkpoint"] == str(checkpoint) and first["method"] == "tome"
    # An artifact as the model argument: its plan, unless another is asked for.
    assert run(["apply", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gmacs"] == first["gmacs"]
    assert run(["apply", str(out), "--method", "evit", "--keep", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "evit"
    # --plan reuses the plan of another artifact
    assert run(apply_args("--plan", str(out / "vitprune.json"), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["gmacs"] == first["gmacs"]


def test_apply_existing_output_needs_force(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out))) == 2
    assert (out / "keep.txt").exists()
    assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out), "--force")) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import vitprune.artifact

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vitprune.artifact, "save_weights", broken)
    out = tmp_path / "never"
    assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out))) != 0
    assert list(tmp_path.iterdir()) == []


def _bad_inputs(tmp_path, image_folder, checkpoint):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    mismatched = tmp_path / "small.pth"
    torch.save(build_family("deit3").state_dict(), mismatched)
    empty = tmp_path / "empty"
    empty.mkdir()
    return {
        "unknown model": (["apply", "vit_nonexistent_model_xyz", "--no-pretrained", "--method", "evit", "--keep", "0.7"], "unknown model"),
        "not a vit": (["apply", "resnet18", "--no-pretrained", "--method", "tome", "--r", "2"], "not a supported ViT"),
        "keep too big": (apply_args("--method", "evit", "--keep", "1.5"), "evit --keep must be a number in (0, 1], got 1.5"),
        "keep zero": (apply_args("--method", "evit", "--keep", "0"), "evit --keep must be a number in (0, 1]"),
        "keep negative": (apply_args("--method", "evit", "--keep", "-0.2"), "evit --keep must be a number in (0, 1]"),
        "r beyond any runtime": (apply_args("--method", "tome", "--r", "99999999999999999999999"), "tome --r must be a whole number in [0, 1000000]"),
        "r beyond the model's tokens": (apply_args("--method", "tome:r=500"), "tome --r must be at most 37 (the tokens entering this model), got 500"),
        "ats keep 1e12": (apply_args("--method", "ats", "--keep", "1e12"), "ats --keep must be a ratio in (0, 1] or a whole token count in [2, 1000000]"),
        "ats count beyond the model's tokens": (apply_args("--method", "ats:keep=400"), "ats --keep must be at most 37"),
        "spec setting unreadable": (apply_args("--method", "tome:r=abc"), "tome --r must be a whole number in [0, 1000000], got 'abc'"),
        "spec and flag disagree": (apply_args("--method", "evit:keep=0.7", "--keep", "0.5"), "evit --keep is given twice (0.7 and 0.5)"),
        "spec without NAME=": (apply_args("--method", "ppt:r=4,0.1"), "cannot read ppt setting '0.1': write NAME=VALUE (r, threshold)"),
        "shorthand on a mixed plan": (apply_args("--method", "tome:r=2@0-5+evit:keep=0.7@6,9", "--r", "3"), "--r given apart from a plan of 2 methods"),
        "layer out of range": (apply_args("--method", "evit", "--keep", "0.7", "--layers", "3,12"), "out of range"),
        "bad layers": (apply_args("--method", "evit", "--keep", "0.7", "--layers", "three"), "cannot read --layers"),
        "empty layers": (apply_args("--method", "evit", "--keep", "0.7", "--layers", ""), "cannot read --layers"),
        "layers with a gap": (apply_args("--method", "evit", "--keep", "0.7", "--layers", "3,,6"), "cannot read --layers"),
        "ats keep inf": (apply_args("--method", "ats", "--keep", "inf"), "ats --keep must be"),
        "batch size 0": (apply_args("--method", "tome", "--r", "2", "--batch-size", "0"), "--batch-size must be a whole number >= 1"),
        "workers -1": (apply_args("--method", "tome", "--r", "2", "--workers", "-1"), "--workers must be a whole number >= 0"),
        "no method": (apply_args(), "choose a reduction"),
        "unknown method": (apply_args("--method", "prune", "--keep", "0.5"), "unknown method"),
        "tome with keep": (apply_args("--method", "tome", "--keep", "0.5"), "--keep is not a parameter of tome"),
        "tome without r": (apply_args("--method", "tome"), "tome needs --r"),
        "protect negative": (apply_args("--method", "tome", "--r", "2", "--protect", "-0.5"), "tome --protect must be a number in [0, 1000]"),
        "protect on evit": (apply_args("--method", "evit", "--keep", "0.7", "--protect", "0.2"), "--protect is not a parameter of evit"),
        "protect on a gap model": (["apply", "vit_wee_patch16_reg1_gap_256", "--no-pretrained", "--method", "tome", "--r", "2", "--protect", "0.2"], "no class token"),
        "corrupt checkpoint": (["apply", "vit_tiny", "--checkpoint", str(corrupt), "--method", "tome", "--r", "2"], "cannot read checkpoint"),
        "missing checkpoint": (["apply", "vit_tiny", "--checkpoint", str(tmp_path / "nope.pth"), "--method", "tome", "--r", "2"], "not found"),
        "mismatched checkpoint": (["apply", "vit_tiny", "--img-size", "96", "--checkpoint", str(mismatched), "--method", "tome", "--r", "2"], "does not fit"),
        "empty image folder": (apply_args("--method", "tome", "--r", "2", "--data", str(empty)), "no images"),
        "missing image folder": (apply_args("--method", "tome", "--r", "2", "--data", str(tmp_path / "nowhere")), "not found"),
        "bad bench batch": (apply_args("--method", "tome", "--r", "2", "--bench", "--bench-batch", "0"), "--bench-batch must be positive"),
        "no gpu": (apply_args("--method", "tome", "--r", "2", "--device", "cuda"), "CUDA"),
        "not an artifact": ([ "apply", str(image_folder), "--method", "tome", "--r", "2"], "not a vitprune artifact"),
        # usage errors the option parser raises itself
        "keep not a number": (apply_args("--method", "evit", "--keep", "abc"), "Invalid value for '--keep'"),
        "unknown option": (apply_args("--method", "evit", "--keep", "0.7", "--no-such-option"), "No such option"),
        "no model": (["apply", "--method", "evit", "--keep", "0.7"], "Missing argument"),
    }


@pytest.mark.slow
def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, image_folder, checkpoint, capsys):
    if torch.cuda.is_available():
        pytest.skip("the no-GPU case needs a machine without CUDA")
    for name, (args, message) in _bad_inputs(tmp_path, image_folder, checkpoint).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code = run([*args, "-o", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert err.count("\n") == 0 and err.startswith("error: "), f"{name}: {err!r}"
        assert message in err, f"{name}: {err!r}"
        assert "Traceback" not in err
        assert not out.exists(), name


def test_python_api_without_the_cli():
    model = build_family("vit")
    same = vitprune.apply(model, method="evit", keep=0.7)
    assert same is model and vitprune.plan_of(model).method == "evit"
    with pytest.raises(VitpruneError):
        vitprune.apply(model)


def test_missing_parent_folders_of_the_output_are_made(tmp_path):
    out = tmp_path / "runs" / "nested" / "artifact"
    assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out))) == 0
    assert (out / "vitprune.json").is_file()
