"""What a module is, by its type alone: a producer layout, a norm kind, parameters sharing storage.

The planner (:mod:`bake.plan.planner`) trusts these facts over the registry: a type fixes the fold math
exactly, while a registry entry may describe another class at the same name.
"""

from __future__ import annotations

from torch import nn

from bake.core.plan_types import Layout, SiteKind
from lineas.embedding_scale import is_scaled_embedding


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing: no Conv1D to recognise
        return ()


def producer_layout(module: nn.Module) -> Layout | None:
    """Layout of a module whose output rows fold exactly, by type only (None: not a producer)."""
    if isinstance(module, nn.Linear):
        return Layout.LINEAR
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return Layout.CONV1D
    if type(module) is nn.Conv2d:
        return Layout.CONV
    if type(module) is nn.Embedding or is_scaled_embedding(module):  # Gemma's scale: lineas.embedding_scale
        return Layout.EMBEDDING
    return None


def norm_kind_by_type(module: nn.Module) -> SiteKind | None:
    if type(module) is nn.LayerNorm:
        return SiteKind.LAYERNORM
    if type(module) is nn.GroupNorm:
        return SiteKind.GROUPNORM
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and type(module) is rms:
        return SiteKind.RMSNORM
    return None


def tied_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the other names sharing its storage."""
    by_ptr: dict[tuple, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = (p.device.type, p.data_ptr()) if p.device.type != "meta" else ("id", id(p))
        by_ptr.setdefault(key, []).append(name)
    out = {}
    for names in by_ptr.values():
        if len(names) > 1:
            for n in names:
                out[n] = tuple(x for x in names if x != n)
    return out
