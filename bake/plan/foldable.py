"""Train only what can be baked: which parts of each site's map fold into standard weights.

The answer comes from the baker's own planner (:func:`bake.plan.planner.plan`, with its registry
``bake/registry/archs``), never from a copy of its rules.  Per site, three probe plans are made with
maps of the site's real size:

* a scale alone (``scale = 1.5``, ``shift = 0``): does it fold without an affine module?
* a shift alone (``scale = 1``, ``shift = 0.5``): does it fold (into the site's own bias, or into
  the biases of the linears that read it, switching on a config flag such as ``attention_bias``)?
* both parts that folded alone, together: if the pair needs an affine module, the shift is frozen.

The planner's decisions depend only on which parts are not the identity (and on the model),
never on their values, so a map whose frozen parts stay exactly at ``scale = 1`` / ``shift = 0``
plans with no affine module, whatever was learned: ``lineas-bake --require-standard`` takes it.
A site where neither part folds (a decoder layer, a tied ``lm_head``) is left out of training.

Standard weights are not enough for every runtime: a shift that folds by switching on a bias flag
(Gemma-2's ``attention_bias``) makes an export that llama.cpp's Gemma-2 cannot load.  With
``runtimes`` (``lineas-train --require-runtime llama.cpp``), a shift whose plan alone is refused by one
of them (the plan's runtime matrix, :mod:`bake.plan.runtimes`, from the registry's cited facts) is frozen
as well, and the trained maps are planned with that requirement before they are returned.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lineas.learn.config import Foldable
from lineas.maps import SiteMap, SteeringMaps

PROBE_SCALE, PROBE_SHIFT = 1.5, 0.5  # any non-identity values: the planner looks only at identity-ness
METADATA_KEY = "foldable"             # lineas-maps v1 metadata key (JSON, see FoldableSites.to_metadata)


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
    """The outcome of :func:`plan_foldable` for a list of sites (in training order)."""

    mode: Foldable
    applied: bool                          # False: every part is trained (mode off, or auto without a registry entry)
    registry: str | None                   # the registry entry the planner used, None when none describes the model
    sites: tuple[SiteParts, ...]
    config_changes: tuple[str, ...] = ()   # config flags the bake will switch on for the trained shifts
    note: str = ""                         # why it was not applied
    runtimes: tuple[str, ...] = ()         # runtimes (bake.registry.llm.Runtime values) the maps fold for

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


def _planner(model: nn.Module):
    """The planner ``lineas-bake`` uses for ``model``: the pipeline one for a diffusers pipeline's components."""
    from lineas.pipelines import PipelineModules

    if isinstance(model, PipelineModules):
        from bake.plan.diffusers import plan_pipeline

        return plan_pipeline
    from bake.plan.planner import plan

    return plan


def _probe(model: nn.Module, dims: Mapping[str, int], parts: Mapping[str, tuple[bool, bool]]):
    """The bake plan of maps at ``dims`` whose scale / shift is a non-identity probe where ``parts`` says so."""
    plan = _planner(model)
    return plan(model, {s: SiteMap(torch.full((d,), PROBE_SCALE) if parts[s][0] else torch.ones(d),
                                   torch.full((d,), PROBE_SHIFT) if parts[s][1] else torch.zeros(d))
                        for s, d in dims.items()})


def _runtime_refusal(plan, runtimes) -> str:
    """Why ``plan``'s runtime matrix refuses one of ``runtimes`` ("" when all serve it)."""
    from bake.plan.runtimes import refusals

    return "; ".join(f"{v.runtime.value}: {v.reason}" for v in refusals(plan.runtimes, runtimes))


def plan_foldable(model: nn.Module, dims: Mapping[str, int], mode: Foldable | str = Foldable.ON,
                  runtimes=()) -> FoldableSites:
    """Which parts of maps at ``dims`` (site -> map length, in training order) fold into ``model``'s
    standard weights, as ``lineas-bake`` (no ``--untie-embeddings``) would plan them; with ``runtimes``
    (:class:`bake.registry.llm.Runtime` values), into weights each of those runtimes serves.

    Raises :class:`bake.errors.FoldError` (a ``ValueError``) for sites the baker refuses outright, and when
    the maps that are left still cannot be served by ``runtimes`` (a runtime with no fact for the model)."""
    from bake.plan.runtimes import check_required
    from bake.registry.llm import Runtime
    from lineas.pipelines import PipelineModules

    mode = Foldable(mode)
    runtimes = tuple(Runtime(r) for r in runtimes)
    if runtimes and isinstance(model, PipelineModules):  # as lineas-bake refuses it for a pipeline
        raise ValueError(f"--require-runtime {' '.join(r.value for r in runtimes)}: the runtime matrix covers causal "
                         "LMs; none of its runtimes runs a diffusers pipeline")
    sites = list(dims)
    everything = tuple(SiteParts(site=s, scale=True, shift=True) for s in sites)
    if mode is Foldable.OFF:  # with runtimes: refused by TrainConfig, before the model is loaded
        return FoldableSites(mode=mode, applied=False, registry=None, sites=everything, note="--foldable off")
    scale_plan = _probe(model, dims, {s: (True, False) for s in sites})
    if mode is Foldable.AUTO and scale_plan.registry is None and not runtimes:
        why = (f"no registry entry (bake/registry/archs) describes {type(model).__name__}, so the planner would freeze "
               "shifts only for want of knowing which linears read them; --foldable on freezes them anyway")
        return FoldableSites(mode=mode, applied=False, registry=None, sites=everything, note=why)
    shift_plan = _probe(model, dims, {s: (False, True) for s in sites})
    parts = {}
    for s in sites:
        sp, tp = scale_plan.site(s), shift_plan.site(s)
        parts[s] = SiteParts(site=s, scale=sp.fully_folded, shift=tp.fully_folded,
                             scale_reason="" if sp.fully_folded else sp.reason,
                             shift_reason="" if tp.fully_folded else tp.reason)
    if runtimes and _runtime_refusal(shift_plan, runtimes):  # which shifts the runtimes refuse, one site at a time
        for s in sites:
            if parts[s].shift:
                why = _runtime_refusal(_probe(model, {s: dims[s]}, {s: (False, True)}), runtimes)
                if why:
                    parts[s] = replace(parts[s], shift=False, shift_reason=why)
    trained = {s: d for s, d in dims.items() if not parts[s].excluded}
    changes = ()
    if trained:
        joint = _probe(model, trained, {s: (parts[s].scale, parts[s].shift) for s in trained})
        clash = [s for s in trained if not joint.site(s).fully_folded]  # both fold alone, not together
        for s in clash:
            parts[s] = SiteParts(site=s, scale=True, shift=False,
                                 shift_reason="folds alone but not beside the scale: " + joint.site(s).reason)
        if clash:  # now one part per clashing site, each checked alone above
            joint = _probe(model, trained, {s: (parts[s].scale, parts[s].shift) for s in trained})
        check_required(joint, runtimes)  # what is left must be served: a runtime with no fact for the model refuses
        changes = tuple(f"{c.key}={c.new!r} ({c.reason})" for c in joint.config_changes)
    return FoldableSites(mode=mode, applied=True, registry=scale_plan.registry,
                         sites=tuple(parts[s] for s in sites), config_changes=changes,
                         runtimes=tuple(r.value for r in runtimes))


def check_standard(model: nn.Module, maps: SteeringMaps, runtimes=()) -> None:
    """Plan ``maps`` exactly as ``lineas-bake --require-standard [--require-runtime R ...]`` does; raises
    ``FoldError`` if any site would need an affine module or a runtime in ``runtimes`` could not serve the
    export (the guarantee, checked on the trained maps themselves)."""
    from bake.plan.runtimes import check_required
    from bake.registry.llm import Runtime

    check_required(_planner(model)(model, maps.maps, require_standard=True), [Runtime(r) for r in runtimes])
