"""Precision (autocast), torch.compile, ONNX Runtime provider choice, and benchmarks/gpu.py --quick."""
import copy
import json
import runpy
import sys
from pathlib import Path

import pytest
import timm
import torch

import vitprune
from vitprune.bench import measure_latency
from vitprune.cli import run
from vitprune.commands.apply import ApplyRequest, run_apply
from vitprune.errors import VitpruneError
from vitprune.onnx_runtime import PROVIDERS, choose_provider, provider_chain
from vitprune.plan import Plan, Reduction
from vitprune.reducers import bipartite_matching, cls_attention, merge_tokens
from vitprune.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
ALL = list(PROVIDERS.values())


def tiny(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, depth=depth,
                             num_classes=10).eval()


def images(count: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_every_method_runs_under_autocast_on_cpu(dtype):
    x = images()
    for method, settings in [("evit", {"keep": 0.5}), ("tome", {"r": 8, "protect": 0.2}), ("ats", {"keep": 0.5})]:
        model = vitprune.apply(tiny(), method=method, layers=[0, 1], **settings)
        with torch.inference_mode():
            full, half = model(x), Runtime(dtype=dtype).prepare(model)(x)
        assert half.dtype == torch.float32 and torch.isfinite(half).all(), method
        assert (half - full).abs().max() < 0.25 * full.abs().max(), method  # rounding (and flipped choices)


def test_scores_and_sizes_stay_float32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 1, 16, generator=gen), torch.randn(2, 3, 65, 16, generator=gen)
    metric = torch.randn(2, 64, 16, generator=gen)
    x = torch.randn(2, 64, 8, generator=gen)
    size = torch.randint(1, 400, (2, 64, 1), generator=gen).float()  # > 256: bfloat16 cannot count them
    attn, matching = cls_attention(q, k, 0.25), bipartite_matching(metric, 20)
    merged = merge_tokens(x, size, matching)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn_half, matching_half = cls_attention(q, k, 0.25), bipartite_matching(metric, 20)
        merged_half = merge_tokens(x, size, matching_half)
    assert attn_half.dtype == torch.float32 and torch.allclose(attn_half, attn)
    assert all(torch.equal(a, b) for a, b in zip(matching_half, matching))  # the same choices
    assert merged_half[1].dtype == torch.float32 and torch.equal(merged_half[1], merged[1])  # exact sizes


@pytest.mark.slow
def test_no_graph_breaks_in_the_evit_and_tome_forward_and_compiled_equals_eager():
    plan = Plan(reductions=[Reduction(0, "tome", r=8), Reduction(1, "evit", keep=0.5)])
    model = vitprune.apply(tiny(), plan)
    x = images()
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = Runtime(compile=True).prepare(copy.deepcopy(model))
        assert torch.allclose(compiled(x), model(x), atol=1e-4)
    timing = measure_latency({"compiled": compiled, "eager": model}, x, (len(x),), warmup=0, repeats=1)
    assert list(timing["compile_s"]) == ["compiled"]  # the first call of a compiled model, timed apart


def test_choose_provider_with_a_fake_list_of_available_providers():
    cpu_only = ["CPUExecutionProvider"]
    assert choose_provider("auto", available=ALL, gpu=True) == "CUDAExecutionProvider"
    assert choose_provider("auto", available=ALL, gpu=False) == "CPUExecutionProvider"
    assert choose_provider("auto", available=cpu_only, gpu=True) == "CPUExecutionProvider"
    assert choose_provider("tensorrt", available=ALL, gpu=True) == "TensorrtExecutionProvider"
    assert provider_chain("TensorrtExecutionProvider") == ALL[::-1]
    assert provider_chain("CPUExecutionProvider") == ["CPUExecutionProvider"]
    for provider, extra in [("tensorrt", "vitprune[tensorrt]"), ("cuda", "vitprune[gpu]")]:
        with pytest.raises(VitpruneError, match=extra.replace("[", r"\[")):
            choose_provider(provider, available=cpu_only, gpu=True)
    with pytest.raises(VitpruneError, match="provider"):
        choose_provider("rocm", available=ALL)


def test_apply_reports_its_dtype(tmp_path):
    request = ApplyRequest(model="vit_tiny_patch16_224", no_pretrained=True, img_size=32, method="tome", r=2,
                           dtype="bfloat16", bench_batch=(2,), bench_repeats=1, progress=False,
                           output=tmp_path / "out")
    report = run_apply(request).report
    assert report["runtime"] == {"device": "cpu", "dtype": "bfloat16", "compile": False, "compile_mode": None}
    assert report["latency_setup"]["runtime"] == "eager PyTorch, bfloat16 autocast"
    assert "compile_s" not in report["latency_setup"]
    assert "in bfloat16, eager" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runtime"]["dtype"] == "bfloat16"


@pytest.mark.parametrize("args, message", [
    (["apply", "vit_tiny_patch16_224", "--no-pretrained", "-m", "evit", "-k", "0.7", "--dtype", "half"], "--dtype"),
    (["apply", "vit_tiny_patch16_224", "--no-pretrained", "-m", "evit", "-k", "0.7", "--compile-mode", "max"],
     "--compile-mode"),
    (["export", "vit_tiny_patch16_224", "--no-pretrained", "-m", "evit", "-k", "0.7", "--onnx", "x.onnx",
      "--dtype", "bfloat16"], "bfloat16"),
])
def test_bad_precision_settings_are_one_line_errors(tmp_path, capsys, args, message):
    assert run([str(tmp_path / arg) if arg == "x.onnx" else arg for arg in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.slow
def test_gpu_benchmark_quick_mode_runs_on_the_cpu(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--device", "cpu", "--quick"])
    runpy.run_path(str(ROOT / "benchmarks" / "gpu.py"), run_name="__main__")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| vit_tiny 64 |")]
    assert len(rows) == 4 * 2 + 4  # eager at batch 1 and 4, ONNX Runtime at batch 4
    assert any("ONNX Runtime CPU" in row for row in rows)
