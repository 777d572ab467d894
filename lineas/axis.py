"""The one feature-axis rule: where a site's per-neuron map acts, and how its output is pooled.

Used by the steering hooks (:mod:`lineas.hooks`), the learners' activation
collection (:mod:`lineas.collect`) and the baker's fallback module
(``bake/fold/affine_module.py``), so training, inference and the baked model
steer the same axis.  This file imports only torch: its source is inlined
into the ``modeling_lineas.py`` that an exported checkpoint ships (see
``bake.fold.remote_code.write_remote_code``), so keep it free of other imports.

The rule:

* the module *type* fixes the axis where it can: features last for Linear,
  GPT-2 ``Conv1D``, Embedding, LayerNorm and every ``*RMSNorm`` / ``*LayerNorm``
  whatever the rank (Qwen3/Gemma3 ``q_norm`` outputs ``[B, L, heads, head_dim]``);
  channels at dim 1 for channel-first modules (``Conv{1,2,3}d``, ``BatchNorm*``,
  ``GroupNorm``, ``InstanceNorm*``);
* otherwise the rank decides: dim 1 of 4-D ``[B, C, H, W]`` outputs, else the last dim.
"""

import torch
from torch import nn

_FEATURES_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                   nn.modules.instancenorm._InstanceNorm)


def rank_axis(ndim: int) -> int:
    """The axis by rank alone: 1 for 4-D outputs, else the last."""
    return 1 if ndim == 4 else -1


def feature_axis(module: nn.Module, ndim: int | None = None) -> int | None:
    """The output feature axis of ``module``: the one its type fixes, else the rank rule for an
    ``ndim``-D output, or None when the type does not fix it and ``ndim`` is not given (decide at
    run time from the output's rank)."""
    if isinstance(module, _CHANNELS_FIRST):
        return 1
    name = type(module).__name__
    if isinstance(module, _FEATURES_LAST) or name == "Conv1D" or name.endswith(("RMSNorm", "LayerNorm")):
        return -1
    return None if ndim is None else rank_axis(ndim)


def resolve_axis(axis: int | None, ndim: int) -> int:
    """``axis`` (None: the rank rule) as a non-negative dimension index of an ``ndim``-D output."""
    if ndim < 1:
        raise ValueError("a 0-D output has no feature axis")
    a = rank_axis(ndim) if axis is None else int(axis)
    if not -ndim <= a < ndim:
        raise ValueError(f"feature axis {axis} does not exist in a {ndim}-D output")
    return a % ndim


def affine_on_axis(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                   axis: int | None, per_row: bool = False) -> torch.Tensor:
    """``scale * y + shift`` along ``axis`` (None: the rank rule), computed in float32 and cast back to
    ``y.dtype``; ``scale`` or ``shift`` may be None (left out).  Both must have the axis' length.
    ``per_row``: ``scale`` and ``shift`` are ``[B, D]``, one map per row of the batch (dim 0); each
    element then sees exactly the arithmetic of its row's map applied alone."""
    a = resolve_axis(axis, y.dim())
    shape = [1] * y.dim()
    shape[a] = -1
    if per_row:
        if a == 0:
            raise ValueError(f"per-row maps need a batch axis, but the feature axis of shape {tuple(y.shape)} is 0")
        shape[0] = y.shape[0]
    z = y.to(torch.float32)
    if scale is not None:
        z = z * scale.to(device=y.device, dtype=torch.float32).view(shape)
    if shift is not None:
        z = z + shift.to(device=y.device, dtype=torch.float32).view(shape)
    return z.to(y.dtype)


def pool_features(y: torch.Tensor, axis: int | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample features ``[B, D]`` in float32, D = the size of the feature ``axis`` (None: rank rule).

    The mean over every non-batch axis except the feature axis.  When the feature axis is not dim 1,
    dim 1 is the token axis of a ``[B, T, ...]`` output, and a ``[B, T]`` ``mask`` weights it (padding
    is left out of the mean).
    """
    if y.dim() < 2:
        raise ValueError(f"cannot pool an output of shape {tuple(y.shape)}: it has no batch and feature axes")
    a = resolve_axis(axis, y.dim())
    if a == 0:
        raise ValueError(f"feature axis 0 of an output of shape {tuple(y.shape)} is the batch axis")
    z = y.to(torch.float32).movedim(a, -1)  # [B, ..., D]; the token axis (when a != 1) stays at dim 1
    if z.dim() == 2:
        return z
    tokens = a != 1 and mask is not None and tuple(mask.shape) == tuple(z.shape[:2])
    if not tokens:
        return z.flatten(1, -2).mean(dim=1)
    m = mask.to(device=z.device, dtype=torch.float32).view(*mask.shape, *([1] * (z.dim() - 2)))
    dims = tuple(range(1, z.dim() - 1))
    count = (m.expand(*z.shape[:-1], 1)).sum(dim=dims)  # [B, 1]: tokens x the other non-feature sizes
    return (z * m).sum(dim=dims) / count.clamp_min(1.0)
