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

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from lineas.learn.config import ConfigError, Foldable
from lineas.learn.parts import METADATA_KEY, FoldableSites, SiteParts
from lineas.maps import SiteMap, SteeringMaps

__all__ = ["FOLD_PLANNER", "METADATA_KEY", "BakeFoldPlanner", "FoldableSites", "SiteParts", "check_standard",
           "plan_foldable", "runtime_names"]

PROBE_SCALE, PROBE_SHIFT = 1.5, 0.5  # any non-identity values: the planner looks only at identity-ness


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
    (:class:`bake.registry.llm.Runtime` values or names :func:`bake.plan.runtimes.parse_runtime` reads),
    into weights each of those runtimes serves.

    Raises :class:`bake.errors.FoldError` (a ``ValueError``) for sites the baker refuses outright, and when
    the maps that are left still cannot be served by ``runtimes`` (a runtime with no fact for the model)."""
    from bake.plan.runtimes import check_required, parse_runtime
    from lineas.pipelines import PipelineModules

    mode = Foldable(mode)
    runtimes = tuple(dict.fromkeys(parse_runtime(r) for r in runtimes))
    if runtimes and isinstance(model, PipelineModules):  # as lineas-bake refuses it for a pipeline
        raise ValueError(f"--require-runtime {' '.join(r.value for r in runtimes)}: the runtime matrix covers causal "
                         "LMs; none of its runtimes runs a diffusers pipeline")
    sites = list(dims)
    if mode is Foldable.OFF:  # with runtimes: refused by TrainConfig, before the model is loaded
        return FoldableSites.not_applied(mode, sites, "--foldable off")
    scale_plan = _probe(model, dims, {s: (True, False) for s in sites})
    if mode is Foldable.AUTO and scale_plan.registry is None and not runtimes:
        why = (f"no registry entry (bake/registry/archs) describes {type(model).__name__}, so the planner would freeze "
               "shifts only for want of knowing which linears read them; --foldable on freezes them anyway")
        return FoldableSites.not_applied(mode, sites, why)
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
    from bake.plan.runtimes import check_required, parse_runtime

    check_required(_planner(model)(model, maps.maps, require_standard=True), [parse_runtime(r) for r in runtimes])


def runtime_names(names: str | Sequence[str]) -> tuple[str, ...]:
    """``--require-runtime`` values as the bake spells them (:func:`bake.plan.runtimes.parse_runtime`:
    ``llamacpp`` -> ``llama.cpp``), without repeats; a :class:`lineas.learn.config.ConfigError` for the
    field ``require_runtime`` naming a value that is not a runtime (``lineas-train`` prints it as its flag)."""
    from bake.plan.runtimes import parse_runtime
    from bake.registry.llm import Runtime

    if isinstance(names, str):
        names = (names,)
    out = []
    for n in names or ():
        try:
            out.append(parse_runtime(n).value)
        except ValueError:
            raise ConfigError("require_runtime", f"got {n!r}, not a runtime: choose from "
                                                 f"{', '.join(r.value for r in Runtime)}") from None
    return tuple(dict.fromkeys(out))


class BakeFoldPlanner:
    """:class:`lineas.learn.parts.FoldPlanner` with the bake planner: what ``lineas-train`` passes to
    :func:`lineas.learn.train.learn_maps` (``planner=FOLD_PLANNER``)."""

    def plan(self, model: nn.Module, dims: Mapping[str, int], mode: Foldable | str,
             runtimes: Sequence[str] = ()) -> FoldableSites:
        return plan_foldable(model, dims, mode, runtimes)

    def check_standard(self, model: nn.Module, maps: SteeringMaps, runtimes: Sequence[str] = ()) -> None:
        check_standard(model, maps, runtimes)

    def __repr__(self) -> str:
        return "bake.plan.foldable.FOLD_PLANNER"


FOLD_PLANNER = BakeFoldPlanner()
