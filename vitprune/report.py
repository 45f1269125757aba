"""Evidence for a reduced model: exact GMACs, accuracy against the unreduced model, latency.

`compare` measures a reduced model side by side with its base; `render_markdown` writes the
report a person reads. Every command that produces a model reports through here.
"""
from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from vitprune.bench import measure_latency
from vitprune.data import predict
from vitprune.flops import count_macs
from vitprune.metrics import classification_metrics, embedding_metrics
from vitprune.models import has_class_token, outputs_embeddings
from vitprune.patch import model_img_size, plan_of
from vitprune.plan import Plan
from vitprune.progress import progress_bar
from vitprune.runtime import Runtime
from vitprune.tables import ReportTable

EMBEDDING_KEYS = ("cosine_mean", "cosine_p5", "retrieval_agreement", "recall_at_1", "recall_at_5")


@dataclass
class Evidence:
    """What `compare` measures with; images are preprocessed for the model's input size."""

    images: Tensor | None = None
    labels: Tensor | None = None
    base_images: Tensor | None = None  # when the plan changes the input size; else `images`
    # instead of images: batches (images, base images or None, labels or None) read as they are evaluated
    batches: Iterable[tuple[Tensor, Tensor | None, Tensor | None]] | None = None
    data_path: str | None = None
    bench_batches: tuple[int, ...] = ()
    bench_repeats: int = 10
    bench_warmup: int = 3
    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"  # autocast precision of the accuracy and latency runs (vitprune.runtime)
    compile: bool = False  # torch.compile the models for them
    compile_mode: str = "default"
    progress: bool = True

    @property
    def runtime(self) -> Runtime:
        return Runtime(device=self.device, dtype=self.dtype, compile=self.compile, compile_mode=self.compile_mode)


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


def compare(base: nn.Module, reduced: nn.Module, evidence: Evidence) -> dict:
    """GMACs of both (counted in float32, eager), accuracy/agreement on the images and latency
    side by side, both run as `evidence.runtime` says (precision, compilation)."""
    runtime = evidence.runtime
    out: dict = {"runtime": runtime.to_dict()}
    runs = (runtime.prepare(base), runtime.prepare(reduced))
    seen = (_streamed(base, reduced, runs, evidence) if evidence.batches is not None
            else _evaluated(base, reduced, runs, evidence))
    evidence, base_images = seen.evidence, seen.evidence.base_images
    out["gmacs_base"], out["gmacs"] = round(seen.gmacs_base, 4), round(seen.gmacs, 4)
    out["gmacs_reduction"] = round(1 - out["gmacs"] / out["gmacs_base"], 4)
    if seen.logits is not None:
        base_out, reduced_out = seen.base_logits, seen.logits
        embedding = outputs_embeddings(base)
        out["data"] = {"path": evidence.data_path, "n_images": len(reduced_out),
                       "labelled": evidence.labels is not None and not embedding}
        out.update(embedding_figures(reduced_out, base_out) if embedding else
                   classification_figures(reduced_out, base_out, evidence.labels))
    out["token_scores"] = token_scores(reduced)
    if evidence.bench_batches:
        most = max(evidence.bench_batches)
        inputs = {"base": base_images[:most] if base_images is not None else _random_images(base),
                  "reduced": evidence.images[:most] if evidence.images is not None else _random_images(reduced)}
        timing = measure_latency({"base": runs[0], "reduced": runs[1]}, inputs, evidence.bench_batches,
                                 warmup=evidence.bench_warmup, repeats=evidence.bench_repeats, device=evidence.device)
        out["latency_ms"] = {
            str(batch): {
                "base": round(timing["ms_per_image"]["base"][batch], 3),
                "reduced": round(timing["ms_per_image"]["reduced"][batch], 3),
                "speedup": round(timing["ms_per_image"]["base"][batch] / timing["ms_per_image"]["reduced"][batch], 3),
            }
            for batch in evidence.bench_batches
        }
        out["latency_setup"] = {
            "device": timing["device"], "threads": timing["threads"], "warmup": timing["warmup"],
            "repeats": timing["repeats"], "inputs": "real images" if evidence.images is not None else "random images",
            "runtime": runtime.describe(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        if timing["compile_s"]:
            out["latency_setup"]["compile_s"] = timing["compile_s"]
    return out


@dataclass
class Seen:
    """What `compare` saw: GMACs, both models' logits (None without images), and the evidence whose
    images (all of them, or the first batch of a stream) the latency is measured on."""

    evidence: Evidence
    gmacs_base: float
    gmacs: float
    base_logits: Tensor | None = None
    logits: Tensor | None = None


def _evaluated(base: nn.Module, reduced: nn.Module, runs: tuple[nn.Module, nn.Module], evidence: Evidence) -> Seen:
    """Images held as tensors: counted (`base`, `reduced`) and predicted (`runs`) whole."""
    if evidence.base_images is None:
        evidence = replace(evidence, base_images=evidence.images)
    seen = Seen(evidence, count_gmacs(base, evidence.base_images, evidence.batch_size),
                count_gmacs(reduced, evidence.images, evidence.batch_size))
    if evidence.images is not None:
        seen.base_logits = _predict(runs[0], evidence.base_images, evidence, "Base model")
        seen.logits = _predict(runs[1], evidence.images, evidence, "Reduced model")
    return seen


def _streamed(base: nn.Module, reduced: nn.Module, runs: tuple[nn.Module, nn.Module], evidence: Evidence) -> Seen:
    """Batches read once: both models' logits and per-image GMACs gathered batch by batch; the first
    batch stays for the latency and for GMACs that do not depend on the image."""
    outputs: dict[str, list[Tensor]] = {"base": [], "reduced": [], "labels": [], "macs_base": [], "macs": []}
    first: tuple[Tensor, Tensor] | None = None
    with progress_bar(evidence.progress) as bar:
        task = bar.add_task("Base and reduced model", total=None)
        for images, base_images, labels in evidence.batches:
            base_images = images if base_images is None else base_images
            first = first or (images, base_images)
            for key, model, run, inputs in (("base", base, runs[0], base_images), ("reduced", reduced, runs[1], images)):
                outputs[key].append(_predict(run, inputs, replace(evidence, progress=False), ""))
                if _varies(model):
                    outputs["macs" if model is reduced else "macs_base"].append(count_macs(model, inputs).gmacs_per_image)
            if labels is not None:
                outputs["labels"].append(labels)
            bar.advance(task, len(images))
    labels = torch.cat(outputs["labels"]) if outputs["labels"] else None
    sample = replace(evidence, images=first[0], base_images=first[1], labels=labels, batches=None)
    return Seen(sample, _mean_gmacs(base, outputs["macs_base"], first[1]), _mean_gmacs(reduced, outputs["macs"], first[0]),
                torch.cat(outputs["base"]), torch.cat(outputs["reduced"]))


def _varies(model: nn.Module) -> bool:
    plan = plan_of(model)
    return plan is not None and plan.varies_per_image


def _mean_gmacs(model: nn.Module, per_image: list[Tensor], first: Tensor) -> float:
    return float(torch.cat(per_image).mean()) if per_image else count_gmacs(model, first)


def classification_figures(logits: Tensor, base_logits: Tensor, labels: Tensor | None) -> dict:
    """top-1/top-5 of both (with labels), agreement and KL of the reduced model against the base."""
    out: dict = {"output": "logits"}
    base_metrics = classification_metrics(base_logits, labels, None)
    metrics = classification_metrics(logits, labels, base_logits)
    if labels is not None:
        out["top1_base"], out["top5_base"] = round(base_metrics["top1"], 2), round(base_metrics["top5"], 2)
        out["top1"], out["top5"] = round(metrics["top1"], 2), round(metrics["top5"], 2)
        out["top1_drop"] = round(out["top1_base"] - out["top1"], 2)
    out["agreement"] = round(metrics["agreement"], 2)
    out["kl"] = round(metrics["kl"], 5)
    return out


def embedding_figures(embeddings: Tensor, base_embeddings: Tensor) -> dict:
    """Cosine with the base's embeddings (mean, 5th percentile), retrieval agreement and recall@1/5
    against the base's nearest neighbours (vitprune.metrics.embedding_metrics); labels are not used."""
    metrics = embedding_metrics(embeddings, base_embeddings)
    out: dict = {"output": f"embedding (dim {embeddings.shape[1]})"}
    for key in EMBEDDING_KEYS:
        if key in metrics:
            out[key] = round(metrics[key], 5 if key.startswith("cosine") else 2)
    return out


def token_scores(model: nn.Module) -> list[dict]:
    """Per reduction that scores tokens by attention, the score it uses on this model (which depends
    on whether the model has a class token: `Method.token_score`)."""
    plan = plan_of(model)
    if plan is None:
        return []
    class_token = has_class_token(model)
    scored = [(red, red.spec.token_score(red.settings, class_token)) for red in plan.reductions]
    return [{"layer": red.layer, "method": red.method, "score": score} for red, score in scored if score is not None]


def _predict(model: nn.Module, images: Tensor, evidence: Evidence, description: str) -> Tensor:
    param = next(model.parameters())
    with torch.inference_mode():
        logits = predict(model.eval(), images.to(param.device), batch_size=evidence.batch_size,
                         progress=evidence.progress, description=description)
    return logits.float().cpu()


def _random_images(model: nn.Module) -> Tensor:
    size = model_img_size(model)
    return torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))


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
    """The figures of a report, base against reduced: report.md and the terminal render this one table."""
    table = ReportTable(["", "base", "reduced"])
    table.add("GMACs / image", f"{report['gmacs_base']:.3f}", f"{report['gmacs']:.3f} ({report['gmacs_reduction']:.1%} fewer)")
    if "top1" in report:
        table.add("top-1 %", f"{report['top1_base']:.2f}", f"{report['top1']:.2f} ({-report['top1_drop']:+.2f})")
        table.add("top-5 %", f"{report['top5_base']:.2f}", f"{report['top5']:.2f}")
    if "agreement" in report:
        table.add("top-1 agreement with base %", "100", f"{report['agreement']:.2f}")
        table.add("mean KL(base ‖ reduced)", "0", f"{report['kl']:.4f}")
    if "cosine_mean" in report:
        table.add("cosine with base: mean / 5th pct", "1 / 1", f"{report['cosine_mean']:.4f} / {report['cosine_p5']:.4f}")
    if "retrieval_agreement" in report:
        table.add("retrieval agreement (recall@1) %", "100", f"{report['retrieval_agreement']:.2f}")
        table.add("recall@5 of base neighbours %", "100", f"{report['recall_at_5']:.2f}")
    for batch, timing in report.get("latency_ms", {}).items():
        table.add(f"ms / image, batch {batch}", f"{timing['base']:.2f}", f"{timing['reduced']:.2f} ({timing['speedup']:.2f}x)")
    return table


def _token_score_lines(scores: list[dict]) -> list[str]:
    """One line per token score in use, with the blocks that use it."""
    by_score: dict[str, list[str]] = {}
    for entry in scores:
        by_score.setdefault(entry["score"], []).append(f"{entry['method']}@{entry['layer']}")
    return [f"- token score: {score} ({', '.join(where)})" for score, where in by_score.items()]


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
                  + ("" if data["labelled"] else unlabelled) + "."]
    if "latency_setup" in report:
        setup = report["latency_setup"]
        lines += ["", f"Latency: {setup['runtime']}, {setup['device']}, median of {setup['repeats']} runs after "
                  f"{setup['warmup']} warm-up runs, base and reduced interleaved, on {setup['inputs']}."
                  + (f" Compilation (first calls, not in the timings): base {setup['compile_s']['base']:.1f} s, "
                     f"reduced {setup['compile_s']['reduced']:.1f} s." if "compile_s" in setup else "")]
    versions = report.get("versions", {})
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)
