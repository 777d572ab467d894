"""Attach steering maps to any ``torch.nn.Module`` tree with forward hooks.

The hooked model is the reference that ``bake/`` must reproduce, so the hook
computes exactly what a fold computes: ``y' = s * y + t`` with the effective
``(s, t)`` of all attached maps at their strengths (see
:func:`lineas.maps.effective_maps`).  The product is computed in float32 and
cast back to the activation dtype, so bf16/fp16 models are steered with fp32
parameters and one rounding at the end.

Feature axis: :func:`lineas.axis.feature_axis` (re-exported here), the one rule that
collection and the baker's fallback module use too.  For tuple/list outputs the map acts on
element 0.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lineas.axis import affine_on_axis, feature_axis, resolve_axis
from lineas.embedding_scale import outside_scale
from lineas.maps import SiteMap, SteeringMaps, effective_maps

__all__ = ["SteeringError", "feature_axis", "apply_affine", "attach_affine", "attach_maps", "steered",
           "SteeringHandle", "resolve_sites", "attach_row_affines", "module_feature_dim", "similar_names",
           "count_forward_hooks"]


class SteeringError(ValueError):
    """Maps do not fit the model (unknown site, wrong dimension)."""


def similar_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


def module_feature_dim(module: nn.Module) -> int | None:
    """The feature size a module outputs, when its type tells us (else None)."""
    for attr in ("normalized_shape", "num_channels", "out_features", "nf", "out_channels"):
        v = getattr(module, attr, None)
        if isinstance(v, int):
            return v
        if isinstance(v, (tuple, list, torch.Size)) and len(v) >= 1:
            return int(v[-1])
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1:  # RMSNorm-like
        return w.numel()
    return None


def apply_affine(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, site: str = "?",
                 axis: int | None = None, outside: float = 1.0, per_row: bool = False) -> torch.Tensor:
    """``scale * y + shift / outside`` on the feature axis, computed in fp32, returned in ``y.dtype``.

    ``axis`` None means the rank rule (see :func:`lineas.axis.feature_axis`); a map whose length
    is not the axis' size is a :class:`SteeringError` naming the site.  ``outside``: the site's
    activation is ``outside * y`` (1 but for a 4.x Gemma embedding, :mod:`lineas.embedding_scale`),
    so the map ``T`` on it is ``scale * y + shift / outside`` on the module output.
    ``per_row``: ``scale`` and ``shift`` are ``[B, D]``, row ``b`` of the batch steered by map ``b``
    (:func:`attach_row_affines`).
    """
    if outside != 1.0:
        shift = shift / outside
    try:
        d = y.shape[resolve_axis(axis, y.dim())]
    except ValueError as e:
        raise SteeringError(f"site {site!r}: {e}") from None
    if per_row and scale.shape[0] != y.shape[0]:
        raise SteeringError(f"site {site!r}: {scale.shape[0]} per-row maps for a batch of {y.shape[0]} rows")
    length = scale.shape[-1] if per_row else scale.numel()
    if d != length:
        raise SteeringError(f"site {site!r}: map has length {length} but the output feature axis has size {d} "
                            f"(output shape {tuple(y.shape)})")
    return affine_on_axis(y, scale, shift, axis, per_row)


class _AffineHook:
    """``scale*y + shift/outside`` on the module output ``y``: the map ``T`` on the site's activation
    ``outside*y`` (``outside`` is 1 but for a 4.x Gemma embedding, see :mod:`lineas.embedding_scale`)."""

    def __init__(self, site: str, scale: torch.Tensor, shift: torch.Tensor, axis: int | None = None,
                 outside: float = 1.0, per_row: bool = False):
        self.site, self.scale, self.shift, self.axis, self.outside = site, scale, shift, axis, outside
        self.per_row = per_row

    def __call__(self, module, inputs, output):
        def steer(y):
            return apply_affine(y, self.scale, self.shift, self.site, self.axis, self.outside, self.per_row)
        if isinstance(output, (tuple, list)):
            return type(output)((steer(output[0]), *output[1:]))
        return steer(output)


class SteeringHandle:
    """Live hooks on a model; ``remove()`` (or leaving the ``with`` block) detaches them."""

    def __init__(self, handles: list, sites: list[str]):
        self._handles = handles
        self.sites = sites

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def resolve_sites(model: nn.Module, sites: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    out = {}
    for site in sites:
        if site == "":  # named_modules() calls the root "": its output is the model's (logits, cache), not features
            raise SteeringError(f"site '' is the root module (the whole {type(model).__name__}), whose output is "
                                f"not a feature tensor; name a submodule, e.g. a decoder layer or a norm")
        if site not in modules:
            hint = similar_names(site, modules)
            raise SteeringError(f"unknown site {site!r}: no such module in {type(model).__name__}"
                                + (f"; similar names: {', '.join(hint)}" if hint else ""))
        out[site] = modules[site]
    return out


def attach_affine(model: nn.Module, affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> SteeringHandle:
    """Low-level: hook ``y -> scale*y + shift`` on each named site.

    The tensors are used as given (they may be trainable ``nn.Parameter``s).
    """
    modules = _checked_sites(model, affines)
    handles = [modules[site].register_forward_hook(
        _AffineHook(site, s, t, feature_axis(modules[site]), outside_scale(model, modules[site])))
        for site, (s, t) in affines.items()]
    return SteeringHandle(handles, list(affines))


def _checked_sites(model: nn.Module, affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, nn.Module]:
    modules = resolve_sites(model, list(affines))
    for site, (scale, _shift) in affines.items():
        d = module_feature_dim(modules[site])
        if d is not None and d != scale.numel():
            raise SteeringError(f"site {site!r}: map has length {scale.numel()} but "
                                f"{type(modules[site]).__name__} outputs {d} features")
    return modules


def attach_row_affines(model: nn.Module,
                       groups: Sequence[tuple[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]]) -> SteeringHandle:
    """Several maps in ONE forward pass: ``groups`` are ``(rows, affines)`` in batch order, the first
    ``rows`` rows steered by the first affines, and so on; every group maps the same sites and the
    rows add up to the batch.  One hook per site applies a ``[B, D]`` scale and shift
    (:func:`apply_affine` with ``per_row``), so each row gets bit for bit what hooking its group's
    maps alone gives it."""
    if not groups:
        raise SteeringError("no row groups to steer")
    sites = list(groups[0][1])
    for _, aff in groups[1:]:
        if sorted(aff) != sorted(sites):
            raise SteeringError(f"row groups map different sites: {sorted(sites)} vs {sorted(aff)}")
    modules = {}
    for _, aff in groups:
        modules = _checked_sites(model, aff)

    def rows_of(site: str, which: int) -> torch.Tensor:
        return torch.cat([aff[site][which].to(torch.float32).reshape(1, -1).expand(n, -1) for n, aff in groups])

    handles = [modules[site].register_forward_hook(
        _AffineHook(site, rows_of(site, 0), rows_of(site, 1), feature_axis(modules[site]),
                    outside_scale(model, modules[site]), per_row=True))
        for site in sites]
    return SteeringHandle(handles, sites)


def attach_maps(model: nn.Module, maps: SteeringMaps | Sequence[tuple[SteeringMaps, float]],
                strength: float | None = None) -> SteeringHandle:
    """Attach one maps object at ``strength`` or several ``(maps, strength)`` pairs, composed in order."""
    pairs = [(maps, 1.0 if strength is None else strength)] if isinstance(maps, SteeringMaps) else list(maps)
    eff: dict[str, SiteMap] = effective_maps(pairs)
    return attach_affine(model, {site: (m.scale, m.shift) for site, m in eff.items()})


@contextmanager
def steered(model: nn.Module, maps, strength: float | None = None):
    """``with steered(model, maps, 1.0): model(...)`` -- hooks removed on exit, even on error."""
    handle = attach_maps(model, maps, strength)
    try:
        yield handle
    finally:
        handle.remove()


def count_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())
