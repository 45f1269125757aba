"""Image folder layouts, preprocessing, prediction and metrics."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from vitprune.data import (
    ImageSet,
    data_config_for,
    find_images,
    load_images,
    predict,
    split,
    transform_for,
)
from vitprune.errors import VitpruneError
from vitprune.metrics import classification_metrics

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE_IMAGES = SHARED_DATA / "images" / "imagenet-sample-images"
VIT_TINY_WEIGHTS = SHARED_DATA / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.pth"


def _write_image(path: Path, shade: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, 255 - shade, shade // 2)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def test_imagefolder_with_wnid_folders_uses_imagenet_indices(tmp_path: Path) -> None:
    _write_image(tmp_path / "n15075141" / "b.png")  # the last ImageNet-1k class
    _write_image(tmp_path / "n01440764" / "a.png")
    _write_image(tmp_path / "n01443537" / "nested" / "c.PNG")
    image_set = find_images(tmp_path)
    assert image_set.layout == "imagefolder"
    assert [file.relative_to(tmp_path).as_posix() for file in image_set.files] == [
        "n01440764/a.png",
        "n01443537/nested/c.PNG",
        "n15075141/b.png",
    ]
    assert image_set.labels == [0, 1, 999]


def test_imagefolder_with_index_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "3" / "x.png")
    _write_image(tmp_path / "10" / "y.png")
    image_set = find_images(tmp_path)
    assert image_set.labels == [10, 3]  # folders in name order, labels from the names


def test_imagefolder_with_arbitrary_names_uses_sorted_order(tmp_path: Path) -> None:
    _write_image(tmp_path / "dog" / "1.png")
    _write_image(tmp_path / "cat" / "1.png")
    _write_image(tmp_path / "cat" / "2.png")
    (tmp_path / "empty_class").mkdir()  # still takes an index, as in torchvision
    _write_image(tmp_path / "zebra" / "1.png")
    image_set = find_images(tmp_path)
    assert image_set.labels == [0, 0, 1, 3]


def test_imagefolder_refuses_stray_folder_among_wnids(tmp_path: Path) -> None:
    _write_image(tmp_path / "n01440764" / "a.png")
    _write_image(tmp_path / "misc" / "b.png")
    with pytest.raises(VitpruneError, match="'misc' is not an ImageNet-1k wnid"):
        find_images(tmp_path)


def test_labels_csv_layout(tmp_path: Path) -> None:
    _write_image(tmp_path / "b.png")
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "not_listed.png")
    (tmp_path / "labels.csv").write_text("file,wnid,class_index\nb.png,n01443537,1\na.png,n01440764,0\n")
    image_set = find_images(tmp_path)
    assert image_set.layout == "labels_csv"
    assert [file.name for file in image_set.files] == ["a.png", "b.png"]
    assert image_set.labels == [0, 1]


def test_plain_images_are_unlabelled(tmp_path: Path) -> None:
    _write_image(tmp_path / "b.png")
    _write_image(tmp_path / "A.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "c.JPEG").write_bytes((tmp_path / "b.png").read_bytes())
    image_set = find_images(tmp_path)
    assert image_set.layout == "unlabelled"
    assert image_set.labels is None
    assert [file.name for file in image_set.files] == ["A.png", "b.png", "c.JPEG"]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda root: root / "missing", "^image folder not found: .*missing$"),
        (lambda root: root, "^no images found in "),
        (lambda root: _write_image(root / "x.png"), "is a file, not a folder"),
    ],
)
def test_folder_errors(tmp_path: Path, build, message: str) -> None:
    with pytest.raises(VitpruneError, match=message):
        find_images(build(tmp_path))


def test_loose_images_next_to_class_folders_are_refused(tmp_path: Path) -> None:
    _write_image(tmp_path / "loose.png")
    _write_image(tmp_path / "cat" / "1.png")
    with pytest.raises(VitpruneError, match="mixes loose images"):
        find_images(tmp_path)


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("file,class_index\na.png,0\nmissing.png,1\n", "line 3 names a missing file: 'missing.png'"),
        ("file,label\na.png,0\n", "needs the columns file,class_index \\(found: file, label\\)"),
        ("file,class_index\na.png,cat\n", "line 2: class_index 'cat' is not a non-negative integer"),
        ("file,class_index\n", "no images listed in"),
    ],
)
def test_labels_csv_errors(tmp_path: Path, csv_text: str, message: str) -> None:
    _write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(csv_text)
    with pytest.raises(VitpruneError, match=message):
        find_images(tmp_path)


def test_labels_csv_file_listed_twice(tmp_path: Path) -> None:
    """Two classes for one file are refused naming both lines; an exact repeat counts the image once."""
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "b.png")
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,0\nb.png,1\n./a.png,3\n")
    with pytest.raises(VitpruneError, match=r"line 4 lists a.png as class 3, but line 2 lists it as class 0"):
        find_images(tmp_path)
    (tmp_path / "labels.csv").write_text("file,class_index\na.png,0\nb.png,1\n./a.png,0\n")
    image_set = find_images(tmp_path)
    assert [file.name for file in image_set.files] == ["a.png", "b.png"] and image_set.labels == [0, 1]


def test_unreadable_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(VitpruneError, match="^cannot read .*labels.csv: "):
        find_images(tmp_path)


def test_limit_and_seed_are_deterministic(tmp_path: Path) -> None:
    for index in range(20):
        _write_image(tmp_path / f"{index:02d}.png")
    first = find_images(tmp_path, limit=5, seed=1)
    assert first.files == find_images(tmp_path, limit=5, seed=1).files
    assert first.files != find_images(tmp_path, limit=5, seed=2).files
    assert first.files == sorted(first.files) and len(first) == 5
    assert len(find_images(tmp_path, limit=100)) == 20
    with pytest.raises(VitpruneError, match="image limit must be a positive integer"):
        find_images(tmp_path, limit=0)


def test_split_is_disjoint_and_deterministic() -> None:
    image_set = ImageSet([Path(f"{index}.png") for index in range(10)], list(range(10)), "labels_csv")
    calibration, holdout = split(image_set, 0.3, seed=0)
    assert len(holdout) == 3 and len(calibration) == 7
    assert set(calibration.files).isdisjoint(holdout.files)
    assert sorted(calibration.files + holdout.files) == sorted(image_set.files)
    assert [int(file.stem) for file in holdout.files] == holdout.labels  # labels follow their files
    assert split(image_set, 0.3, seed=0) == (calibration, holdout)
    assert split(image_set, 0.3, seed=1) != (calibration, holdout)
    with pytest.raises(VitpruneError, match="holdout fraction must be between 0 and 1"):
        split(image_set, 1.0, seed=0)


def test_transform_follows_model_and_img_size(tiny_model: torch.nn.Module) -> None:
    image = Image.new("RGB", (300, 200))
    assert transform_for(tiny_model)(image).shape == (3, 224, 224)
    assert transform_for(tiny_model, img_size=160)(image).shape == (3, 160, 160)
    small_model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=160)
    config = data_config_for(small_model)
    assert config["input_size"] == (3, 160, 160)
    assert config["crop_pct"] == data_config_for(tiny_model)["crop_pct"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_load_images_and_predict(tmp_path: Path, tiny_model: torch.nn.Module, num_workers: int) -> None:
    for index in range(5):
        _write_image(tmp_path / ("n01440764" if index < 3 else "n01443537") / f"{index}.png", shade=index * 40)
    image_set = find_images(tmp_path)
    transform = transform_for(tiny_model)
    images, labels = load_images(image_set, transform, num_workers=num_workers, batch_size=2, progress=False)
    assert images.shape == (5, 3, 224, 224) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1]
    logits = predict(tiny_model, images, batch_size=2, progress=False)
    assert logits.shape == (5, 1000) and logits.dtype == torch.float32
    with torch.inference_mode():
        assert torch.allclose(logits, tiny_model(images), atol=1e-5)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_is_a_one_line_error(tmp_path: Path, tiny_model: torch.nn.Module, num_workers: int) -> None:
    _write_image(tmp_path / "good.png")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    with pytest.raises(VitpruneError, match=f"^cannot read image {corrupt}: ") as raised:
        load_images(find_images(tmp_path), transform_for(tiny_model), num_workers=num_workers, progress=False)
    assert "\n" not in str(raised.value)


def test_metrics_with_labels_only() -> None:
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5, 0],  # label 0: top-1 hit
            [0.0, 9, 8, 7, 6, 5, 1],  # label 5: top-5 hit only
            [0.0, 9, 8, 7, 6, 5, 1],  # label 6: miss
            [1.0, 2, 3, 4, 5, 6, 7],  # label 6: top-1 hit
        ]
    )
    metrics = classification_metrics(logits, torch.tensor([0, 5, 6, 6]), None)
    assert metrics == {"n_images": 4, "top1": 50.0, "top5": 75.0}
    assert all(isinstance(value, float) for key, value in metrics.items() if key != "n_images")


def test_metrics_against_reference() -> None:
    reference = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    identical = classification_metrics(reference.clone(), None, reference)
    assert identical == {"n_images": 2, "agreement": 100.0, "kl": 0.0}

    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 2.0]])  # image 1: p = (3/4, 1/4); image 2: top-1 flips
    metrics = classification_metrics(logits, torch.tensor([1, 0]), reference)
    reference_p = [(0.5, 0.5), (1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)))]
    model_p = [(0.75, 0.25), (1 / (1 + math.exp(2)), 1 / (1 + math.exp(-2)))]
    expected_kl = sum(
        sum(r * math.log(r / m) for r, m in zip(ref, mod)) for ref, mod in zip(reference_p, model_p)
    ) / 2
    assert metrics["agreement"] == 50.0
    assert metrics["kl"] == pytest.approx(expected_kl, rel=1e-6)  # logits are float32
    assert metrics["top1"] == 0.0 and metrics["top5"] == 100.0  # 2 classes: top-5 covers both


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(VitpruneError, match="labels shape"):
        classification_metrics(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long), None)
    with pytest.raises(VitpruneError, match="outside the model's 4 classes"):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 7]), None)
    with pytest.raises(VitpruneError, match="reference logits shape"):
        classification_metrics(torch.zeros(2, 4), None, torch.zeros(2, 5))


@pytest.mark.slow
def test_real_images_with_real_weights() -> None:
    if not (SAMPLE_IMAGES.is_dir() and VIT_TINY_WEIGHTS.is_file()):
        pytest.skip(f"shared data not found under {SHARED_DATA}")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(torch.load(VIT_TINY_WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    model.eval()

    image_set = find_images(SAMPLE_IMAGES, limit=200, seed=0)
    assert image_set.layout == "labels_csv" and len(image_set) == 200
    images, labels = load_images(image_set, transform_for(model), progress=False)
    metrics = classification_metrics(predict(model, images, progress=False), labels, None)

    assert metrics["n_images"] == 200
    assert metrics["top1"] > 70.0  # 82.8 % on all 1000 images (PROVENANCE.md)
    assert metrics["top5"] > 88.0
