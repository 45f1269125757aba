"""The registry of token-reduction methods: one module per method, one line each here.

    from vitprune import methods
    methods.get("evit").default_layers(12)     # [3, 6, 9]
    methods.names()                             # ('evit', 'ats', 'tome', 'zerotprune', 'ppt', 'transform')

A new method is a module with a `Method` subclass (parameters, default layers, block hooks,
FLOPs rule) and one `register` line below.
"""
from __future__ import annotations

from vitprune.errors import VitpruneError
from vitprune.methods.ats import ATS
from vitprune.methods.base import REQUIRED, BlockContext, Method, Param, TokenState
from vitprune.methods.evit import EViT
from vitprune.methods.ppt import PPT
from vitprune.methods.tome import ToMe
from vitprune.methods.transform import TokenTransforming
from vitprune.methods.zerotprune import ZeroTPrune

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise VitpruneError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


register(EViT())
register(ATS())
register(ToMe())
register(ZeroTPrune())
register(PPT())
register(TokenTransforming())

__all__ = ["REQUIRED", "BlockContext", "Method", "Param", "TokenState", "get", "names", "register"]
