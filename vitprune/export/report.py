"""The ONNX part of report.md."""
from __future__ import annotations

from vitprune.tables import ReportTable


def render_onnx_markdown(section: dict) -> str:
    """The "## ONNX" part of report.md: the file, its parity with PyTorch, its timings."""
    parity = section["parity"]
    padding = f"; ATS padded to the {section['ats_padding']}" if section.get("ats_padding") else ""
    lines = ["", "## ONNX", "",
             f"- file: `{section['file']}` (opset {section['opset']}, batch {section['batch']}, "
             f"{'fp16' if section['fp16'] else 'fp32'} weights, {section['bytes'] / 1e6:.1f} MB), "
             f"{section['exporter']}",
             f"- reduction in the graph: {', '.join(section['reduction_ops']) or 'none'}{padding}",
             f"- parity with PyTorch on {parity['n_images']} {parity['images']} images ({parity['provider']}): "
             f"top-1 agreement {parity['agreement']:.2f}%, max |logit diff| {parity['max_abs_diff']:.3g} "
             f"(median {parity['median_abs_diff']:.3g}; {parity['within_tolerance']:.2f}% of images within "
             f"{parity['tolerance']:g})"]
    if section.get("sha256"):
        lines.append(f"- sha256: `{section['sha256']}`")
    if section.get("safetensors"):
        lines.append(f"- single-file artifact: `{section['safetensors']}` (vitprune.load rebuilds identical logits)")
    if "latency_ms" in section:
        lines += ["", latency_table(section).markdown(), "", _latency_note(section)]
    return "\n".join(lines) + "\n"


def latency_table(section: dict) -> ReportTable:
    """ONNX Runtime ms / image of base and reduced at each batch size."""
    table = ReportTable(["ONNX Runtime ms / image", "base", "reduced", "speed-up"])
    for batch, timing in section["latency_ms"].items():
        table.add(f"batch {batch}", f"{timing['base']:.2f}", f"{timing['reduced']:.2f}", f"{timing['speedup']:.2f}x")
    return table


def _latency_note(section: dict) -> str:
    setup = section["latency_setup"]
    return (f"GMACs ratio base/reduced: {section['gmacs_speedup']:.2f}x. {setup['runtime']} "
            f"{setup['provider']}, threads: {setup['threads']}, median of {setup['repeats']} runs after "
            f"{setup['warmup']} warm-up runs, base and reduced interleaved, on {setup['inputs']}.")
