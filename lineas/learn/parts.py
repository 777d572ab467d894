"""Which parts of each site's map are trained: the types the trainers share with a fold planner.

"Train only what can be baked": before training, a *fold planner* says per site which of the map's
scale and shift fold into standard weights (:class:`FoldableSites`, one :class:`SiteParts` per site);
the trainers then keep the other parts exactly at ``scale = 1`` / ``shift = 0``.  The planning itself
is the baker's (:mod:`bake.plan.foldable` implements :class:`FoldPlanner` with the bake planner and its
registry); ``lineas`` only defines the interface and the data, so that learning never imports the baker.
``lineas-train`` passes bake's planner to :func:`lineas.learn.train.learn_maps`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from lineas.learn.config import Foldable
from lineas.maps import SteeringMaps

__all__ = ["METADATA_KEY", "FoldPlanner", "FoldableSites", "SiteParts"]

METADATA_KEY = "foldable"  # lineas-maps v1 metadata key (JSON, see FoldableSites.to_metadata)


@dataclass(frozen=True)
class SiteParts:
    """Which parts of one site's map are trained (``True``) or frozen at the identity, and why."""

    site: str
    scale: bool
    shift: bool
    scale_reason: str = ""   # the planner's reason when the scale is frozen
    shift_reason: str = ""   # the planner's reason when the shift is frozen

    @property
    def excluded(self) -> bool:
        return not (self.scale or self.shift)

    def project(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` with the frozen parts put back at exactly 1 / 0."""
        return (scale if self.scale else torch.ones_like(scale), shift if self.shift else torch.zeros_like(shift))


@dataclass(frozen=True)
class FoldableSites:
    """The outcome of a :class:`FoldPlanner`'s ``plan`` for a list of sites (in training order)."""

    mode: Foldable
    applied: bool                          # False: every part is trained (mode off, auto without a registry entry,
                                           # or no planner given)
    registry: str | None                   # the registry entry the planner used, None when none describes the model
    sites: tuple[SiteParts, ...]
    config_changes: tuple[str, ...] = ()   # config flags the bake will switch on for the trained shifts
    note: str = ""                         # why it was not applied
    runtimes: tuple[str, ...] = ()         # runtimes (bake.registry.llm.Runtime values) the maps fold for

    @classmethod
    def not_applied(cls, mode: Foldable | str, sites: Sequence[str], note: str) -> FoldableSites:
        """Every scale and shift of ``sites`` trained; ``note`` says why nothing is frozen."""
        return cls(mode=Foldable(mode), applied=False, registry=None,
                   sites=tuple(SiteParts(site=s, scale=True, shift=True) for s in sites), note=note)

    def __getitem__(self, site: str) -> SiteParts:
        for p in self.sites:
            if p.site == site:
                return p
        raise KeyError(site)

    @property
    def trained(self) -> list[str]:
        return [p.site for p in self.sites if not p.excluded]

    @property
    def excluded(self) -> tuple[SiteParts, ...]:
        return tuple(p for p in self.sites if p.excluded)

    @property
    def partly_frozen(self) -> tuple[SiteParts, ...]:
        return tuple(p for p in self.sites if not p.excluded and not (p.scale and p.shift))

    def parts(self) -> dict[str, SiteParts] | None:
        """Site -> parts for the trainers, or None when nothing is frozen by this check."""
        return {p.site: p for p in self.sites if not p.excluded} if self.applied else None

    def summary(self) -> str:
        if not self.applied:
            return f"foldable ({self.mode.value}): not applied, every scale and shift is trained: {self.note}"
        n_scale = sum(not p.scale for p in self.partly_frozen)
        n_shift = sum(not p.shift for p in self.partly_frozen)
        planned = f"registry {self.registry!r}" if self.registry else "module types"
        planned += f", for {', '.join(self.runtimes)}" if self.runtimes else ""
        head = (f"foldable ({self.mode.value}, planned with {planned}): {len(self.trained)} site(s) trained, "
                f"{n_shift} shift(s) frozen at 0, {n_scale} scale(s) frozen at 1, "
                f"{len(self.excluded)} site(s) left out")
        lines = [head]
        for p in self.partly_frozen:
            part, why = ("shift", p.shift_reason) if not p.shift else ("scale", p.scale_reason)
            lines.append(f"  {p.site}: {part} frozen ({why})")
        lines += [f"  {p.site}: left out, nothing folds ({p.scale_reason})" for p in self.excluded]
        if self.config_changes:
            lines.append("  the bake will switch on: " + ", ".join(self.config_changes))
        return "\n".join(lines)

    def to_metadata(self) -> str:
        """JSON for the maps file's ``foldable`` metadata key (lineas-maps v1 metadata is free-form)."""
        frozen = {p.site: {part: why for part, on, why in (("scale", p.scale, p.scale_reason),
                                                           ("shift", p.shift, p.shift_reason)) if not on}
                  for p in self.partly_frozen}
        return json.dumps({
            "mode": self.mode.value, "applied": self.applied, "registry": self.registry,
            "frozen": frozen, "excluded": {p.site: p.scale_reason for p in self.excluded},
            "config_changes": list(self.config_changes), "note": self.note, "runtimes": list(self.runtimes),
        }, sort_keys=True)

    def to_dict(self) -> dict:
        return {**json.loads(self.to_metadata()), "sites": [asdict(p) for p in self.sites]}


class FoldPlanner(Protocol):
    """What :func:`lineas.learn.train.learn_maps` asks before and after training (``foldable`` auto / on).

    :data:`bake.plan.foldable.FOLD_PLANNER` implements it with the bake planner, as ``lineas-bake`` plans."""

    def plan(self, model: nn.Module, dims: Mapping[str, int], mode: Foldable,
             runtimes: Sequence[str] = ()) -> FoldableSites:
        """Which parts of maps at ``dims`` (site -> map length, in training order) fold into ``model``'s
        standard weights (and, with ``runtimes``, into weights each of those serving runtimes loads).
        ``mode`` is ``auto`` or ``on``; a ``ValueError`` for sites or runtimes it refuses outright."""
        ...

    def check_standard(self, model: nn.Module, maps: SteeringMaps, runtimes: Sequence[str] = ()) -> None:
        """Raise a ``ValueError`` unless ``maps`` fold into standard weights (served by ``runtimes``)."""
        ...
