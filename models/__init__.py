"""Model registry: `create_model("res3d50")`, `list_models()`."""

from __future__ import annotations

from torch import nn

from . import res3d
from .desd import DeSDStudent, DeSDTeacher
from .heads import DINOHead
from .res3d import Res3D

_REGISTRY = {f"res3d{depth}": getattr(res3d, f"res3d{depth}") for depth in res3d.DEPTHS}

__all__ = ["create_model", "list_models", "Res3D", "DINOHead", "DeSDStudent", "DeSDTeacher"]


def list_models() -> list[str]:
    """Names of the registered backbones, shallowest first."""
    return list(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered backbone by name; unknown names raise with the list of known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown arch {name!r}; expected one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)
