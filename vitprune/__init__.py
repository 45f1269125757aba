"""vitprune: token reduction (EViT, ATS, ToMe) for any timm Vision Transformer, with evidence.

    import vitprune
    model, info = vitprune.create_model("deit_tiny", checkpoint="deit_tiny.pth")
    vitprune.apply(model, method="evit", keep=0.7)        # patched in place, still a timm model
    vitprune.save("out/", model, info)
    same = vitprune.load("out/")                          # identical logits

Everything here loads on first use, so `import vitprune` (and the CLI's --help) stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {  # the calls check their arguments in vitprune.api: a misuse is a VitpruneError naming the parameter
    "apply": ("vitprune.api", "apply"),
    "Plan": ("vitprune.plan", "Plan"),
    "Reduction": ("vitprune.plan", "Reduction"),
    "make_plan": ("vitprune.api", "make_plan"),
    "VitpruneError": ("vitprune.errors", "VitpruneError"),
    "load": ("vitprune.api", "load"),
    "save": ("vitprune.api", "save"),
    "remove": ("vitprune.api", "remove"),
    "plan_of": ("vitprune.api", "plan_of"),
    "create_model": ("vitprune.api", "create_model"),
    "count_macs": ("vitprune.api", "count_macs"),
    "reduced_intermediates": ("vitprune.api", "reduced_intermediates"),
}


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vitprune' has no attribute {name!r}")


__all__ = [*_API, "__version__"]
