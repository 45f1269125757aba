"""Datasets timm reads as --data: a local Hugging Face dataset (parquet), WebDataset shards, a .tar of images."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from vitprune.cli import run

datasets = pytest.importorskip("datasets")  # the data extra
pytest.importorskip("webdataset")

WNIDS = ["n01440764", "n01443537"]  # ImageNet classes 0 and 1
LABELS = [0, 1, 1, 0, 1, 0]
TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32"]
CALIBRATE_FAST = ["--img-sizes", "32", "--search-images", "2", "--refine-steps", "1", "--bench-repeats", "1",
                  "--bench-batch", "2", "--threads", "1", "--holdout", "0.5"]


def _jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    encoded = []
    for _ in LABELS:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(buffer, "JPEG")
        encoded.append(buffer.getvalue())
    return encoded


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same six images as a class-folder tree, a parquet dataset, two WebDataset shards and a .tar."""
    root = tmp_path_factory.mktemp("datasets")
    jpegs = _jpegs()
    for index, (payload, label) in enumerate(zip(jpegs, LABELS)):
        folder = root / "folder" / WNIDS[label]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:03d}.jpg").write_bytes(payload)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=WNIDS)})
    rows = {"image": [{"bytes": payload, "path": None} for payload in jpegs], "label": LABELS}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "parquet" / "data.parquet"))
    (root / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(root / "shards" / f"val-{shard:03d}.tar", "w") as archive:
            for index in range(shard * 3, shard * 3 + 3):
                _add(archive, f"{index:03d}.jpg", jpegs[index])
                _add(archive, f"{index:03d}.cls", str(LABELS[index]).encode())
    (root / "shards" / "bad-000.tar").write_bytes(b"not a tar file")
    with tarfile.open(root / "images.tar", "w") as archive:
        for index, (payload, label) in enumerate(zip(jpegs, LABELS)):
            _add(archive, f"{WNIDS[label]}/{index:03d}.jpg", payload)
    return root


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _apply(capsys, *args) -> dict:
    torch.manual_seed(0)  # the same random weights in every run
    assert run(["apply", *TINY, "--method", "tome", "--r", "2", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _same_figures(report: dict, reference: dict) -> None:
    for key in ("gmacs_base", "gmacs", "top1_base", "top1", "top5", "agreement"):
        assert report[key] == reference[key], key
    assert report["kl"] == pytest.approx(reference["kl"], abs=2e-5)  # another order and batch size
    assert report["data"]["n_images"] == reference["data"]["n_images"] and report["data"]["labelled"]


@pytest.mark.slow  # apply's streaming tests cover the reader in the fast tier
def test_export_streams_a_webdataset_split(sources, capsys, tmp_path):
    torch.manual_seed(0)
    assert run(["export", *TINY, "--method", "tome", "--r", "2", "--onnx", str(tmp_path / "m.onnx"), "--json",
                "--data", f"wds/{sources / 'shards'}", "--split", "val-{000..001}.tar", "--limit", "4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["data"]["n_images"] == 4 and report["onnx"]["parity"]["passed"]


@pytest.mark.slow
def test_apply_streams_every_dataset_to_the_figures_of_the_image_folder(sources, capsys):
    folder = _apply(capsys, "--data", str(sources / "folder"))
    for data, extra in ((f"hfds/{sources / 'parquet'}", []), (f"wds/{sources / 'shards'}", ["--split", "val-{000..001}.tar"]),
                        (str(sources / "images.tar"), [])):
        streamed = _apply(capsys, "--data", data, *extra, "--batch-size", "4")  # two batches
        _same_figures(streamed, folder)
        assert streamed["data"]["path"] == data


def test_apply_with_a_limit_and_a_latency_sample_from_the_stream(sources, capsys):
    report = _apply(capsys, "--data", f"wds/{sources / 'shards'}", "--split", "val-{000..001}.tar", "--limit", "4",
                    "--batch-size", "3", "--bench", "--bench-batch", "2", "--bench-repeats", "1")
    assert report["data"]["n_images"] == 4
    assert report["latency_setup"]["inputs"] == "real images"


@pytest.mark.slow
@pytest.mark.parametrize("data_key", ["parquet", "shards"])
def test_calibrate_on_a_dataset(sources, tmp_path, capsys, data_key):
    data = f"hfds/{sources / 'parquet'}" if data_key == "parquet" else f"wds/{sources / 'shards'}"
    extra = ["--split", "val-{000..001}.tar"] if data_key == "shards" else ["--label-field", "label"]
    out = tmp_path / "calibrated"
    torch.manual_seed(0)
    code = run(["calibrate", *TINY, "--data", data, *extra, "--target-ratio", "0.8", *CALIBRATE_FAST, "-o", str(out),
                "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["images"]["holdout"] == 3 and "top1" in report
    assert (out / "vitprune.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "hfds/{parquet}", "--split", "validation"], 'Unknown --split "validation"'),
    (["--data", "hfds/{parquet}", "--label-field", "class"], "has no label field 'class' (its fields: image, label)"),
    (["--data", "wds/{shards}", "--split", "test"], "split test not found"),
    (["--data", "wds/{shards}"], "a wds/ dataset needs a --split"),
    (["--data", "wds/{shards}", "--split", "bad-000.tar"], "unreadable WebDataset shard"),
    (["--data", "wds/{shards}", "--split", "val-{000..002}.tar"], "val-002.tar: no such file"),
    (["--data", "{folder}", "--split", "train"], "error: --split is for hfds/ and wds/ datasets, not an image folder"),
    (["--data", "{root}/missing.tar"], "dataset not found"),
])
def test_bad_datasets_are_one_error_line_exit_2(sources, capsys, args, message):
    places = {"parquet": sources / "parquet", "shards": sources / "shards", "folder": sources / "folder", "root": sources}
    args = [arg.format(**places) if "{" in arg and "{0" not in arg else arg for arg in args]
    assert run(["apply", *TINY, "--method", "tome", "--r", "2", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
