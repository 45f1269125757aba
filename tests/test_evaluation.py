"""Evaluation at dataset scale: one streamed path, per-image terms, 95% intervals, torchrun, bad images."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from vitprune.cli import run
from vitprune.data import leave_stops_to_main
from vitprune.evaluation import Evidence, classification_figures, compare
from vitprune.metrics import mean_interval, prediction_terms, proportion_interval

REPO = Path(__file__).resolve().parents[1]
IMAGES = 20
# the figures that must not depend on how the images were split (timing and process count may)
SPLIT_FREE = ("images_per_s", "processes")


def _write_folder(root: Path, count: int = IMAGES) -> Path:
    """`count` labelled images (index class folders), a few sizes and colours."""
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        pixels = (torch.rand(24 + index % 5, 30, 3, generator=generator) * 255).to(torch.uint8).numpy()
        folder = root / str(index % 3)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViT's weights, so every process builds the same model."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def _apply_args(data: Path, checkpoint: Path, out: Path) -> list[str]:
    return ["apply", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--img-size", "32",
            "--method", "ats", "--keep", "0.6", "--data", str(data), "--batch-size", "4", "--workers", "1",
            "-o", str(out)]


def _figures(report: dict) -> dict:
    data = {key: value for key, value in report["data"].items() if key not in SPLIT_FREE}
    return {**{key: value for key, value in report.items() if key not in ("data", "versions")}, "data": data}


def test_intervals() -> None:
    """A paired interval is the mean +- 1.96 standard errors; Wilson's stays in [0, 1] with width at 100%."""
    differences = torch.tensor([1.0, 0.0, 0.0, -1.0, 1.0, 0.0, 1.0, 0.0])
    low, high = mean_interval(differences)
    half = 1.959963984540054 * differences.double().std().item() / 8 ** 0.5
    assert (low, high) == pytest.approx((0.25 - half, 0.25 + half), abs=1e-12)
    assert mean_interval(torch.tensor([1.0])) is None
    low, high = proportion_interval(torch.ones(100, dtype=torch.bool))
    assert high == 1.0 and low == pytest.approx(0.963, abs=1e-3)  # Wilson: 100/100 still leaves 3.7 points
    low, high = proportion_interval(torch.tensor([True] * 9 + [False]))
    assert (low, high) == pytest.approx((0.5958, 0.9821), abs=1e-4)


def test_the_kl_interval_stays_at_or_above_zero() -> None:
    # one image of eight disagrees: mean 0.125 +- 1.96 x 0.354 / sqrt(8) reaches below 0, which no KL does
    base = torch.zeros(8, 3)
    reduced = base.clone()
    reduced[0] = torch.tensor([5.0, 0.0, 0.0])
    figures = classification_figures(prediction_terms(reduced, base, None))
    low, high = figures["kl_ci95"]
    assert low == 0.0 and high > figures["kl"] > 0


def test_streamed_figures_match_held_images() -> None:
    """Held images cut into batches give the figures of the whole tensors at once, with intervals."""
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7).eval()
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10) % 7
    measured = compare(base, base, Evidence(images=images, labels=labels, batch_size=3, progress=False))
    with torch.inference_mode():
        logits = base(images)
    whole = classification_figures(prediction_terms(logits, logits, labels))
    assert measured["data"]["n_images"] == 10
    for key in ("top1", "top5", "top1_drop", "top1_drop_ci95", "agreement", "agreement_ci95"):
        assert measured[key] == whole[key], key
    assert measured["top1_drop_ci95"] == [0.0, 0.0] and measured["agreement"] == 100.0


@pytest.mark.slow  # two torchrun processes start torch and timm: ~50 s on 2 loaded cores
def test_torchrun_two_processes_report_as_one(tmp_path: Path, checkpoint: Path) -> None:
    """`torchrun --nproc-per-node 2 -m vitprune apply` (gloo on CPU) splits 20 images without
    duplicates and rank 0 writes the report one process writes."""
    data = _write_folder(tmp_path / "images")
    assert run([*_apply_args(data, checkpoint, tmp_path / "one"), "--json"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "vitprune", *_apply_args(data, checkpoint, tmp_path / "two"), "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["data"]["processes"] == 2 and two["data"]["n_images"] == IMAGES
    assert _figures(two) == _figures(one)
    assert json.loads(done.stdout)["top1"] == one["top1"]  # rank 0 alone prints the report


def test_unreadable_image_in_the_middle(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    """A broken file among good ones stops the run with one line naming it; nothing is written."""
    data = _write_folder(tmp_path / "images")
    (data / "1" / "010.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    assert run([*_apply_args(data, checkpoint, out), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read image ") and "010.png" in err and "\n" not in err
    assert not out.exists()


class _SignalHandlers(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> tuple:
        return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_workers_leave_ctrl_c_to_the_main_process() -> None:
    """A terminal's Ctrl-C reaches every worker too: they ignore it (and SIGTERM), so only the main
    process prints its one line and stops them (checked by hand on a whole process group, docs/inputs.md)."""
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        loader = torch.utils.data.DataLoader(_SignalHandlers(), num_workers=1, worker_init_fn=leave_stops_to_main,
                                             collate_fn=lambda items: items[0])
        assert list(loader) == [(signal.SIG_IGN, signal.SIG_IGN)]
    finally:
        signal.signal(signal.SIGINT, previous)
