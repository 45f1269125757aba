"""`vitprune finetune`: distillation, checkpoints and resume, SuperViT, DDP on gloo, bad input."""
from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import interrupted_after_epoch

import vitprune
import vitprune.finetune as finetune
import vitprune.finetune.train as finetune_train
from vitprune.cli import run
from vitprune.commands.finetune import FinetuneRequest, run_finetune
from vitprune.data import ImageDataset, find_images
from vitprune.errors import VitpruneError
from vitprune.finetune import distill_loss, feature_distill_loss, forward_with_features, hard_distill_loss, work_dir_for
from vitprune.patch import apply_plan, plan_of, set_dynamic_img_size
from vitprune.plan import make_plan

TINY = dict(model="vit_tiny_patch16_224", no_pretrained=True, img_size=32, workers=0, batch_size=4,
            eval_batch_size=16, progress=False, warmup_epochs=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(labelled_images: Path) -> Path:
    return labelled_images


@pytest.fixture(scope="module")
def unlabelled(images: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unlabelled")
    for file in sorted(images.rglob("*.png")):
        (root / f"{file.parent.name}_{file.name}").write_bytes(file.read_bytes())
    return root


def test_distill_loss_is_kl_scaled_by_t_squared() -> None:
    teacher, student = torch.randn(5, 10), torch.randn(5, 10)
    assert distill_loss(teacher, teacher, 2.0).abs() < 1e-6
    soft_t, soft_s = (teacher / 3).softmax(-1), (student / 3).softmax(-1)
    expected = (soft_t * (soft_t.log() - soft_s.log())).sum(-1).mean() * 9
    assert torch.allclose(distill_loss(student, teacher, 3.0), expected, atol=1e-5)


def test_hard_distill_loss_is_cross_entropy_with_the_teacher_top1() -> None:
    teacher, student = torch.randn(6, 10), torch.randn(6, 10)
    expected = torch.nn.functional.cross_entropy(student, teacher.argmax(-1))
    assert torch.allclose(hard_distill_loss(student, teacher), expected)
    # It ignores everything but the teacher's top-1: a sharper teacher with the same argmax gives the same loss.
    assert torch.allclose(hard_distill_loss(student, teacher * 5), expected)


def test_hard_distillation_alone_trains(images: Path) -> None:
    # Only the hard term (no KL, no labels) on unaugmented images: the training loss it reports must fall.
    request = FinetuneRequest(**TINY, data=images, method="evit", keep=0.5, epochs=4, lr=1e-5, min_lr=1e-5,
                              distill_weight=0.0, label_weight=0.0, hard_distill=1.0, augment=False)
    result = run_finetune(request)
    trained = [row["train_loss"] for row in result.metrics[1:]]
    assert trained[-1] < trained[0]
    assert result.report["finetune"]["settings"]["hard_distill"] == 1.0


def test_feature_distill_loss_is_relative_squared_error() -> None:
    teacher = torch.randn(4, 8) * 3
    assert feature_distill_loss(teacher, teacher) == 0
    student = teacher + torch.randn(4, 8)
    expected = ((student - teacher) ** 2).mean() / (teacher ** 2).mean()
    assert torch.allclose(feature_distill_loss(student, teacher), expected)
    # relative: scaling both by the same factor leaves it unchanged
    assert torch.allclose(feature_distill_loss(student * 10, teacher * 10), expected)


def test_forward_with_features_returns_the_head_input() -> None:
    model, _ = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    images = torch.randn(2, 3, 32, 32)
    logits, features = forward_with_features(model.eval(), model, images)
    torch.testing.assert_close(model.head(features), logits)
    assert features.shape == (2, model.num_features) and not model.head._forward_pre_hooks


def test_feature_distillation_alone_trains(images: Path) -> None:
    request = FinetuneRequest(**TINY, data=images, method="evit", keep=0.5, epochs=4, lr=1e-4, min_lr=1e-4,
                              distill_weight=0.0, label_weight=0.0, feature_distill=1.0, augment=False)
    result = run_finetune(request)
    trained = [row["train_feature"] for row in result.metrics[1:]]
    assert trained[-1] < trained[0] and all(row["train_loss"] == row["train_feature"] for row in result.metrics[1:])


def test_auto_augment_adds_the_policy_to_the_training_transform() -> None:
    model, _ = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    plain = repr(finetune.train_transform(model, 0.5))
    policy = repr(finetune.train_transform(model, 0.5, auto_augment="rand-m9-mstd0.5"))
    assert "RandAugment" not in plain and "RandAugment" in policy and "RandomResizedCrop" in policy


def test_a_failing_augmentation_is_reported_with_the_image(images: Path) -> None:
    def refuse(image):
        raise ValueError("bits must be between or equal to 1 and 8")

    image, _, error = ImageDataset(find_images(images), refuse)[0]
    assert image is None and error.startswith("cannot transform image ") and "bits must be" in error


def test_dynamic_img_size_matches_the_served_size() -> None:
    """SuperViT trains at several sizes on one set of weights; served with `apply` it must match."""
    model, _ = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48)
    served = apply_plan(copy.deepcopy(model), make_plan("evit", 12, keep=0.5, img_size=32))
    dynamic = set_dynamic_img_size(apply_plan(model, make_plan("evit", 12, keep=0.5)), True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(served(x), dynamic(x), atol=1e-6)
    set_dynamic_img_size(dynamic, False)
    with pytest.raises(AssertionError):  # a fixed size again: timm refuses 32 px on a 48 px model
        dynamic(x)


@pytest.mark.slow
def test_distillation_lowers_the_kl_to_the_teacher(images: Path) -> None:
    # Pure distillation on the very images it is validated on: the KL to the teacher must fall.
    request = FinetuneRequest(**TINY, data=images, val=images, method="evit", keep=0.5, epochs=4, lr=1e-5,
                              min_lr=1e-5, label_weight=0.0, feature_distill=0.0, trainable=("*",), augment=False)
    result = run_finetune(request)
    before, after = result.metrics[0], result.metrics[-1]
    assert [row["epoch"] for row in result.metrics] == [0, 1, 2, 3, 4]
    assert after["val_kl"] < 0.8 * before["val_kl"]
    trained = [row["train_loss"] for row in result.metrics[1:]]
    assert trained[-1] < trained[0]
    assert result.output is None
    assert result.report["finetune"]["variants"][0]["after"]["kl"] == pytest.approx(after["val_kl"], abs=1e-4)


@pytest.mark.slow
def test_cli_writes_an_artifact_that_loads(images: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    code = run(["finetune", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--method", "evit",
                "--keep", "0.5", "--data", str(images), "--val-split", "0.25", "--epochs", "2", "--batch-size", "4",
                "--workers", "0", "--warmup-epochs", "0", "-o", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "model.safetensors", "report.json", "report.md",
                                                     "teacher.safetensors", "training.png", "vitprune.json"]
    assert not work_dir_for(out).exists()
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,") and "val_agreement" in lines[0] and "train_loss" in lines[0]
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1", "2"]
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["finetune"]["val_images"] == 3 and report["finetune"]["train_images"] == 9
    assert "## Fine-tuning" in (out / "report.md").read_text()
    model = vitprune.load(out)
    assert plan_of(model).describe() == "evit:keep=0.5@3,6,9+32px"
    assert report["gmacs"] < report["gmacs_base"]


@pytest.mark.slow
def test_trainable_patterns_freeze_the_rest(images: Path) -> None:
    request = FinetuneRequest(**TINY, data=images, method="evit", keep=0.5, epochs=1, lr=1e-3, trainable=("head.*",))
    trained = run_finetune(request).model.state_dict()
    torch.manual_seed(0)  # run_finetune seeds like this (--seed 0) before it builds the model
    initial, _ = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    for name, tensor in initial.state_dict().items():
        assert torch.equal(tensor, trained[name]) != name.startswith("head."), name
    with pytest.raises(VitpruneError, match="matches no parameter"):
        run_finetune(replace(request, trainable=("nothing.*",)))


@pytest.mark.slow
def test_resume_continues_at_the_next_epoch_and_ends_where_an_uninterrupted_run_does(
        images: Path, tmp_path: Path, monkeypatch) -> None:
    request = FinetuneRequest(**TINY, data=images, val_split=0.25, method="evit", keep=0.5, epochs=3, lr=1e-3)
    whole = run_finetune(replace(request, output=tmp_path / "whole"))

    out = tmp_path / "resumed"
    with interrupted_after_epoch(monkeypatch, 2):
        run_finetune(replace(request, output=out))
    work = work_dir_for(out)
    assert not out.exists() and torch.load(work / "checkpoint.pt", weights_only=True)["epoch"] == 2

    with pytest.raises(VitpruneError, match="unfinished run"):
        run_finetune(replace(request, output=out))
    with pytest.raises(VitpruneError, match=r"other settings \(lr\)"):
        run_finetune(replace(request, output=out, resume=True, lr=2e-3))

    steps = []
    step = finetune.Trainer.step
    monkeypatch.setattr(finetune.Trainer, "step", lambda self, *a: steps.append(1) or step(self, *a))
    resumed = run_finetune(replace(request, output=out, resume=True))
    assert len(steps) == 3  # one epoch of 9 images in batches of 4
    assert [row["epoch"] for row in resumed.metrics] == [0, 1, 2, 3]
    assert not work.exists() and (out / "model.safetensors").is_file()
    for name, tensor in whole.model.state_dict().items():
        assert torch.allclose(tensor, resumed.model.state_dict()[name], atol=1e-6), name


@pytest.mark.slow
def test_supervit_trains_every_configuration(unlabelled: Path, tmp_path: Path, monkeypatch) -> None:
    sizes_seen = []
    resize = finetune_train.resize_images
    monkeypatch.setattr(finetune_train, "resize_images",
                        lambda images, size: sizes_seen.append(size) or resize(images, size))
    out = tmp_path / "supervit"
    request = FinetuneRequest(**{**TINY, "img_size": 48}, data=unlabelled, val=unlabelled, supervit=True,
                              sizes=(32, 48), keeps=(0.5, 1.0), epochs=1, lr=1e-3, output=out)
    result = run_finetune(request)
    assert sizes_seen == [48, 48, 32, 32] * 3  # every batch runs all four configurations, largest first
    variants = result.report["finetune"]["variants"]
    assert [(v["img_size"], v["keep"]) for v in variants] == [(48, 1.0), (48, 0.5), (32, 1.0), (32, 0.5)]
    gmacs = [v["gmacs"] for v in variants]
    assert gmacs == sorted(gmacs, reverse=True) and gmacs[-1] < 0.5 * gmacs[0]
    assert all("before" in v and "after" in v and "top1" not in v["after"] for v in variants)  # unlabelled
    assert "train_label" not in result.metrics[-1]

    stored = finetune.list_variants(out)
    assert [(v["img_size"], v["keep"]) for v in stored] == [(48, 1.0), (48, 0.5), (32, 1.0), (32, 0.5)]
    small = finetune.load_variant(out, 32, 0.5)
    assert plan_of(small).img_size == 32
    validation = finetune.prepare_validation(vitprune.load(out), find_images(unlabelled), {32}, "held-out",
                                             workers=0, batch_size=16, progress=False)
    with torch.no_grad():
        logits = small(validation.images[32])
    assert torch.isfinite(logits).all() and logits.shape == (12, 1000)
    with pytest.raises(VitpruneError, match="no configuration 40px"):
        finetune.load_variant(out, 40, 0.5)


def _ddp_worker(rank: int, port: int, request: FinetuneRequest, folder: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = run_finetune(request)
    torch.save(result.model.state_dict(), Path(folder) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_process_ddp_on_gloo_ends_with_identical_weights(images: Path, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "ddp"
    request = FinetuneRequest(**TINY, data=images, val_split=0.25, method="evit", keep=0.5, epochs=1, lr=1e-3,
                              output=out)
    mp.spawn(_ddp_worker, args=(port, request, str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial, _ = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    changed = [name for name, tensor in initial.state_dict().items() if not torch.equal(tensor, rank0[name])]
    assert changed  # it trained
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["world_size"] == 2
    loaded = vitprune.load(out).state_dict()
    assert all(torch.equal(loaded[name], rank0[name]) for name in rank0)


@pytest.mark.parametrize("extra, message", [
    (["--data", "MISSING"], "image folder not found"),
    (["--epochs", "0"], "--epochs must be a whole number >= 1, got 0"),
    (["--hard-distill", "-1"], "--hard-distill must be a finite number >= 0, got -1.0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number >= 0 and < epochs (8), got inf"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--ema", "nan"], "--ema must be a decay in (0, 1), e.g. 0.999, got nan"),
    (["--val-split", "nan"], "--val-split must be a fraction in (0, 1), got nan"),
    (["--crop-scale", "nan"], "--crop-scale must be in (0, 1], got nan"),
    (["--auto-augment", "bogus"], "unknown --auto-augment policy 'bogus'"),
    (["--auto-augment", "rand-m9", "--no-augment"], "--auto-augment is an augmentation"),
    (["--distill-weight", "0", "--feature-distill", "0"], "cannot all be 0"),
    (["--dtype", "bfloat16"], "--dtype bfloat16 (mixed precision) is for CUDA"),
    (["--val", "IMAGES", "--val-split", "0.2"], "not both"),
    (["--supervit", "--img-sizes", "24,32", "--keeps", "0.5,1"], "multiples of the patch size 16"),
    (["--supervit", "--img-sizes", "16,48", "--keeps", "0.5,1"], "largest SuperViT size must be the model's input size 32"),
    (["--img-sizes", "32,48"], "--img-sizes and --keeps are for --supervit"),
    (["--resume"], "nothing to resume"),
    (["EXISTING"], "already exists; pass --force"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(images: Path, tmp_path: Path, capsys, extra,
                                                           message) -> None:
    out = tmp_path / "out"
    if "EXISTING" in extra:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        extra = []
    extra = [str(images) if e == "IMAGES" else str(tmp_path / "missing") if e == "MISSING" else e for e in extra]
    method = [] if "--supervit" in extra else ["--method", "evit", "--keep", "0.5"]
    argv = ["finetune", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", *method,
            "--data", str(images), "--workers", "0", "-o", str(out), *extra]
    before = sorted(tmp_path.iterdir())
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert sorted(tmp_path.iterdir()) == before
    if out.exists():
        assert [p.name for p in out.iterdir()] == ["keep.txt"]


SUPERVIT = dict(method=None, keep=None, supervit=True)


@pytest.mark.parametrize("change, param, message", [
    (dict(lr=math.inf), "lr", "lr must be a finite number > 0, got inf"),
    (dict(min_lr=-1e-6), "min_lr", "min_lr must be a finite number >= 0"),
    (dict(batch_size=0), "batch_size", "batch_size must be a whole number >= 1"),
    (dict(epochs=2, warmup_epochs=2.0), "warmup_epochs", "warmup_epochs must be a finite number >= 0 and < epochs (2)"),
    (dict(clip_grad=math.nan), "clip_grad", "clip_grad must be a finite number >= 0"),
    (dict(temperature=0.0), "temperature", "temperature must be a finite number > 0"),
    (dict(distill_weight=0.0, feature_distill=0.0), "distill_weight", "cannot all be 0"),
    (dict(crop_scale=1.5), "crop_scale", "crop_scale must be in (0, 1]"),
    (dict(ema=1.0), "ema", "ema must be a decay in (0, 1)"),
    (dict(dtype="fp8"), "dtype", "dtype must be one of float32, bfloat16, float16"),
    (dict(val_split=1.0), "val_split", "val_split must be a fraction in (0, 1)"),
    (dict(workers=-1), "workers", "workers must be a whole number >= 0"),
    (dict(trainable=()), "trainable", "trainable needs at least one"),
    (dict(resume=True), "resume", "resume continues the run"),
    (dict(SUPERVIT, sizes=(32,)), "keeps", "supervit needs keeps"),
    (dict(SUPERVIT, sizes=(32,), keeps=(1.5,)), "keeps", "keeps must be keep rates in (0, 1]"),
    (dict(SUPERVIT, sizes=(32,), keeps=(0.5,)), "sizes", "several configurations"),
    (dict(supervit=True, sizes=(32, 48), keeps=(0.5,)), "supervit", "supervit builds its own EViT plans"),
])
def test_the_request_is_checked_before_any_model_is_built(images: Path, change: dict, param: str, message: str) -> None:
    request = FinetuneRequest(**{**TINY, "model": "no_such_model"}, data=images / "missing", method="evit", keep=0.5)
    with pytest.raises(VitpruneError, match=re.escape(message)) as caught:
        run_finetune(replace(request, **change))
    assert caught.value.params[0] == param  # the parameter to change first; the message may name others


FLOAT_FIELDS = ("lr", "min_lr", "warmup_lr", "weight_decay", "clip_grad", "temperature", "distill_weight", "label_weight",
                "hard_distill", "feature_distill", "warmup_epochs", "crop_scale", "ema", "val_split")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_non_finite_hyper_parameters_are_refused_up_front(images: Path, name: str, value: float) -> None:
    request = FinetuneRequest(**{**TINY, "model": "no_such_model"}, data=images / "missing", method="evit", keep=0.5)
    with pytest.raises(VitpruneError, match=f"^{name} must be .*, got {re.escape(repr(value))}$") as caught:
        run_finetune(replace(request, **{name: value}))
    assert caught.value.param == name


def test_a_non_whole_seed_is_refused_up_front(images: Path) -> None:
    request = FinetuneRequest(**{**TINY, "model": "no_such_model"}, data=images, method="evit", keep=0.5)
    with pytest.raises(VitpruneError, match="seed must be a whole number, got nan") as caught:
        run_finetune(replace(request, seed=math.nan))
    assert caught.value.param == "seed"


def _cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32", "--method", "evit", "--keep",
            "0.5", "--data", str(data), "--workers", "0", "--batch-size", "4", "--epochs", "1", "--warmup-epochs", "0",
            "-o", str(out), "--json", *extra]  # --json: no progress bars on stderr


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_the_next_run_is_not_refused(images: Path, tmp_path: Path, capsys,
                                                                          monkeypatch) -> None:
    out = tmp_path / "ft"
    monkeypatch.setattr(finetune_train, "resize_images", lambda batch, size: batch * math.nan)  # the student's input
    assert run(_cli_args(images, out)) == 2
    err = _one_error_line(capsys)
    assert "training diverged: the loss is nan at epoch 1 step 1; lower --lr" in err and "resume" not in err
    assert sorted(tmp_path.iterdir()) == []  # no output, and the work folder it made is gone
    monkeypatch.undo()
    assert run(_cli_args(images, out)) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and not work_dir_for(out).exists()


@pytest.mark.slow
def test_a_failure_after_a_checkpoint_says_how_to_resume(images: Path, tmp_path: Path, monkeypatch) -> None:
    request = FinetuneRequest(**TINY, data=images, method="evit", keep=0.5, epochs=2, lr=1e-4, output=tmp_path / "ft")
    calls = []
    resize = finetune_train.resize_images

    def nan_from_epoch_two(batch, size):  # 12 images in batches of 4: 3 steps per epoch
        calls.append(1)
        return resize(batch, size) * (math.nan if len(calls) > 3 else 1.0)

    monkeypatch.setattr(finetune_train, "resize_images", nan_from_epoch_two)
    with pytest.raises(VitpruneError) as caught:
        run_finetune(request)
    assert str(caught.value) == ("training diverged: the loss is nan at epoch 2 step 1; lower lr; run again with "
                                 "resume to continue from epoch 2 (1 of 2 done)")
    assert caught.value.param == "lr"
    work = work_dir_for(request.output)
    assert not request.output.exists() and torch.load(work / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune_train, "resize_images", resize)
    result = run_finetune(replace(request, resume=True))
    assert [row["epoch"] for row in result.metrics] == [0, 1, 2] and not work.exists()


def test_a_full_disk_before_the_first_checkpoint_removes_the_work_folder(images: Path, tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    def disk_full(obj, file, *args, **kwargs):
        file.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "ft"
    assert run(_cli_args(images, out)) == 2
    err = _one_error_line(capsys)
    assert f"disk full while writing {work_dir_for(out) / 'checkpoint.pt'}" in err
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["data", "val"])
def test_a_corrupt_image_is_named_before_the_first_step(images: Path, tmp_path: Path, capsys, monkeypatch,
                                                        where: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(images, data)
    bad = data / "1" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG: the header opens, the data does not
    monkeypatch.setattr(finetune.Trainer, "step", lambda *args: pytest.fail("a training step ran"))
    out = tmp_path / "ft"
    extra = ["--val", str(data)] if where == "val" else []
    assert run(_cli_args(images if where == "val" else data, out, *extra)) == 2
    err = _one_error_line(capsys)
    assert f"cannot read image {bad}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_class_index_the_model_lacks_is_refused_before_training(images: Path, tmp_path: Path, capsys,
                                                                monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    files = sorted(images.rglob("*.png"))[:4]
    for index, file in enumerate(files):
        shutil.copy(file, data / f"im{index}.png")
    (data / "labels.csv").write_text("file,class_index\n" + "".join(
        f"im{index}.png,{5000 if index == 2 else index}\n" for index in range(len(files))))
    monkeypatch.setattr(finetune.Trainer, "step", lambda *args: pytest.fail("a training step ran"))
    out = tmp_path / "ft"
    assert run(_cli_args(data, out)) == 2
    err = _one_error_line(capsys)
    assert str(data / "im2.png") in err and "5000" in err and "1000 classes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_the_work_folder_is_made_with_its_missing_parents(tmp_path):
    from vitprune.finetune.checkpoint import OWNER_FILE, start_work_dir

    work = tmp_path / "not" / "there" / "out.partial"
    start_work_dir(work)
    assert work.is_dir() and (work / OWNER_FILE).is_file()
