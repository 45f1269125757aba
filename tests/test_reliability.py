"""Bad input is one `error:` line and exit 2 (or a VitpruneError in the API); nothing half-written is left.

Non-finite numbers are errors, never results; artifacts are schema-checked and integrity-checked
when read; outputs are atomic under Ctrl-C and SIGTERM and get the usual permissions.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import build_family
from PIL import Image

import vitprune
from vitprune.artifact import report_json
from vitprune.cli import run
from vitprune.errors import VitpruneError

REPO = Path(__file__).resolve().parents[1]


def apply_args(*extra):
    return ["apply", "vit_tiny", "--no-pretrained", "--img-size", "96", *extra]


def assert_one_line_exit_2(args, message, capsys, written=None):
    code = run(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit {code}: {err!r}"
    assert err.count("\n") == 0 and err.startswith("error: ") and "Traceback" not in err, err
    assert message in err, err
    if written is not None:
        assert not Path(written).exists()


@pytest.fixture
def artifact(tmp_path):
    out = tmp_path / "artifact"
    assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out))) == 0
    return out


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


# 1. non-finite numbers are errors, never results


def test_non_finite_checkpoint_weights_are_refused(tmp_path, capsys):
    state = build_family("vit").state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    out = tmp_path / "out"
    args = ["apply", "vit_tiny", "--img-size", "96", "--checkpoint", str(path), "--method", "tome", "--r", "2"]
    assert_one_line_exit_2([*args, "-o", str(out)],
                           "non-finite weights (NaN or infinity in blocks.0.attn.qkv.weight)", capsys, out)


def test_non_finite_logits_are_an_error_not_agreement(images):
    from vitprune.data import predict

    model = build_family("vit")
    with torch.no_grad():
        model.head.bias.fill_(float("nan"))
    with pytest.raises(VitpruneError, match="non-finite logits"):
        predict(model, torch.randn(2, 3, 96, 96), progress=False)


def test_reports_are_strict_json():
    with pytest.raises(VitpruneError, match="not finite"):
        report_json({"top1": float("nan")})
    assert json.loads(report_json({"top1": None})) == {"top1": None}


def test_infinite_settings_are_refused_in_the_api():
    model = build_family("vit")
    with pytest.raises(VitpruneError, match="tome r must be a whole number"):
        vitprune.apply(model, method="tome", r=float("inf"))
    with pytest.raises(VitpruneError, match="ats keep must be"):
        vitprune.apply(model, method="ats", keep=float("inf"))
    with pytest.raises(VitpruneError, match="not a supported timm ViT"):
        vitprune.apply(timm.create_model("resnet18", pretrained=False), method="tome", r=2)


# 3. malformed artifacts and plans


@pytest.mark.slow
@pytest.mark.parametrize("edit,field", [
    (lambda meta: {}, "field format must be a whole number"),
    (lambda meta: {k: v for k, v in meta.items() if k != "model"}, "field model"),
    (lambda meta: [1, 2], "must be a JSON object"),
    (lambda meta: {k: v for k, v in meta.items() if k != "plan"}, "field plan is missing"),
    (lambda meta: {**meta, "model": {**meta["model"], "img_size": "big"}}, "model.img_size must be a whole number"),
    (lambda meta: {**meta, "model": {**meta["model"], "img_size": [64, 0]}},
     "model.img_size must be a positive integer or (height, width)"),
    (lambda meta: {**meta, "plan": {**meta["plan"], "img_size": "big"}}, "img_size must be a positive whole number"),
    (lambda meta: {**meta, "plan": {**meta["plan"], "reductions": [{"layer": 1, "method": "tome", "r": "abc"}]}},
     "reductions[0]: tome r must be a whole number in [0, 1000000]"),
    (lambda meta: {**meta, "plan": {**meta["plan"], "reductions": [{"layer": "x", "method": "tome", "r": 2}]}},
     "reductions[0].layer must be a whole number"),
    (lambda meta: {**meta, "plan": {**meta["plan"], "reductions": {"a": 1}}}, "reductions must be a list"),
])
def test_malformed_artifacts_name_the_file_and_the_field(artifact, edit, field, capsys):
    plan_file = artifact / "vitprune.json"
    plan_file.write_text(json.dumps(edit(json.loads(plan_file.read_text()))))
    with pytest.raises(VitpruneError, match="vitprune.json") as error:
        vitprune.load(artifact)
    assert field in str(error.value)
    assert_one_line_exit_2(["apply", str(artifact), "--method", "tome", "--r", "2"], field, capsys)


def test_a_malformed_plan_file_is_one_line(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"reductions": [{"layer": 3, "method": "evit", "keep": "abc"}]}))
    assert_one_line_exit_2(apply_args("--plan", str(plan)), "reductions[0]: evit keep must be a number in (0, 1]", capsys)


# 4. integrity of our own artifacts


def test_changed_weights_are_refused_unless_asked(artifact):
    weights = artifact / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8192:-4096] = bytes(4096)  # zeros: still finite weights, only the checksum tells
    weights.write_bytes(bytes(data))
    with pytest.raises(VitpruneError, match="sha256 mismatch"):
        vitprune.load(artifact)
    assert vitprune.load(artifact, verify=False) is not None
    assert len(json.loads((artifact / "vitprune.json").read_text())["weights_sha256"]) == 64


# 5. bad outputs and a full disk


def test_unusable_outputs_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "-o", ".", "--force"),
                           "is the current folder", capsys)
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "-o", "/proc/vitprune-out"),
                           "cannot write /proc/vitprune-out", capsys)
    (tmp_path / "taken").mkdir()
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "-o", "taken"), "pass --force", capsys)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_says_so_and_leaves_nothing(small_disk, capsys):
    out = small_disk / "nested" / "artifact"
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "-o", str(out)), "disk full while writing",
                           capsys, out)
    assert list(small_disk.iterdir()) == []  # neither the temporary folder nor the parents it made


# 6. Ctrl-C and SIGTERM mid-write


def _leftovers(folder: Path) -> list[str]:
    return [path.name for path in folder.iterdir()]


def _signal_while_writing(command: list[str], folder: Path, sig: int) -> tuple[int, str]:
    """Start `command`, wait for its temporary output in `folder`, send `sig`."""
    process = subprocess.Popen([sys.executable, "-m", "vitprune", *command], cwd=REPO, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if any(name.endswith(".tmp") for name in _leftovers(folder)):
            process.send_signal(sig)
            break
        time.sleep(0.005)
    _, err = process.communicate(timeout=300)
    return process.returncode, err.strip()


STOPS = [(signal.SIGTERM, 143, "error: terminated"), (signal.SIGINT, 130, "error: interrupted")]
# ViT-L's 1.2 GB of weights (apply) and ViT-S's ONNX trace (export) take long enough that the signal lands mid-write
WRITERS = {
    "apply": lambda tmp: ["apply", "vit_large_patch16_224", "--no-pretrained", "--method", "tome", "--r", "2",
                          "-o", str(tmp / "out")],
    "export": lambda tmp: ["export", "vit_small_patch16_224", "--no-pretrained", "--method", "tome", "--r", "2",
                           "--onnx", str(tmp / "m.onnx")],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("sig,code,message", STOPS)
def test_killed_mid_write_leaves_nothing(tmp_path, command, sig, code, message):
    returned, err = _signal_while_writing(WRITERS[command](tmp_path), tmp_path, sig)
    assert returned == code and err.splitlines()[-1] == message, err
    assert _leftovers(tmp_path) == []


# 7. permissions


def test_outputs_get_the_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        out = tmp_path / "artifact"
        assert run(apply_args("--method", "tome", "--r", "2", "-o", str(out))) == 0
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {path.stat().st_mode & 0o777 for path in out.iterdir()} == {0o644}


# 8 and 9. early checks and small ones


def test_labels_beyond_the_model_classes_are_refused_when_listed(images, capsys):
    (images / "labels.csv").write_text("file,class_index\n0.png,1\n1.png,5000\n2.png,3\n")
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "--data", str(images)),
                           "is labelled class 5000, but the model has 1000 classes", capsys)


def test_one_input_size_rule(capsys):
    assert_one_line_exit_2(["apply", "vit_tiny", "--no-pretrained", "--img-size", "225", "--method", "tome", "--r", "2"],
                           "--img-size must be a multiple of the patch size 16, got 225", capsys)


def test_json_errors_go_to_stdout_too(capsys):
    assert run(apply_args("--method", "evit", "--keep", "1.5", "--json")) == 2
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"error": "evit --keep must be a number in (0, 1], got 1.5"}


def test_no_arguments_prints_the_help_without_a_bare_error(capsys):
    run([])
    assert "error:" not in capsys.readouterr().err


# 10. out of memory: impossible settings refused up front, an allocator failure during a run is one line


@pytest.mark.parametrize("extra,message", [
    (("--bench", "--bench-batch", "1,10000000"), "--bench-batch 10000000 cannot fit in memory"),
    (("--batch-size", "10000000"), "--batch-size 10000000 cannot fit in memory"),
    (("--img-size", "160000"), "input size 160000 (--img-size) cannot fit in memory"),
])
def test_settings_that_cannot_fit_in_memory_are_refused_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", *extra, "-o", str(out)), message, capsys, out)


def test_a_cascade_stage_too_large_for_memory_is_refused(images, capsys):
    assert_one_line_exit_2(["cascade", "vit_tiny", "--no-pretrained", "--stages", "64,160000", "--data", str(images),
                            "--target-ratio", "0.9"], "input size 160000 (--stages) cannot fit in memory", capsys)


@pytest.mark.parametrize("failure", [
    lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                         "to allocate 400000000000 bytes."),
    MemoryError,
])
def test_out_of_memory_during_a_run_is_one_line_naming_what_to_lower(tmp_path, capsys, monkeypatch, failure):
    import warnings

    from vitprune.commands import apply as apply_command

    def run_out_of_memory(*args, **kwargs):
        warnings.warn("a library warning before the failure", UserWarning, stacklevel=1)
        raise failure()

    monkeypatch.setattr(apply_command, "evaluate", run_out_of_memory)
    out = tmp_path / "out"
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "-o", str(out)),
                           "out of memory during the run; lower --batch-size, --bench-batch or --limit", capsys, out)


# 11. artifacts vouch for themselves


def _drop_hash(artifact: Path) -> None:
    plan_file = artifact / "vitprune.json"
    metadata = json.loads(plan_file.read_text())
    del metadata["weights_sha256"]
    plan_file.write_text(json.dumps(metadata))


def test_an_artifact_without_its_hash_loads_only_unverified(artifact, capsys):
    _drop_hash(artifact)
    with pytest.raises(VitpruneError, match="carries no sha256") as error:
        vitprune.load(artifact)
    assert error.value.param == "verify"
    assert vitprune.load(artifact, verify=False) is not None
    assert_one_line_exit_2(["apply", str(artifact), "--method", "tome", "--r", "2"], "carries no sha256", capsys)


def test_a_newer_format_is_refused_naming_both_versions(artifact):
    plan_file = artifact / "vitprune.json"
    metadata = json.loads(plan_file.read_text())
    metadata.update(format=2, versions={**metadata["versions"], "vitprune": "9.0.0"})
    plan_file.write_text(json.dumps(metadata))
    with pytest.raises(VitpruneError, match=r"artifact format 2 \(written by vitprune 9.0.0\); this vitprune "
                                            rf"{vitprune.__version__} reads format 1 and older"):
        vitprune.load(artifact)


def test_deeply_nested_metadata_is_one_line(artifact, capsys):
    (artifact / "vitprune.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_exit_2(["apply", str(artifact), "--method", "tome", "--r", "2"], "nested too deeply", capsys)
    assert_one_line_exit_2(apply_args("--plan", str(artifact / "vitprune.json")), "cannot read plan", capsys)


def test_the_one_file_form_carries_and_checks_the_hash_of_its_content(artifact, tmp_path):
    import safetensors
    import safetensors.torch

    single = artifact / "model.safetensors"
    assert vitprune.load(single) is not None
    with safetensors.safe_open(str(single), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    assert len(header["weights_sha256"]) == 64
    tensors["head.bias"] = tensors["head.bias"] + 1  # finite, plausible: only the hash tells
    edited = tmp_path / "edited.safetensors"
    safetensors.torch.save_file(tensors, str(edited), metadata=header)
    with pytest.raises(VitpruneError, match="sha256 mismatch"):
        vitprune.load(edited)
    assert vitprune.load(edited, verify=False) is not None
    unhashed = tmp_path / "unhashed.safetensors"
    safetensors.torch.save_file(tensors, str(unhashed), metadata={"vitprune": header["vitprune"]})
    with pytest.raises(VitpruneError, match="carries no sha256"):
        vitprune.load(unhashed)


def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    model, info = vitprune.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with torch.no_grad():
        model.head.weight[0, 0] = float("inf")
    with pytest.raises(VitpruneError, match=r"non-finite weights \(NaN or infinity in head.weight\)"):
        vitprune.save(tmp_path / "out", model, info)
    assert list(tmp_path.iterdir()) == []


# 12. one line on stderr: libraries' own lines stay off it


def test_library_log_lines_and_warnings_stay_off_stderr(capsys, monkeypatch):
    import logging
    import warnings

    from vitprune.commands import apply as apply_command

    evaluate = apply_command.evaluate

    def chatty_evaluate(*args, **kwargs):
        logging.getLogger("timm.data.readers.reader_wds").warning("Dataset info file not found at ['x']")
        warnings.warn("a torch warning", UserWarning, stacklevel=1)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(apply_command, "evaluate", chatty_evaluate)
    assert run(apply_args("--method", "tome", "--r", "2", "--json")) == 0
    assert capsys.readouterr().err == ""
    assert_one_line_exit_2(apply_args("--method", "tome", "--r", "2", "--layers", "99"), "out of range", capsys)


def test_a_webdataset_folder_with_split_prints_no_timm_line(tmp_path, capsys):
    import io
    import tarfile

    folder = tmp_path / "wds"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with tarfile.open(folder / "train-000000.tar", "w") as tar:
        for i in range(2):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(png, format="PNG")
            for name, data in ((f"{i:04d}.png", png.getvalue()), (f"{i:04d}.cls", b"3")):
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    code = run(apply_args("--method", "tome", "--r", "2", "--data", f"wds/{folder}", "--split", "train-000000.tar",
                    "--json"))
    err = capsys.readouterr().err
    assert code == 0 and "Dataset info" not in err and err == "", err


# 13. recovery after a hard kill


def _sigkill_when(command: list[str], cwd: Path, ready) -> None:
    process = subprocess.Popen([sys.executable, "-m", "vitprune", *command], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not ready():
        time.sleep(0.005)
    process.kill()
    process.wait()


@pytest.mark.slow
def test_a_rerun_removes_what_a_killed_export_left_and_only_that(tmp_path):
    command = ["export", "vit_tiny", "--no-pretrained", "--img-size", "96", "--method", "tome", "--r", "2",
               "--onnx", "m.onnx"]
    _sigkill_when(command, tmp_path, lambda: any(name.endswith(".tmp") for name in _leftovers(tmp_path)))
    left = [name for name in _leftovers(tmp_path) if name.endswith(".tmp")]
    assert left, "the export finished before the kill"
    other = tmp_path / f".m.onnx.other-host.{os.getpid()}.0123456789ab.tmp"  # another machine's: kept
    other.write_text("")
    assert run(command[:-1] + [str(tmp_path / "m.onnx")]) == 0
    assert sorted(_leftovers(tmp_path)) == sorted(["m.onnx", "report.json", "report.md", other.name])


@pytest.mark.slow
def test_a_killed_finetune_gets_one_consistent_piece_of_advice(tmp_path, images, capsys):
    from vitprune.finetune import work_dir_for

    out = tmp_path / "out"
    work = work_dir_for(out)
    command = ["finetune", "vit_tiny", "--no-pretrained", "--img-size", "32", "--data", str(images), "--epochs", "1",
               "--batch-size", "2", "--workers", "0", "--method", "evit", "--keep", "0.5", "-o", str(out)]
    _sigkill_when(command, tmp_path, lambda: (work / "owner").is_file())
    assert work.is_dir() and not (work / "checkpoint.pt").exists()
    assert_one_line_exit_2([*command, "--resume"], "nothing to resume", capsys)
    assert not work.exists()  # nothing to resume: the dead run's folder is gone, and a plain rerun works
    work.mkdir()
    (work / "owner").write_text(f"{__import__('vitprune.io').io.run_host()} {os.getpid()}\n")  # alive: this test
    assert_one_line_exit_2(command, f"another run (pid {os.getpid()}", capsys)


# 14. the Python API raises VitpruneError naming the parameter


def _meta_model():
    with torch.device("meta"):
        return timm.create_model("vit_tiny_patch16_224", img_size=32)


@pytest.mark.parametrize("call,param", [
    (lambda m: vitprune.apply(m, method="evit", keep=0.7, layers="3,6"), "layers"),
    (lambda m: vitprune.apply(m, method="evit", keep=0.7, layers=[3.5]), "layers"),
    (lambda m: vitprune.make_plan("tome", 12, layers=[1, 2.5], r=2), "layers"),
    (lambda m: vitprune.apply(_meta_model(), method="tome", r=2), "model"),
    (lambda m: vitprune.count_macs(torch.nn.Linear(3, 3)), "model"),
    (lambda m: vitprune.count_macs(m, torch.empty(0, 3, 32, 32)), "images"),
    (lambda m: vitprune.save("unused", m, None), "info"),
    (lambda m: vitprune.load(5), "path"),
    (lambda m: vitprune.load("unused", verify="no"), "verify"),
    (lambda m: vitprune.create_model(5), "name"),
    (lambda m: vitprune.remove("model"), "model"),
])
def test_api_misuse_is_a_vitprune_error_naming_the_parameter(call, param, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VitpruneError) as error:
        call(timm.create_model("vit_tiny_patch16_224", img_size=32))
    assert error.value.param == param and param in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_reduced_model_passes_an_empty_batch_through():
    for method, settings in (("ats", {"keep": 0.5}), ("evit", {"keep": 0.5}), ("tome", {"r": 2})):
        model = vitprune.apply(timm.create_model("vit_tiny_patch16_224", img_size=32), method=method, **settings)
        assert model(torch.empty(0, 3, 32, 32)).shape == (0, 1000)
