"""The Python API without the CLI: reduce, measure, save, reload.

    python examples/quickstart.py [CHECKPOINT]

With no checkpoint it uses random weights (the mechanics only); with the shared
vit_tiny weights it shows the real trade-off.
"""
import sys
import tempfile
from pathlib import Path

import torch

import vitprune

checkpoint = sys.argv[1] if len(sys.argv) > 1 else None
model, info = vitprune.create_model("vit_tiny", checkpoint=checkpoint, pretrained=checkpoint is not None)
base_gmacs = vitprune.count_macs(model).gmacs

vitprune.apply(model, method="evit", keep=0.7)  # in place; still a timm VisionTransformer
print(f"plan: {vitprune.plan_of(model).describe()}")
print(f"GMACs/image: {base_gmacs:.3f} -> {vitprune.count_macs(model).gmacs:.3f}")

with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "evit"
    vitprune.save(out, model, info)
    reloaded = vitprune.load(out)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        same = torch.equal(model(x), reloaded(x))
    print(f"reloaded from {out.name}/: identical logits = {same}")
