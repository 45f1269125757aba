"""`vitprune methods`: what each registered method takes, where it runs, what it needs, whether
calibrate searches it; read from the methods' declarations and calibrate's policy."""
from __future__ import annotations

from vitprune import methods
from vitprune.calibrate import policy
from vitprune.methods import REQUIRED
from vitprune.plan import format_layers

REFERENCE_DEPTH = 12  # default layers are shown for a 12-block model (ViT-S/B, DeiT)


def method_table() -> list[dict]:
    """One entry per registered method, in the registry's order."""
    return [_entry(name) for name in methods.names()]


def _entry(name: str) -> dict:
    method = methods.get(name)
    defaults = method.settings({})
    needs = (["class token"] if method.needs_class_token(defaults) else []) + (
        ["class-token or average pooling"] if method.needs_token_pooling else [])
    return {
        "name": name,
        "params": [{"name": param.name, "type": param.kind.__name__,
                    "default": None if param.default is REQUIRED else param.default,
                    "required": param.default is REQUIRED, "range": param.range_text, "help": param.help,
                    "counts_tokens": param.counts_tokens} for param in method.params],
        "default_layers": format_layers(method.default_layers(REFERENCE_DEPTH)),
        "needs": needs,
        "per_image": method.varies_per_image,
        "calibrate": policy.policy(name).kind,
        "paper": method.paper,
    }
