"""The report of a reduced model: report.json's layout (`make_report`), the figures table and
report.md, formatted from what vitprune.evaluation measured; and the exact GMACs count it uses.
Every command that produces a model reports through here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from vitprune.flops import count_macs
from vitprune.patch import plan_of
from vitprune.plan import Plan
from vitprune.tables import ReportTable


def macs_images(model: nn.Module, images: Tensor | None) -> Tensor | None:
    """Images to count on: all of them when the count depends on the image (ATS), else one."""
    plan = plan_of(model)
    if images is None:
        return None
    if plan is not None and plan.varies_per_image:
        return images
    return images[:1]


def count_gmacs(model: nn.Module, images: Tensor | None, batch_size: int = 64) -> float:
    """Mean GMACs per image over `images` (see `macs_images`), counted in batches."""
    images = macs_images(model, images)
    if images is None:
        return count_macs(model).gmacs
    totals = [count_macs(model, images[i:i + batch_size]).gmacs_per_image for i in range(0, len(images), batch_size)]
    return float(torch.cat(totals).mean())


def make_report(identity: dict, plan: Plan, measured: dict, versions: dict) -> dict:
    """report.json: the model, the plan, and every figure measured."""
    return {
        "model": identity["name"],
        "tag": identity.get("tag"),
        "checkpoint": identity.get("checkpoint"),
        "img_size": identity.get("img_size"),
        "method": plan.method,
        "plan": plan.describe(),
        "params": plan.params(),
        **measured,
        "versions": versions,
    }


def figures_table(report: dict) -> ReportTable:
    """The figures of a report, base against reduced: report.md and the terminal render this one
    table. A drop or an agreement carries its 95% interval (vitprune.evaluation)."""
    table = ReportTable(["", "base", "reduced"])
    table.add("GMACs / image", f"{report['gmacs_base']:.3f}", f"{report['gmacs']:.3f} ({report['gmacs_reduction']:.1%} fewer)")
    if "data" in report:
        table.add("images", str(report["data"]["n_images"]), str(report["data"]["n_images"]))
    for k in (1, 5):
        if f"top{k}" in report:
            change = report[f"top{k}"] - report[f"top{k}_base"]
            table.add(f"top-{k} %", f"{report[f'top{k}_base']:.2f}",
                      f"{report[f'top{k}']:.2f} ({change:+.2f}{_drop_interval(report, f'top{k}_drop')})")
    if "agreement" in report:
        table.add("top-1 agreement with base %", "100", f"{report['agreement']:.2f}{_interval(report, 'agreement', '.2f')}")
        table.add("mean KL(base ‖ reduced)", "0", f"{report['kl']:.4f}{_interval(report, 'kl', '.4f')}")
    if "cosine_mean" in report:
        table.add("cosine with base: mean / 5th pct", "1 / 1", f"{report['cosine_mean']:.4f} / {report['cosine_p5']:.4f}"
                  f"{_interval(report, 'cosine_mean', '.4f')}")
    if "retrieval_agreement" in report:
        table.add("retrieval agreement (recall@1) %", "100",
                  f"{report['retrieval_agreement']:.2f}{_interval(report, 'retrieval_agreement', '.2f')}")
        table.add("recall@5 of base neighbours %", "100", f"{report['recall_at_5']:.2f}")
    for batch, timing in report.get("latency_ms", {}).items():
        table.add(f"ms / image, batch {batch}", f"{timing['base']:.2f}", f"{timing['reduced']:.2f} ({timing['speedup']:.2f}x)")
    return table


def _interval(report: dict, key: str, spec: str) -> str:
    """', 95% CI lo..hi' of a figure, nothing when the report has none (older reports, one image)."""
    bounds = report.get(f"{key}_ci95")
    return "" if not bounds else f" [95% CI {bounds[0]:{spec}}..{bounds[1]:{spec}}]"


def _drop_interval(report: dict, key: str) -> str:
    """The interval of a change in top-k (sign as printed: reduced minus base), and whether the
    images can tell it from no change."""
    bounds = report.get(f"{key}_ci95")
    if not bounds:
        return ""
    if bounds[0] == bounds[1] == 0:
        return ", the same on every image"
    verdict = "; the images cannot tell" if bounds[0] <= 0 <= bounds[1] else ""
    return f", 95% CI {0.0 - bounds[1]:+.2f}..{0.0 - bounds[0]:+.2f}{verdict}"


def _token_score_lines(scores: list[dict]) -> list[str]:
    """One line per token score in use, with the blocks that use it."""
    by_score: dict[str, list[str]] = {}
    for entry in scores:
        by_score.setdefault(entry["score"], []).append(f"{entry['method']}@{entry['layer']}")
    return [f"- token score: {score} ({', '.join(where)})" for score, where in by_score.items()]


_INTERVALS = (" Intervals are two-sided 95%: a drop's over the per-image differences of the two models on the "
              "same images (normal approximation), an agreement's by Wilson's score; where a drop's interval "
              "holds 0 the images cannot tell the two models apart.")


def _throughput(data: dict) -> str:
    if "images_per_s" not in data:
        return ""
    processes = data.get("processes", 1)
    return (f" Both models evaluated at {data['images_per_s']:.1f} images/s (decoding included"
            + (f", {processes} processes" if processes > 1 else "") + ").")


def render_markdown(report: dict, title: str = "vitprune report") -> str:
    """report.md: the figures as a person reads them."""
    lines = [f"# {title}", "",
             f"- model: `{report['model']}`" + (f" (`{report['tag']}`)" if report.get("tag") else ""),
             f"- plan: {report['plan']} (method `{report['method']}`)"]
    if report.get("checkpoint"):
        lines.append(f"- checkpoint: `{report['checkpoint']}`")
    if report.get("runtime"):
        run = report["runtime"]
        lines.append(f"- evaluated on {run['device']} in {run['dtype']}"
                     + (f", torch.compile ({run['compile_mode']})" if run["compile"] else ", eager"))
    if report.get("output", "logits") != "logits":
        lines.append(f"- output: {report['output']}, compared with the base's by cosine and nearest neighbours")
    lines += _token_score_lines(report.get("token_scores", []))
    lines += ["", figures_table(report).markdown()]
    if "data" in report:
        data = report["data"]
        unlabelled = " (unlabelled: agreement and KL only)" if "agreement" in report else ""
        lines += ["", f"Fidelity on {data['n_images']} images from `{data['path']}`"
                  + ("" if data["labelled"] else unlabelled) + "." + _throughput(data) + _INTERVALS]
    if "latency_setup" in report:
        setup = report["latency_setup"]
        lines += ["", f"Latency: {setup['runtime']}, {setup['device']}, median of {setup['repeats']} runs after "
                  f"{setup['warmup']} warm-up runs, base and reduced interleaved, on {setup['inputs']}."
                  + (f" Compilation (first calls, not in the timings): base {setup['compile_s']['base']:.1f} s, "
                     f"reduced {setup['compile_s']['reduced']:.1f} s." if "compile_s" in setup else "")]
    versions = report.get("versions", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)
