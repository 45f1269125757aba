"""Fine-tuned artifacts judged against their teacher; calibrate's fine-tuning stage (one run to a budget)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitprune.commands.apply import ApplyRequest, run_apply
from vitprune.commands.finetune import FinetuneRequest, run_finetune
from vitprune.errors import VitpruneError
from vitprune.source import load_base
from vitprune.teacher import TEACHER_FILE, state_sha256

TINY = dict(model="vit_tiny_patch16_224", no_pretrained=True, img_size=32, workers=0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """8 labelled images, 2 classes (index folders)."""
    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for label in range(2):
        for index in range(4):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8)
            pixels[..., label] = 255 - 40 * index
            path = root / str(label) / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.numpy()).save(path)
    return root


@pytest.fixture(scope="module")
def finetuned(images: Path, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """(a ToMe artifact fine-tuned for 1 epoch from a random tiny ViT, that ViT (the teacher))."""
    out = tmp_path_factory.mktemp("ft") / "ft"
    torch.manual_seed(0)
    run_finetune(FinetuneRequest(**TINY, data=images, val=images, method="tome", r=2, epochs=1, batch_size=4,
                                 warmup_epochs=0.0, lr=1e-2, eval_batch_size=8, output=out))
    torch.manual_seed(0)
    teacher = load_base("vit_tiny_patch16_224", no_pretrained=True, img_size=32).model
    return out, teacher


def test_a_finetuned_artifact_records_and_rebuilds_its_teacher(finetuned) -> None:
    out, teacher = finetuned
    metadata = json.loads((out / "vitprune.json").read_text())
    record = metadata["teacher"]
    assert record["model"] == "vit_tiny_patch16_224" and record["weights_sha256"] == state_sha256(teacher)
    assert 0 < record["tensors"] < len(teacher.state_dict())  # norms and biases only
    base = load_base(str(out))
    assert state_sha256(base.model) != state_sha256(teacher)  # the fine-tuned weights
    assert base.teacher is not None and state_sha256(base.teacher) == record["weights_sha256"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(base.teacher(x), teacher.eval()(x))
    assert json.loads((out / "report.json").read_text())["reference"]["compared_with"] == "teacher"


def test_apply_on_a_finetuned_artifact_reports_against_its_teacher(finetuned, images: Path, tmp_path: Path) -> None:
    out, teacher = finetuned
    result = run_apply(ApplyRequest(model=str(out), data=images, workers=0, progress=False, output=tmp_path / "a"))
    report = result.report
    with torch.no_grad():
        from vitprune.source import load_images_for
        pixels, labels, _ = load_images_for(teacher, images, limit=None, workers=0, progress=False)
        teacher_top1 = (teacher.eval()(pixels).argmax(-1) == labels).float().mean().item() * 100
        unreduced = load_base(str(out)).model
        unreduced_top1 = (unreduced(pixels).argmax(-1) == labels).float().mean().item() * 100
    assert report["top1_base"] == pytest.approx(teacher_top1, abs=0.01)
    assert report["reference"]["compared_with"] == "teacher"
    assert report["reference"]["finetuned_unreduced"]["top1"] == pytest.approx(unreduced_top1, abs=0.01)
    assert "the teacher this artifact was fine-tuned from: vit_tiny_patch16_224" in (tmp_path / "a" / "report.md").read_text()


def test_without_the_teacher_file_the_report_says_what_it_compares_with(finetuned, images: Path,
                                                                       tmp_path: Path) -> None:
    out, _ = finetuned
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        if file.name != TEACHER_FILE:
            (copy / file.name).write_bytes(file.read_bytes())
    report = run_apply(ApplyRequest(model=str(copy), data=images, workers=0, progress=False)).report
    assert report["reference"]["compared_with"] == "fine-tuned weights unreduced"


def test_a_changed_teacher_file_is_refused(finetuned, tmp_path: Path) -> None:
    out, _ = finetuned
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    data = bytearray((copy / TEACHER_FILE).read_bytes())
    data[-1] ^= 1
    (copy / TEACHER_FILE).write_bytes(bytes(data))
    with pytest.raises(VitpruneError, match="sha256"):
        load_base(str(copy))
