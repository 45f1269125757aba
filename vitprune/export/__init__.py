"""ONNX export of reduced (and plain) ViTs, verified and timed on ONNX Runtime.

The graph writer and the session runner are core (`vitprune.onnx_runtime`, re-exported here);
this feature adds the steps of `vitprune export`: `graph` (outputs, export + verification,
weights, the report section), `verify` (parity with PyTorch), `bench` (ONNX Runtime latency) and
`report` (the ONNX part of report.md).
"""
from __future__ import annotations

from vitprune.export.bench import bench_against_base, bench_onnx, latency_section
from vitprune.export.graph import (
    RANDOM_VERIFY_IMAGES,
    check_outputs,
    existing_report,
    export_verified,
    onnx_file_summary,
    onnx_section,
    random_images,
    save_checked_weights,
)
from vitprune.export.report import render_onnx_markdown
from vitprune.export.verify import MIN_AGREEMENT, TOLERANCE_FP16, TOLERANCE_FP32, verify_onnx
from vitprune.onnx_runtime import (
    ATS_PADDING,
    EXPORTER,
    MAX_OPSET,
    MIN_OPSET,
    check_opset,
    choose_provider,
    export_onnx,
    onnx_predict,
    onnx_session,
    static_width,
)

__all__ = [
    "ATS_PADDING", "EXPORTER", "MAX_OPSET", "MIN_AGREEMENT", "MIN_OPSET", "RANDOM_VERIFY_IMAGES", "TOLERANCE_FP16",
    "TOLERANCE_FP32", "bench_against_base", "bench_onnx", "check_opset", "check_outputs", "choose_provider",
    "existing_report", "export_onnx", "export_verified", "latency_section", "onnx_file_summary", "onnx_predict",
    "onnx_section", "onnx_session", "random_images", "render_onnx_markdown", "save_checked_weights",
    "static_width", "verify_onnx",
]
