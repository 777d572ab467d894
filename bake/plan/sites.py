"""One site as the planner sees it, what its plan asks of the whole plan, and the one fallback.

:class:`Site` holds the facts a decision reads (the module, its map, the kind and layout the registry or
the module type gives, the registry's consumer linears); :class:`Needs` is what a site's plan asks of the
whole plan (config flags to switch on, parameters to untie, notes), summed by :mod:`bake.plan.planner`;
:func:`to_affine` keeps whatever the fold steps do not fold in an affine module after the site.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from bake.core.fold_math import is_identity_scale, is_zero_shift
from bake.core.plan_types import AffineSpec, FoldStep, Layout, ScaleFold, ShiftFold, SiteKind, SitePlan
from lineas.hooks import feature_axis
from lineas.maps import SiteMap


@dataclass(frozen=True)
class Site:
    """What a decision knows about one site."""

    name: str
    module: nn.Module
    map: SiteMap
    kind: SiteKind
    source: str                              # "registry:<model_type>" or "module type"
    layout: Layout | None = None             # producers
    consumers: tuple[str, ...] | None = None  # norms: the registry's consumer linears (None: none known)
    consumers_note: str = ""                 # the registry's word on an empty consumer list
    tensor_consumers: tuple = ()             # norms: the registry's consumer tensors (bake.plan.tensor_consumers)
    mismatch: str = ""                       # why the registry entry for this site was not used

    @property
    def identity_scale(self) -> bool:
        return is_identity_scale(self.map.scale)

    @property
    def zero_shift(self) -> bool:
        return is_zero_shift(self.map.shift)

    def plan(self, *, scale: ScaleFold, shift: ShiftFold, steps: Iterable[FoldStep] = (),
             shift_targets: tuple[str, ...] = (), affine: AffineSpec | None = None, reason: str = "") -> SitePlan:
        return SitePlan(site=self.name, module_class=type(self.module).__name__, kind=self.kind,
                        source=self.source, scale=scale, shift=shift, steps=tuple(steps),
                        shift_targets=shift_targets, affine=affine, reason=reason)


@dataclass(frozen=True)
class Needs:
    """What one site's plan asks of the whole plan."""

    flags: tuple[str, ...] = ()                          # config bias flags to switch on
    untie: tuple[tuple[str, tuple[str, ...]], ...] = ()  # parameter, what it is tied to
    notes: tuple[str, ...] = ()                          # registry/model disagreements

    def __add__(self, other: Needs) -> Needs:
        return Needs(flags=self.flags + other.flags, untie=self.untie + other.untie, notes=self.notes + other.notes)


NOTHING = Needs()


def to_affine(site: Site, *, reason: str, steps: Iterable[FoldStep] = (), scale_folded: bool = False) -> SitePlan:
    """The one fallback: whatever ``steps`` do not fold stays in an affine module after the site."""
    scale = ScaleFold.IDENTITY if site.identity_scale else (ScaleFold.FOLDED if scale_folded else ScaleFold.AFFINE)
    shift = ShiftFold.ZERO if site.zero_shift else ShiftFold.AFFINE
    spec = AffineSpec(site=site.name, dim=site.map.dim, axis=feature_axis(site.module),
                      scale=scale is ScaleFold.AFFINE, shift=shift is ShiftFold.AFFINE)
    return site.plan(scale=scale, shift=shift, steps=steps, affine=spec,
                     reason=f"{site.mismatch}; {reason}" if site.mismatch else reason)


def folded_scale(site: Site) -> ScaleFold:
    return ScaleFold.IDENTITY if site.identity_scale else ScaleFold.FOLDED
