"""Evaluation of a reduced model against its base: exact GMACs, per-image terms gathered batch by
batch from a stream of images, the figures with their 95% intervals, and latency.

Only per-image results are kept (top-1 classes, top-1/top-5 hits, KL; embeddings for retrieval),
so memory does not grow with the images beyond a few numbers each. Under torchrun every process
evaluates its own part of the images and the parts are gathered in rank order (`Evidence.gather`),
so the figures are those of one process. vitprune.report renders what this measures.
"""
from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitprune.bench import measure_latency
from vitprune.data import predict
from vitprune.flops import count_macs
from vitprune.metrics import (
    cosine_per_image,
    embedding_metrics,
    mean_interval,
    nearest_neighbours,
    prediction_terms,
    proportion_interval,
)
from vitprune.models import has_class_token, outputs_embeddings
from vitprune.patch import model_img_size, plan_of
from vitprune.progress import progress_bar
from vitprune.report import count_gmacs
from vitprune.runtime import Runtime

EMBEDDING_KEYS = ("cosine_mean", "cosine_p5", "retrieval_agreement", "recall_at_1", "recall_at_5")
Batch = tuple[Tensor, Tensor | None, Tensor | None]  # images, images at the base model's size or None, labels or None
Terms = dict[str, Tensor]  # per-image results, one row per image


@dataclass
class Evidence:
    """What `evaluate` measures with: a stream of batches (`batches`, read once), or images held as
    tensors (preprocessed for the reduced model's input size; `base_images` when the base's differs)."""

    images: Tensor | None = None
    labels: Tensor | None = None
    base_images: Tensor | None = None
    batches: Iterable[Batch] | None = None  # an ImageStream's `count` sizes the progress bar
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
    # torchrun: this process's per-image terms -> every process's, in rank order (None: one process)
    gather: Callable[[Terms], list[Terms]] | None = None

    @property
    def runtime(self) -> Runtime:
        return Runtime(device=self.device, dtype=self.dtype, compile=self.compile, compile_mode=self.compile_mode)

    def count(self) -> int | None:
        """The images to evaluate, when known before reading them (not for a wds/ stream)."""
        if self.batches is not None:
            return getattr(self.batches, "count", None)
        return None if self.images is None else len(self.images)

    def stream(self) -> Iterable[Batch]:
        """The batches: the stream given, or the held images cut into batches."""
        if self.batches is not None:
            return self.batches
        return _held_batches(self) if self.images is not None else ()


@dataclass
class Evaluation:
    """The figures (report.json's measured part) and the first batch of images, at the reduced and
    the base model's input size (the latency and the token maps are measured on them)."""

    figures: dict
    sample: Tensor | None = None
    base_sample: Tensor | None = None


def compare(base: nn.Module, reduced: nn.Module, evidence: Evidence) -> dict:
    """The figures of `evaluate`."""
    return evaluate(base, reduced, evidence).figures


def evaluate(base: nn.Module, reduced: nn.Module, evidence: Evidence) -> Evaluation:
    """GMACs of both (counted in float32, eager); on the images, the per-image terms of both models
    and the figures with their 95% intervals; latency side by side; both run as `evidence.runtime`
    says (precision, compilation)."""
    runtime = evidence.runtime
    runs = (runtime.prepare(base), runtime.prepare(reduced))
    embedding = outputs_embeddings(base)
    start = time.perf_counter()
    terms, sample = _per_image_terms(base, reduced, runs, evidence, embedding)
    seconds = time.perf_counter() - start
    parts = evidence.gather(terms) if evidence.gather is not None else [terms]
    terms = _joined(parts)
    sample_images, base_sample = sample if sample is not None else (None, None)
    out: dict = {"runtime": runtime.to_dict()}
    out["gmacs_base"] = round(_mean_gmacs(base, terms.get("macs_base"), base_sample), 4)
    out["gmacs"] = round(_mean_gmacs(reduced, terms.get("macs"), sample_images), 4)
    out["gmacs_reduction"] = round(1 - out["gmacs"] / out["gmacs_base"], 4)
    n_images = len(next(iter(terms.values()))) if terms else 0
    if n_images:
        out["data"] = {"path": evidence.data_path, "n_images": n_images,
                       "labelled": "hit1" in terms and not embedding,
                       "images_per_s": round(n_images / max(seconds, 1e-9), 1), "processes": len(parts)}
        out.update(embedding_figures(terms) if embedding else classification_figures(terms))
    out["token_scores"] = token_scores(reduced)
    if evidence.bench_batches:
        out.update(_latency(base, reduced, runs, evidence, sample_images, base_sample))
    return Evaluation(out, sample_images, base_sample)


def _per_image_terms(base: nn.Module, reduced: nn.Module, runs: tuple[nn.Module, nn.Module], evidence: Evidence,
                     embedding: bool) -> tuple[Terms, tuple[Tensor, Tensor] | None]:
    """Both models on every batch, once: the per-image terms, and the first batch (on the CPU)."""
    parts: dict[str, list[Tensor]] = {}
    first: tuple[Tensor, Tensor] | None = None
    device = torch.device(evidence.device)
    if evidence.batches is None and evidence.images is None:
        return {}, None  # GMACs (and latency on random images) only
    with progress_bar(evidence.progress) as bar:
        task = bar.add_task("Base and reduced model", total=evidence.count())
        for images, base_images, labels in evidence.stream():
            base_images = images if base_images is None else base_images
            first = first or (images, base_images)
            # pinned batches copy while the previous batch still computes
            images, base_images = images.to(device, non_blocking=True), base_images.to(device, non_blocking=True)
            base_out = _predict(runs[0], base_images, evidence)
            reduced_out = _predict(runs[1], images, evidence)
            batch_terms = ({"embedding": reduced_out, "base_embedding": base_out} if embedding
                           else prediction_terms(reduced_out, base_out, labels))
            for key, model, inputs in (("macs_base", base, base_images), ("macs", reduced, images)):
                if _varies(model):
                    batch_terms[key] = count_macs(model, inputs).gmacs_per_image.double().cpu()
            for key, value in batch_terms.items():
                parts.setdefault(key, []).append(value)
            bar.advance(task, len(images))
    return {key: torch.cat(values) for key, values in parts.items()}, first


def _held_batches(evidence: Evidence) -> Iterator[Batch]:
    images, base_images, labels = evidence.images, evidence.base_images, evidence.labels
    for start in range(0, len(images), evidence.batch_size):
        stop = start + evidence.batch_size
        yield (images[start:stop], None if base_images is None else base_images[start:stop],
               None if labels is None else labels[start:stop])


def _joined(parts: list[Terms]) -> Terms:
    """The processes' terms, one after another (a process that had no images gives none)."""
    keys = next((part.keys() for part in parts if part), ())
    return {key: torch.cat([part[key] for part in parts if part]) for key in keys}


def _varies(model: nn.Module) -> bool:
    plan = plan_of(model)
    return plan is not None and plan.varies_per_image


def _mean_gmacs(model: nn.Module, per_image: Tensor | None, sample: Tensor | None) -> float:
    """Mean over every image when the count depends on it (ATS), else counted once."""
    return float(per_image.mean()) if per_image is not None else count_gmacs(model, sample)


def _predict(model: nn.Module, images: Tensor, evidence: Evidence) -> Tensor:
    with torch.inference_mode():
        logits = predict(model.eval(), images, batch_size=evidence.batch_size, progress=False)
    return logits.float().cpu()


def _rounded(interval: tuple[float, float] | None, scale: float, digits: int) -> list[float] | None:
    return None if interval is None else [round(bound * scale, digits) for bound in interval]


def classification_figures(terms: Terms) -> dict:
    """From `vitprune.metrics.prediction_terms` (the reference is the base): top-1/top-5 of both (with labels) and each drop with its paired 95% interval (normal
    approximation over the per-image differences); agreement with the base (Wilson interval) and
    mean KL(base || reduced) (normal approximation)."""
    out: dict = {"output": "logits"}
    if "hit1" in terms:
        for k in (1, 5):
            base_hits, hits = terms[f"reference_hit{k}"].double(), terms[f"hit{k}"].double()
            out[f"top{k}_base"], out[f"top{k}"] = round(float(base_hits.mean()) * 100, 2), round(float(hits.mean()) * 100, 2)
            out[f"top{k}_drop"] = round(out[f"top{k}_base"] - out[f"top{k}"], 2)
            out[f"top{k}_drop_ci95"] = _rounded(mean_interval(base_hits - hits), 100, 2)
    agree = terms["pred"] == terms["reference_pred"]
    out["agreement"] = round(float(agree.double().mean()) * 100, 2)
    out["agreement_ci95"] = _rounded(proportion_interval(agree), 100, 2)
    out["kl"] = round(float(terms["kl"].mean()), 5)
    out["kl_ci95"] = _rounded(mean_interval(terms["kl"], within=(0.0, math.inf)), 1, 5)
    return out


def embedding_figures(terms: Terms) -> dict:
    """Cosine with the base's embeddings (mean with its 95% interval, 5th percentile), retrieval
    agreement (Wilson interval) and recall@1/5 against the base's nearest neighbours
    (vitprune.metrics.embedding_metrics); labels are not used."""
    embeddings, base_embeddings = terms["embedding"], terms["base_embedding"]
    metrics = embedding_metrics(embeddings, base_embeddings)
    out: dict = {"output": f"embedding (dim {embeddings.shape[1]})"}
    for key in EMBEDDING_KEYS:
        if key in metrics:
            out[key] = round(metrics[key], 5 if key.startswith("cosine") else 2)
    out["cosine_mean_ci95"] = _rounded(mean_interval(cosine_per_image(embeddings, base_embeddings), within=(-1.0, 1.0)),
                                       1, 5)
    if len(embeddings) > 1:
        same = nearest_neighbours(embeddings, 1) == nearest_neighbours(base_embeddings, 1)
        out["retrieval_agreement_ci95"] = _rounded(proportion_interval(same[:, 0]), 100, 2)
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


def _latency(base: nn.Module, reduced: nn.Module, runs: tuple[nn.Module, nn.Module], evidence: Evidence,
             sample: Tensor | None, base_sample: Tensor | None) -> dict:
    """ms/image of both at each bench batch size, on the first batch of images (random without)."""
    inputs = {"base": base_sample if base_sample is not None else _random_images(base),
              "reduced": sample if sample is not None else _random_images(reduced)}
    timing = measure_latency({"base": runs[0], "reduced": runs[1]}, inputs, evidence.bench_batches,
                             warmup=evidence.bench_warmup, repeats=evidence.bench_repeats, device=evidence.device)
    ms = timing["ms_per_image"]
    out: dict = {"latency_ms": {
        str(batch): {"base": round(ms["base"][batch], 3), "reduced": round(ms["reduced"][batch], 3),
                     "speedup": round(ms["base"][batch] / ms["reduced"][batch], 3)}
        for batch in evidence.bench_batches}}
    out["latency_setup"] = {
        "device": timing["device"], "threads": timing["threads"], "warmup": timing["warmup"],
        "repeats": timing["repeats"], "inputs": "real images" if sample is not None else "random images",
        "runtime": evidence.runtime.describe(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    if timing["compile_s"]:
        out["latency_setup"]["compile_s"] = timing["compile_s"]
    return out


def _random_images(model: nn.Module) -> Tensor:
    size = model_img_size(model)
    return torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))
