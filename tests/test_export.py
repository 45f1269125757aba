"""`vitprune export`: ONNX with the reduction in the graph, parity on ONNX Runtime, refusals."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import onnx
import pytest
import timm
import torch

import vitprune
from vitprune.cli import run
from vitprune.errors import VitpruneError
from vitprune.export import (
    bench_onnx,
    export_onnx,
    onnx_file_summary,
    onnx_predict,
    onnx_session,
    verify_onnx,
)
from vitprune.io import file_sha256

IMG = 64  # 16 patch tokens + CLS: exports and ORT runs stay well under a second each
SETTINGS = {"evit": {"keep": 0.7}, "tome": {"r": 4}, "ats": {"keep": 1.0}}
# The ops that carry each reduction in the graph (EViT: top-k + gather; ToMe: the scatter-add
# merge; ATS: inverse-transform sampling over the score CDF).
REDUCTION_OPS = {"evit": {"TopK", "GatherElements"}, "tome": {"TopK", "GatherElements"},
                 "ats": {"CumSum", "ArgMin", "TopK"}}


def tiny(method: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A 4-block random vit_tiny at 64 px: cheap to export and run."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=4)
    if method is not None:
        vitprune.apply(model, method=method, **SETTINGS[method])
    return model.eval()


def images(count: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["evit", "tome", "ats"])
def test_export_keeps_the_reduction_and_matches_pytorch_at_any_batch(tmp_path, method):
    model = tiny(method)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    summary = onnx_file_summary(path)
    assert summary["opset"] == 17 and summary["batch"] == "dynamic"
    assert REDUCTION_OPS[method] <= set(summary["reduction_ops"])
    session = onnx_session(path, "cpu")
    for batch in (1, 3):
        x = images(batch)
        with torch.inference_mode():
            expected = model(x)
        got = onnx_predict(session, x, batch_size=batch)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-3
    assert not hasattr(model, "_vitprune_ats_pad_to")  # the export leaves the model as it was


@pytest.mark.parametrize("method", ["tome", "ats"])
def test_head_only_last_block_exports_and_matches(tmp_path, method):
    model = tiny()
    vitprune.apply(model, method=method, layers=[0, 1], head_only=True, **SETTINGS[method])
    assert_onnx_matches(model, tmp_path / "m.onnx")


def assert_onnx_matches(model: torch.nn.Module, path) -> None:
    """Export `model` to `path`; ONNX Runtime must give PyTorch's logits on 3 images."""
    export_onnx(model, path)
    x = images(3)
    with torch.inference_mode():
        expected = model(x)
    assert (onnx_predict(onnx_session(path, "cpu"), x, batch_size=3) - expected).abs().max() < 1e-3


def test_exported_graph_really_drops_tokens(tmp_path):
    # EViT at keep 0.5 in block 0 must run every MLP on 1 CLS + 8 kept + 1 fused = 10 tokens instead
    # of 17: expose the MLP inputs (fc1 MatMul outputs) of the graph and look at their shapes.
    model = tiny()
    vitprune.apply(model, method="evit", keep=0.5, layers=[0])
    export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx"))
    fc1 = [node.output[0] for node in graph.graph.node if node.op_type == "MatMul" and "/fc1" in node.name]
    assert len(fc1) == 4
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in fc1)
    onnx.save(graph, str(tmp_path / "probe.onnx"))
    session = onnx_session(tmp_path / "probe.onnx", "cpu")
    outputs = session.run(fc1, {"images": images(3).numpy()})
    assert {out.shape for out in outputs} == {(3, 10, 768)}


def test_ats_static_padding_matches_the_data_dependent_form(tmp_path):
    model = tiny("ats")
    export_onnx(model, tmp_path / "batch.onnx", ats_padding="batch")
    export_onnx(model, tmp_path / "cap.onnx", ats_padding="cap")
    x = images(4)
    by_batch = onnx_predict(onnx_session(tmp_path / "batch.onnx", "cpu"), x)
    by_cap = onnx_predict(onnx_session(tmp_path / "cap.onnx", "cpu"), x)
    assert (by_batch - by_cap).abs().max() < 1e-4  # padding is masked: same logits
    assert not hasattr(model, "_vitprune_ats_pad_to")
    with pytest.raises(VitpruneError, match="ATS padding"):
        export_onnx(model, tmp_path / "x.onnx", ats_padding="none")


@pytest.mark.slow
def test_fixed_batch_and_fp16(tmp_path):
    model = tiny("tome")
    export_onnx(model, tmp_path / "fixed.onnx", batch=4)
    assert onnx_file_summary(tmp_path / "fixed.onnx")["batch"] == 4
    # A fixed-batch graph gets full batches: 6 images run as 4 + (2 padded to 4).
    report = verify_onnx(model, tmp_path / "fixed.onnx", images(6), provider="cpu")
    assert report["passed"] and report["n_images"] == 6 and report["agreement"] == 100.0

    export_onnx(model, tmp_path / "half.onnx", fp16=True)
    summary = onnx_file_summary(tmp_path / "half.onnx")
    assert summary["fp16"] and summary["bytes"] < 0.6 * onnx_file_summary(tmp_path / "fixed.onnx")["bytes"]
    report = verify_onnx(model, tmp_path / "half.onnx", images(6), provider="cpu")
    assert report["tolerance"] == 0.25 and report["passed"]
    assert 0 < report["max_abs_diff"] < 0.25  # fp16 differs, but within the documented tolerance


def test_verify_reports_a_mismatch(tmp_path):
    model = tiny("evit")
    export_onnx(model, tmp_path / "m.onnx")
    other = tiny("evit", seed=5)  # different weights: ONNX no longer matches this "PyTorch" model
    report = verify_onnx(other, tmp_path / "m.onnx", images(6), provider="cpu")
    assert not report["passed"] and report["problem"]
    assert report["max_abs_diff"] > 1e-2


@pytest.mark.parametrize("opset", [13, 16, 21])
def test_refuses_unsupported_opsets(tmp_path, opset):
    with pytest.raises(VitpruneError, match="opset"):
        export_onnx(tiny(), tmp_path / "m.onnx", opset=opset)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch", [0, -1, "many", 2.5])
def test_refuses_bad_batch(tmp_path, batch):
    with pytest.raises(VitpruneError, match="batch"):
        export_onnx(tiny(), tmp_path / "m.onnx", batch=batch)


def test_refuses_unwritable_and_missing_folders(tmp_path, monkeypatch):
    with pytest.raises(VitpruneError, match="does not exist"):
        export_onnx(tiny(), tmp_path / "missing" / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the permission check see a read-only folder
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    else:
        locked.chmod(0o500)
    try:
        with pytest.raises(VitpruneError, match="not writable"):
            export_onnx(tiny(), locked / "m.onnx")
    finally:
        locked.chmod(0o700)
    assert list(locked.iterdir()) == []


def test_bench_onnx_times_both_graphs(tmp_path):
    export_onnx(tiny(), tmp_path / "base.onnx")
    export_onnx(tiny("evit"), tmp_path / "evit.onnx", batch=2)
    timing = bench_onnx({"base": tmp_path / "base.onnx", "reduced": tmp_path / "evit.onnx"}, images(2),
                        (1, 2), warmup=1, repeats=2, provider="cpu", threads=1)
    assert timing["provider"] == "CPUExecutionProvider"
    assert set(timing["ms_per_image"]["base"]) == {1, 2}
    assert set(timing["ms_per_image"]["reduced"]) == {2}  # a fixed-batch graph runs at its batch only
    assert all(ms > 0 for per_batch in timing["ms_per_image"].values() for ms in per_batch.values())


# --- the command ---------------------------------------------------------------------------------

def cli(*args) -> int:
    return run(["export", *map(str, args)])


@pytest.mark.slow
def test_cli_apply_and_export_with_safetensors_round_trip(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = cli("vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "ats", "--keep", 1.0,
               "--onnx", out / "m.onnx", "--safetensors", out / "m.safetensors", "--json")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "ats" and report["onnx"]["parity"]["passed"]
    assert report["onnx"]["parity"]["images"] == "random" and report["onnx"]["parity"]["n_images"] == 8
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "m.safetensors", "report.json", "report.md"]
    assert "## ONNX" in (out / "report.md").read_text()
    assert report["onnx"]["sha256"] == file_sha256(out / "m.onnx")
    assert json.loads((out / "report.json").read_text())["onnx"]["sha256"] == report["onnx"]["sha256"]
    assert report["onnx"]["sha256"] in (out / "report.md").read_text()

    rebuilt = vitprune.load(out / "m.safetensors")
    assert vitprune.plan_of(rebuilt).method == "ats"
    session = onnx_session(out / "m.onnx", "cpu")
    x = images(3)
    with torch.inference_mode():
        logits = rebuilt(x)
    assert np.allclose(onnx_predict(session, x).numpy(), logits.numpy(), atol=1e-3)

    # Again without --force: refused before any work, files untouched.
    before = (out / "m.onnx").stat().st_mtime_ns
    assert cli(out / "m.safetensors", "--onnx", out / "m.onnx") == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "m.onnx").stat().st_mtime_ns == before


@pytest.mark.slow
def test_cli_extends_the_report_of_an_artifact_folder(tmp_path, capsys):
    from vitprune.models import create_model

    artifact = tmp_path / "art"
    model, _ = create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG)  # loadable by name
    vitprune.apply(model, method="evit", keep=0.7)
    vitprune.save(artifact, model, {"model": "vit_tiny_patch16_224"}, report={
        "model": "vit_tiny_patch16_224", "plan": vitprune.plan_of(model).describe(), "gmacs": 1.0, "gmacs_base": 2.0,
        "gmacs_reduction": 0.5, "method": "evit", "tag": None})
    assert cli(artifact, "--onnx", artifact / "model.onnx", "--onnx-batch", 2, "--json") == 0
    report = json.loads((artifact / "report.json").read_text())
    assert report["gmacs"] == 1.0  # the artifact's own figures are kept
    assert report["onnx"]["batch"] == 2 and report["onnx"]["parity"]["agreement"] == 100.0


@pytest.mark.slow
def test_cli_fails_and_writes_nothing_when_parity_fails(tmp_path, monkeypatch, capsys):
    import vitprune.export.graph as export_module  # where the export step looks verify_onnx up

    real = export_module.verify_onnx

    def broken_runtime(*args, **kwargs):
        report = real(*args, **kwargs)
        return {**report, "agreement": 90.0, "passed": False,
                "problem": "top-1 agreement with PyTorch 90.00% is below 99.5%"}

    monkeypatch.setattr(export_module, "verify_onnx", broken_runtime)
    code = cli("vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "tome", "--r", 4,
               "--onnx", tmp_path / "m.onnx", "--safetensors", tmp_path / "m.safetensors")
    assert code == 2
    assert "agreement" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--opset", 13], "opset"),
    (["--onnx-batch", "lots"], "onnx-batch"),
    (["--provider", "tpu"], "provider"),
    (["--ats-padding", "none"], "ATS padding"),
    (["--r", 4], "r is not a parameter of evit"),
])
def test_cli_refusals(tmp_path, capsys, args, message):
    code = cli("vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "evit", "--keep", 0.7,
               "--onnx", tmp_path / "m.onnx", *args)
    assert code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_missing_folder_and_same_file(tmp_path, capsys):
    base = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "evit", "--keep", 0.7]
    assert cli(*base, "--onnx", tmp_path / "nope" / "m.onnx") == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(*base, "--onnx", tmp_path / "m.x", "--safetensors", tmp_path / "m.x") == 2
    assert "same file" in capsys.readouterr().err


def test_tome_protect_exports_and_matches(tmp_path):
    model = tiny()
    vitprune.apply(model, method="tome", r=4, protect=0.3)
    assert_onnx_matches(model, tmp_path / "m.onnx")


EVIT = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "evit", "--keep", 0.7]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


def test_dataset_options_without_a_dataset_are_one_line_and_nothing_written(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    assert cli(*EVIT, "--onnx", tmp_path / "out" / "m.onnx", "--data", folder, "--split", "val") == 2
    assert "split" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_onnx_path_it_cannot_write_before_any_work(tmp_path, capsys, monkeypatch):
    import vitprune.commands.export as command

    monkeypatch.setattr(command, "build_reduced", lambda *args: pytest.fail("a model was built first"))
    assert cli(*EVIT, "--onnx", "/proc/m.onnx") == 2
    assert "cannot write /proc/m.onnx" in _one_error_line(capsys)
    assert cli(*EVIT, "--onnx", tmp_path / "m.onnx", "--safetensors", "/proc/m.safetensors") == 2
    assert "cannot write /proc/m.safetensors" in _one_error_line(capsys)
    if os.geteuid() != 0:  # root writes into a read-only folder: /proc above stands for it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert cli(*EVIT, "--onnx", locked / "m.onnx") == 2
        assert "not writable" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["locked"])


def test_cli_disk_full_while_exporting_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def disk_full(model, args, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial graph")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    assert cli(*EVIT, "--onnx", tmp_path / "m.onnx") == 2
    assert f"disk full while writing {tmp_path / 'm.onnx'}" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_disk_full_while_writing_the_report_leaves_nothing(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    write_text = Path.write_text

    def full_for_the_report(self, *args, **kwargs):
        if self.name.startswith(".report.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_for_the_report)
    assert cli(*EVIT, "--onnx", tmp_path / "m.onnx", "--safetensors", tmp_path / "m.safetensors", "--json") == 2
    assert f"disk full while writing {tmp_path / 'report.json'}" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []  # the ONNX file, the weights and every temporary file are gone


def test_verify_on_a_stream_of_batches_equals_verify_on_the_held_images(tmp_path):
    model = tiny("ats")
    export_onnx(model, tmp_path / "m.onnx")
    held = images(7)
    streamed = verify_onnx(model, tmp_path / "m.onnx", iter(held.split(3)), batch_size=3, provider="cpu")
    assert streamed == verify_onnx(model, tmp_path / "m.onnx", held, batch_size=3, provider="cpu")
    for empty in (iter(()), images(0)):
        with pytest.raises(VitpruneError, match="no images"):
            verify_onnx(model, tmp_path / "m.onnx", empty, provider="cpu")


@pytest.mark.slow
def test_export_with_data_checks_and_measures_every_image_streamed(labelled_images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    code = cli("vit_tiny_patch16_224", "--no-pretrained", "--img-size", IMG, "--method", "tome", "--r", 4,
               "--data", labelled_images, "--limit", 11, "--workers", 0, "--onnx", out / "m.onnx",
               "--onnx-batch", 4, "--bench", "--bench-batch", "2", "--bench-repeats", 1, "--json")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    parity = report["onnx"]["parity"]
    assert parity["images"] == "real" and parity["n_images"] == 11 and parity["passed"]  # 4 + 4 + 3 padded to 4
    assert report["data"]["n_images"] == 11 and "top1" in report and "agreement" in report
    assert report["onnx"]["batch"] == 4 and report["onnx"]["gmacs_speedup"] > 1
