"""Every ViT-like model in timm: which vitprune reduces, which it refuses (and why), and whether what
it runs is right.

    python benchmarks/zoo.py                       # census + forward tests of every config family
    python benchmarks/zoo.py --families 6          # the forward tests of the first 6 families only
    python benchmarks/zoo.py --no-onnx             # without the ONNX parity sample
    python benchmarks/zoo.py --classes Beit,Eva    # the forward tests of these classes' families only

1. Census: every model of timm's ViT modules built on the meta device (no memory, no weights),
   counted by class and by what vitprune says of it (supported, or refused with the part that blocks it).
2. Config families: models with the same structure (class, block, attention, MLP, stem, pooling,
   prefix tokens, q/k norm, layer scale) are one family; its smallest model up to 350M parameters is
   built with random weights, its depth cut to 4 blocks and its input to 6 x 6 patches (the mechanics
   do not depend on either), and every method is applied: ok, refused (the reason) or failed (the
   error). For each that runs: MACs (vitprune.flops) against FlopCounterMode with math attention on the
   same image, to 1e-6 relative; a batch of 2 against the two images alone; and per family a no-op plan
   (ToMe r=0) and `vitprune.remove` bit-identical to the base model; ONNX parity (ToMe) on the first
   family of each class. Models with a relative position bias (BEiT, RelPos) take pruning only: there
   the no-op plan is the empty plan, EViT runs with fuse=false and the ONNX sample is EViT's.
"""
from __future__ import annotations

import argparse
import collections
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitprune
from vitprune import methods
from vitprune.errors import VitpruneError
from vitprune.flops import count_macs, model_input
from vitprune.models import grid_size, image_size, is_supported_vit, set_image_size, stem_of
from vitprune.patch import has_position_bias
from vitprune.plan import Plan

MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "vitamin", "vision_transformer_sam", "eva",
           "beit", "vision_transformer_relpos", "naflexvit")
MAX_PARAMS = 350e6
DEPTH, GRID = 4, 6
SETTINGS = {"evit": {"keep": 0.7, "layers": [1]}, "ats": {"keep": 0.7, "layers": [1]}, "tome": {"r": 3},
            "zerotprune": {"keep": 0.7, "layers": [1]}, "ppt": {"r": 3, "layers": [1]},
            "transform": {"keep": 0.7, "layers": [1]}}
# models with a relative position bias: what runs in place of a merge (the no-op, the ONNX sample) and EViT unfused
PRUNING_ONLY = {"evit": {"fuse": False}}
ONNX_SAMPLE = {"method": "tome", "r": 3}
ONNX_SAMPLE_PRUNING = {"method": "evit", "keep": 0.7, "fuse": False, "layers": [1]}


def census() -> list[dict]:
    rows = []
    for module in MODULES:
        for name in timm.list_models(module=module):
            row = {"name": name, "module": module}
            try:
                with torch.device("meta"):
                    model = timm.create_model(name, pretrained=False)
            except Exception as error:  # a model timm itself cannot build without its weights' config
                rows.append({**row, "class": "?", "params": 0, "status": f"not built ({type(error).__name__})"})
                continue
            reason = is_supported_vit(model)
            rows.append({**row, "class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
                         "status": "supported" if reason is None else f"refused: {reason}",
                         "family": structure(model)})
    return rows


def structure(model: torch.nn.Module) -> tuple:
    """What makes two models the same family for the adapter."""
    blocks = getattr(model, "blocks", None)
    block = blocks[0] if blocks is not None and len(blocks) else None
    attn = getattr(block, "attn", None)
    kind = lambda module: type(module).__name__ if module is not None else "-"  # noqa: E731
    pooling = "map" if getattr(model, "attn_pool", None) is not None else str(getattr(model, "global_pool", "?"))
    stem = stem_of(model) if hasattr(model, "patch_embed") or hasattr(model, "embeds") else None
    return (type(model).__name__, kind(block), kind(attn), kind(getattr(block, "mlp", None)), kind(stem),
            getattr(stem, "pos_embed_type", "-"), pooling,
            getattr(model, "cls_token", None) is not None or bool(getattr(model, "has_class_token", False)),
            int(getattr(model, "num_reg_tokens", 0) or 0), kind(getattr(attn, "q_norm", None)),
            kind(getattr(block, "ls1", None)))


def families(rows: list[dict]) -> list[dict]:
    """The smallest model up to MAX_PARAMS of each family, supported or not, in census order."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if "family" in row and row["params"] <= MAX_PARAMS:
            if row["family"] not in best or row["params"] < best[row["family"]]["params"]:
                best[row["family"]] = row
    return list(best.values())


def torch_gmacs(model: torch.nn.Module, image: torch.Tensor) -> float:
    model.requires_grad_(False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(image)
    return counter.get_total_flops() / 2 / 1e9


def build_small(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        skeleton = timm.create_model(name, pretrained=False)
    grid, full = grid_size(skeleton), image_size(skeleton)
    img_size = tuple(int(full[i] * GRID // grid[i]) for i in range(2))
    torch.manual_seed(0)
    if not hasattr(skeleton, "embeds"):
        try:
            return timm.create_model(name, pretrained=False, depth=DEPTH, img_size=img_size).eval()
        except AssertionError:  # per-block settings (sapiens2's key/value heads) fix the depth: keep it
            return timm.create_model(name, pretrained=False, img_size=img_size).eval()
    # NaFlexVit resamples its position grid to any input; at its own size (the grid's) it does not resample
    grid_kwargs = {} if skeleton.embeds.pos_embed_type == "none" else {"pos_embed_grid_size": (GRID, GRID)}
    model = timm.create_model(name, pretrained=False, depth=DEPTH, **grid_kwargs).eval()
    set_image_size(model, img_size[0])
    return model


def test_family(row: dict, onnx: bool) -> dict:
    out = {"name": row["name"], "class": row["class"], "params_m": row["params"] / 1e6, "methods": {},
           "exact": "-", "onnx": "-"}
    if row["status"] != "supported":
        out["methods"] = {name: "refused" for name in methods.names()}
        out["reason"] = row["status"].removeprefix("refused: ")
        return out
    try:
        model = build_small(row["name"])
    except Exception as error:
        out["reason"] = f"small build failed: {type(error).__name__}: {str(error)[:80]}"
        return out
    x = torch.randn_like(model_input(model, 2))
    worst = 0.0
    pruning_only = has_position_bias(model)
    with torch.inference_mode():
        base = model(x)
        vitprune.apply(model, Plan()) if pruning_only else vitprune.apply(model, method="tome", r=0)
        noop = torch.equal(model(x), base)
    for name in methods.names():
        extra = PRUNING_ONLY.get(name, {}) if pruning_only else {}
        try:
            vitprune.apply(model, method=name, **SETTINGS[name], **extra)
        except VitpruneError as error:
            out["methods"][name] = f"refused ({error})"
            continue
        try:
            with torch.inference_mode():
                batch = model(x)
                alone = torch.cat([model(x[i:i + 1]) for i in range(2)])
            rel = abs(count_macs(model, x[:1]).gmacs / torch_gmacs(model, x[:1]) - 1)
            worst = max(worst, rel)
            same = torch.allclose(batch, alone, rtol=1e-4, atol=1e-4)
            ok = "ok" + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})".lower() if extra else "")
            out["methods"][name] = ok if rel <= 1e-6 and same else f"failed (MACs rel {rel:.1e}, batch {same})"
        except Exception as error:
            out["methods"][name] = f"failed ({type(error).__name__}: {str(error)[:80]})"
    vitprune.remove(model)
    with torch.inference_mode():
        removed = torch.equal(model(x), base)
    out["exact"] = f"MACs {worst:.0e}, no-op {'=' if noop else '!='}, remove {'=' if removed else '!='}"
    if onnx:
        out["onnx"] = onnx_parity(vitprune.apply(model, **(ONNX_SAMPLE_PRUNING if pruning_only else ONNX_SAMPLE)), x)
    return out


def onnx_parity(model: torch.nn.Module, x: torch.Tensor) -> str:
    from vitprune.export.verify import verify_onnx
    from vitprune.onnx_runtime import export_onnx
    try:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.onnx"
            export_onnx(model, path)
            parity = verify_onnx(model, path, x, batch_size=2, provider="cpu")
        return f"max {parity['max_abs_diff']:.1e}" + ("" if parity["passed"] else " FAILED")
    except Exception as error:
        return f"failed ({str(error).removeprefix('ONNX export failed: ')[:110]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=None, help="forward-test only the first N families")
    parser.add_argument("--classes", default=None, help="forward-test only these classes' families (comma-separated)")
    parser.add_argument("--no-onnx", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    rows = census()
    print(f"timm {timm.__version__}, torch {torch.__version__}, {platform.machine()}; "
          f"{len(rows)} models in {', '.join(MODULES)}\n")
    print("| class | models | supported | refused (why) |\n|---|---|---|---|")
    by_class = collections.defaultdict(list)
    for row in rows:
        by_class[row["class"]].append(row)
    for cls, members in sorted(by_class.items(), key=lambda item: -len(item[1])):
        supported = sum(row["status"] == "supported" for row in members)
        reasons = collections.Counter(row["status"].removeprefix("refused: ") for row in members
                                      if row["status"] != "supported")
        why = "; ".join(f"{count}: {reason}" for reason, count in reasons.most_common())
        print(f"| {cls} | {len(members)} | {supported} | {why} |")
    picked = families(rows)
    if args.classes:
        picked = [row for row in picked if row["class"] in args.classes.split(",")]
    tested = picked if args.families is None else picked[:args.families]
    print(f"\n{len(picked)} config families up to {MAX_PARAMS / 1e6:.0f}M parameters; {len(tested)} forward-tested "
          f"(random weights, depth {DEPTH}, {GRID}x{GRID} patches)\n")
    names = methods.names()
    print("| family (smallest model) | class | params (M) | " + " | ".join(names) + " | exact | ONNX |")
    print("|---|---|---|" + "---|" * len(names) + "---|---|")
    onnx_classes: set[str] = set()
    totals = collections.Counter()
    for row in tested:
        result = test_family(row, onnx=not args.no_onnx and row["class"] not in onnx_classes
                             and row["status"] == "supported")
        if result["onnx"] != "-":
            onnx_classes.add(row["class"])
        cells = []
        for name in names:
            status = result["methods"].get(name, "-")
            totals[status.split(" ")[0]] += 1
            cells.append(status if status.startswith("ok") or status == "-" else status[:60])
        if "reason" in result:
            cells = [f"refused: {result['reason']}"[:90]] + [""] * (len(names) - 1)
        print(f"| {row['name']} | {row['class']} | {result['params_m']:.1f} | " + " | ".join(cells)
              + f" | {result['exact']} | {result['onnx']} |", flush=True)
    print(f"\nmethod runs: {dict(totals)}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
