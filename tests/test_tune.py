"""Fine-tuned artifacts judged against their teacher; calibrate's fine-tuning stage (one run to a budget)."""
from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import interrupted_after_epoch

import vitprune.commands.calibrate as calibrate_command
import vitprune.finetune.run as finetune_run
from vitprune.artifact import content_sha256, read_artifact
from vitprune.budget import Budget
from vitprune.cli import run
from vitprune.commands.apply import ApplyRequest, run_apply
from vitprune.commands.calibrate import CalibrateRequest, run_calibrate
from vitprune.commands.finetune import FinetuneRecipe, FinetuneRequest, run_finetune
from vitprune.errors import VitpruneError
from vitprune.finetune import work_dir_for
from vitprune.metrics import classification_metrics
from vitprune.source import load_base, load_images_for
from vitprune.teacher import TEACHER_FILE, state_sha256, teacher_of

TINY = dict(model="vit_tiny_patch16_224", no_pretrained=True, img_size=64, workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def images(labelled_images: Path) -> Path:
    return labelled_images


@pytest.fixture(scope="module")
def finetuned(images: Path, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(a ToMe artifact fine-tuned for 1 epoch from a random tiny ViT, that ViT (the teacher))."""
    out = tmp_path_factory.mktemp("ft") / "ft"
    torch.manual_seed(0)
    run_finetune(FinetuneRequest(**TINY, data=images, val=images, method="tome", r=2, epochs=1, batch_size=4,
                                 warmup_epochs=0.0, lr=1e-2, eval_batch_size=8, output=out))
    torch.manual_seed(0)
    teacher = load_base("vit_tiny_patch16_224", no_pretrained=True, img_size=64).model
    return out, teacher


@pytest.mark.slow
def test_a_finetuned_artifact_records_and_rebuilds_its_teacher(finetuned) -> None:
    out, teacher = finetuned
    metadata = json.loads((out / "vitprune.json").read_text())
    record = metadata["teacher"]
    assert record["model"] == "vit_tiny_patch16_224" and record["weights_sha256"] == state_sha256(teacher)
    assert 0 < record["tensors"] < len(teacher.state_dict())  # norms and biases only
    base = load_base(str(out))
    assert state_sha256(base.model) != state_sha256(teacher)  # the fine-tuned weights
    assert base.teacher is not None and state_sha256(base.teacher) == record["weights_sha256"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(base.teacher(x), teacher.eval()(x))
    assert json.loads((out / "report.json").read_text())["reference"]["compared_with"] == "teacher"


@pytest.mark.slow
def test_apply_on_a_finetuned_artifact_reports_against_its_teacher(finetuned, images: Path, tmp_path: Path) -> None:
    out, teacher = finetuned
    result = run_apply(ApplyRequest(model=str(out), data=images, workers=0, progress=False, output=tmp_path / "a"))
    report = result.report
    with torch.no_grad():
        pixels, labels, _ = load_images_for(teacher, images, limit=None, workers=0, progress=False)
        unreduced = load_base(str(out)).model
        against_teacher = classification_metrics(result.reduced.cpu()(pixels), labels, teacher.eval()(pixels))
        against_finetuned = classification_metrics(result.reduced(pixels), labels, unreduced(pixels))
        unreduced_figures = classification_metrics(unreduced(pixels), labels, teacher(pixels))
    assert report["reference"]["compared_with"] == "teacher"
    assert report["kl"] == pytest.approx(against_teacher["kl"], rel=1e-3, abs=1e-5)
    assert abs(against_teacher["kl"] - against_finetuned["kl"]) > 10 * abs(report["kl"] - against_teacher["kl"])
    assert report["reference"]["finetuned_unreduced"]["kl"] == pytest.approx(unreduced_figures["kl"], rel=1e-3, abs=1e-5)
    assert "the teacher this artifact was fine-tuned from: vit_tiny_patch16_224" in (tmp_path / "a" / "report.md").read_text()
    carried = load_base(str(tmp_path / "a"))  # the artifact apply wrote keeps the teacher
    assert carried.teacher is not None and state_sha256(carried.teacher) == state_sha256(teacher)
    again = run_apply(ApplyRequest(model=str(tmp_path / "a"), data=images, workers=0, progress=False)).report
    assert again["reference"]["compared_with"] == "teacher" and again["kl"] == pytest.approx(report["kl"], rel=1e-5)


@pytest.mark.slow
def test_calibrate_on_a_finetuned_artifact_reports_against_its_teacher(finetuned, images: Path,
                                                                       tmp_path: Path) -> None:
    out, teacher = finetuned
    result = run_calibrate(CalibrateRequest(model=str(out), data=images, budget=Budget("ratio", 0.7), img_sizes=[64],
                                            protect=0.0, search_images=2, refine_steps=0, bench_repeats=1, workers=0,
                                            progress=False, output=tmp_path / "c"))
    report, holdout = result.report, result.holdout_files
    with torch.no_grad():
        pixels, labels, image_set = load_images_for(teacher, images, limit=None, workers=0, progress=False)
        keep = [index for index, file in enumerate(image_set.files) if file in set(holdout)]
        expected = classification_metrics(result.reduced(pixels[keep]), labels[keep], teacher.eval()(pixels[keep]))
        unreduced = load_base(str(out)).model
        finetuned = classification_metrics(result.reduced(pixels[keep]), labels[keep], unreduced(pixels[keep]))
    assert report["reference"]["compared_with"] == "teacher"
    assert report["kl"] == pytest.approx(expected["kl"], rel=1e-3, abs=1e-5)
    assert abs(expected["kl"] - finetuned["kl"]) > 10 * abs(report["kl"] - expected["kl"])  # not the fine-tuned base
    assert "finetuned_unreduced" in report["reference"] and "frontier_against" in report["reference"]
    carried = load_base(str(tmp_path / "c")).teacher  # the artifact calibrate wrote keeps the teacher
    assert carried is not None and state_sha256(carried) == state_sha256(teacher)


@pytest.mark.slow
def test_a_finetuned_artifact_at_another_size_keeps_a_teacher_that_rebuilds(finetuned, images: Path,
                                                                           tmp_path: Path) -> None:
    # the teacher stays at its own size: apply --img-size and calibrate on the result measure it there
    out, teacher = finetuned
    run_apply(ApplyRequest(model=str(out), img_size=48, data=images, workers=0, progress=False, output=tmp_path / "a"))
    carried = load_base(str(tmp_path / "a"))
    assert carried.teacher is not None and state_sha256(carried.teacher) == state_sha256(teacher)
    assert carried.teacher.patch_embed.img_size == (64, 64) and carried.artifact_plan.img_size == 48
    run_apply(ApplyRequest(model=str(tmp_path / "a"), data=images, workers=0, progress=False))  # verified again
    # a model fine-tuned at 48 px from its 224 px teacher, then calibrated: the teacher sees 224 px images
    torch.manual_seed(0)
    run_finetune(FinetuneRequest(**{**TINY, "img_size": None}, data=images, method="tome:r=2+48px", epochs=1, batch_size=4,
                                 warmup_epochs=0.0, eval_batch_size=8, output=tmp_path / "small"))
    result = run_calibrate(CalibrateRequest(model=str(tmp_path / "small"), data=images, budget=Budget("ratio", 0.7),
                                            img_sizes=[48], protect=0.0, search_images=2, refine_steps=0,
                                            bench_repeats=1, workers=0, progress=False))
    assert result.report["reference"]["compared_with"] == "teacher" and "finetuned_unreduced" in result.report["reference"]


@pytest.mark.slow
def test_features_of_a_finetuned_artifact_are_judged_against_its_teachers_features(finetuned, images: Path,
                                                                                   tmp_path: Path) -> None:
    out, _ = finetuned
    report = run_apply(ApplyRequest(model=str(out), features=True, data=images, workers=0, progress=False,
                                    output=tmp_path / "f")).report
    assert report["reference"]["compared_with"] == "teacher" and "cosine" in json.dumps(report)
    carried = load_base(str(tmp_path / "f"))  # the headless teacher rebuilds from the new artifact
    assert carried.teacher is not None and carried.teacher.num_classes == 0


@pytest.mark.slow
def test_fine_tuning_a_finetuned_artifact_distils_from_and_records_the_original_teacher(finetuned, images: Path,
                                                                                       tmp_path: Path) -> None:
    out, teacher = finetuned
    run_finetune(FinetuneRequest(model=str(out), workers=0, progress=False, data=images, epochs=1, batch_size=4,
                                 warmup_epochs=0.0, eval_batch_size=8, output=tmp_path / "again"))
    record = json.loads((tmp_path / "again" / "vitprune.json").read_text())["teacher"]
    assert record["weights_sha256"] == state_sha256(teacher)
    rebuilt = load_base(str(tmp_path / "again")).teacher
    assert rebuilt is not None and state_sha256(rebuilt) == state_sha256(teacher)


def _copied(artifact: Path, copy: Path, leave_out: str | None = None) -> Path:
    """The artifact's files in a new folder (all but `leave_out`), to edit without touching the fixture's."""
    copy.mkdir()
    for file in artifact.iterdir():
        if file.name != leave_out:
            (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_without_the_teacher_file_the_report_says_what_it_compares_with(finetuned, images: Path,
                                                                       tmp_path: Path) -> None:
    out, _ = finetuned
    copy = _copied(out, tmp_path / "copy", leave_out=TEACHER_FILE)
    report = run_apply(ApplyRequest(model=str(copy), data=images, workers=0, progress=False)).report
    assert report["reference"]["compared_with"] == "fine-tuned weights unreduced"


def test_fine_tuning_again_without_the_teachers_tensors_is_one_line_and_nothing_written(finetuned, images: Path,
                                                                                         tmp_path: Path, capsys) -> None:
    out, _ = finetuned
    copy = _copied(out, tmp_path / "copy", leave_out=TEACHER_FILE)
    assert run(["finetune", str(copy), "--data", str(images), "--workers", "0", "--epochs", "1", "--json",
                "-o", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "are not with it" in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["copy"]


def test_a_changed_teacher_file_is_refused(finetuned, tmp_path: Path) -> None:
    out, _ = finetuned
    copy = _copied(out, tmp_path / "copy")
    data = bytearray((copy / TEACHER_FILE).read_bytes())
    data[-1] ^= 1
    (copy / TEACHER_FILE).write_bytes(bytes(data))
    with pytest.raises(VitpruneError, match="sha256"):
        load_base(str(copy))


def test_a_teacher_file_without_its_content_hash_loads_only_without_verify(finetuned, tmp_path: Path) -> None:
    out, teacher = finetuned
    copy = _copied(out, tmp_path / "copy")
    header = safetensors.safe_open(str(out / TEACHER_FILE), framework="pt").metadata()
    assert header["weights_sha256"] == content_sha256(header["teacher"], safetensors.torch.load_file(out / TEACHER_FILE))
    safetensors.torch.save_file(safetensors.torch.load_file(out / TEACHER_FILE), copy / TEACHER_FILE)  # no hash
    with pytest.raises(VitpruneError, match="carries no sha256") as error:
        load_base(str(copy))
    assert error.value.param == "verify"
    artifact = read_artifact(copy)
    rebuilt, _ = teacher_of(copy, artifact.model, artifact.metadata, verify=False)
    assert state_sha256(rebuilt) == state_sha256(teacher)


@pytest.mark.slow
def test_calibrate_then_finetune_resumes_and_writes_one_artifact_judged_against_the_original(
        images: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "tuned"
    request = CalibrateRequest(model="vit_tiny_patch16_224", no_pretrained=True, img_size=64, img_sizes=[64],
                               data=images, budget=Budget("ratio", 0.6), protect=0.0, search_images=2, refine_steps=0,
                               bench_repeats=1, workers=0, progress=False, output=out,
                               finetune=FinetuneRecipe(epochs=2, batch_size=2, warmup_epochs=0.0, lr=1e-2))
    train_one_epoch = finetune_run.train_one_epoch

    def crash_in_the_first_epoch(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune_run, "train_one_epoch", crash_in_the_first_epoch)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_calibrate(request)
    work = work_dir_for(out)
    assert not out.exists() and (work / "calibration.json").is_file() and not (work / "checkpoint.pt").exists()
    with pytest.raises(VitpruneError, match=r"other settings \(budget\)"):
        run_calibrate(replace(request, resume=True, budget=Budget("ratio", 0.7)))

    def no_second_search(*args, **kwargs):
        raise AssertionError("a resumed run searched again")

    monkeypatch.setattr(calibrate_command, "_calibrate", no_second_search)
    monkeypatch.setattr(finetune_run, "train_one_epoch", train_one_epoch)
    with interrupted_after_epoch(monkeypatch, 1):
        run_calibrate(replace(request, resume=True))
    assert torch.load(work / "checkpoint.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(VitpruneError, match=r"other settings \(lr\)"):
        run_calibrate(replace(request, resume=True, finetune=replace(request.finetune, lr=2e-2)))
    result = run_calibrate(replace(request, resume=True))
    assert not work.exists()
    report = json.loads((out / "report.json").read_text())
    assert report["plan"] == result.report["plan"] and report["gmacs"] <= 0.6 * report["gmacs_base"] + 1e-9
    tuning, calibration = report["finetune"], report["calibration"]
    assert [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]] == ["0", "1", "2"]
    assert tuning["epochs"] == 2 and tuning["train_images"] == 6 and tuning["val_images"] == 6
    epoch_seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(io.StringIO((out / "metrics.csv").read_text()))
                     if row["epoch_seconds"]]
    assert len(epoch_seconds) == 2 and tuning["train_seconds"] == pytest.approx(sum(epoch_seconds), abs=0.1)  # both parts
    assert set(result.calibration_files).isdisjoint(result.holdout_files) and len(result.holdout_files) == 6
    assert calibration["images"]["holdout"] == 6 and "search_seconds" in calibration
    assert report["reference"]["compared_with"] == "teacher"
    before, after = tuning["variants"][0]["before"], tuning["variants"][0]["after"]
    assert report["top1"] == pytest.approx(after["top1"], abs=0.01)
    assert report["top1_base"] == pytest.approx(tuning["teacher"]["top1"], abs=0.01)
    assert after["agreement_ci95"][0] <= after["agreement"] <= after["agreement_ci95"][1]  # i26's intervals
    assert "top1_drop_ci95" in after and "kl_ci95" in after and "kl_ci95" not in before
    assert "top1" in before and (out / "pareto.png").is_file() and (out / "teacher.safetensors").is_file()
    assert "Before fine-tuning: the search" in (out / "report.md").read_text()
    # the artifact reports against the model it started from after save and load
    torch.manual_seed(0)
    teacher = load_base("vit_tiny_patch16_224", no_pretrained=True, img_size=64).model
    assert state_sha256(load_base(str(out)).reference) == state_sha256(teacher)


@pytest.mark.parametrize(("args", "message"), [
    (["--epochs", "2"], "go with --finetune"),
    (["--resume"], "go with --finetune"),
    (["--finetune", "--epochs", "0"], "epochs"),
    (["--finetune", "--lr", "nan"], "lr"),
    (["--finetune", "--trainable", ","], "trainable"),
    (["--device", "cuda"], "--device cuda is where the fine-tuning stage runs"),
    (["--finetune", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
])
def test_bad_finetune_options_exit_2_with_one_line(args, message, images: Path, tmp_path: Path, capsys) -> None:
    code = run(["calibrate", "vit_tiny_patch16_224", "--no-pretrained", "--data", str(images), "--target-ratio", "0.6",
                *args, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and message in err
    assert not (tmp_path / "out").exists()
