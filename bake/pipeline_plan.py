"""Plan a bake into a diffusers pipeline: the shared planner plus the AdaLN decision.

The pipeline's components are one module tree (:class:`lineas.pipelines.PipelineModules`), so the
shared :func:`bake.plan.plan` plans every ordinary site (norms, Linear/Conv producers, shifts into
consumer biases) unchanged, with an :class:`bake.registry.ArchEntry` built here from the class-based
diffusers registry (:mod:`bake.pipeline_registry`) for exactly the steered sites.  Sites whose class
is an adaptive LayerNorm with a registry rule are decided here: their map folds into the rows of the
modulation Linear (:data:`FoldOp.ADALN_ROWS`, :func:`bake.fold.fold_adaln_rows`).  The two halves are
merged into one :class:`FoldPlan`, which :func:`bake.execute.apply_plan` carries out like any other.

Fallback: diffusers has no standard way to load a component with extra modules (an affine module
after an unfoldable site) -- a custom component class is loaded only as remote code, which plain
``DiffusionPipeline.from_pretrained`` refuses.  So a pipeline plan with an affine site is refused
by the bake (:data:`NO_STANDARD_FALLBACK`): a pipeline is never written that would load unsteered.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lineas.hooks import feature_axis
from lineas.maps import SiteMap
from lineas.pipelines import PipelineModules, split_site

from .errors import FoldError
from .plan import _resolve, plan
from .plan_check import _normalise_maps, maps_digest
from .plan_types import AffineSpec, FoldOp, FoldPlan, FoldStep, Layout, ScaleFold, ShiftFold, SiteKind, SitePlan
from .module_kinds import producer_layout
from .pipeline_registry import REGISTRY_NAME, AdalnRule, PipelineRegistry, load_pipeline_registry
from .registry import ArchEntry, NormEntry, ProducerEntry

SOURCE = f"registry:{REGISTRY_NAME}"
NO_STANDARD_FALLBACK = (
    "diffusers has no standard loading path for a component with an extra affine module (a custom component "
    "class loads only as remote code, which plain DiffusionPipeline.from_pretrained refuses), so a pipeline bake "
    "folds every site or writes nothing (--require-standard is implied)")


def _component_notes(modules: PipelineModules, sites, registry: PipelineRegistry) -> tuple[set[str], list[str]]:
    """The components the registry covers among the steered ones, and a note for each it does not."""
    known, notes = set(), []
    for component in dict.fromkeys(split_site(s)[0] for s in sites):
        cls = type(modules.get_submodule(component)).__name__
        if cls in registry.components:
            known.add(component)
        else:
            notes.append(f"component {component} ({cls}) is not in the diffusers registry: its sites are planned by "
                         f"module type")
    return known, notes


def site_entry(modules: Mapping[str, nn.Module], sites, registry: PipelineRegistry,
               pipeline_class: str) -> ArchEntry:
    """An :class:`ArchEntry` of exact names (no templates) for the ``sites`` the registry rules match."""
    norms, producers = [], {}
    for name in sites:
        hit = registry.norm_rule(name, modules)
        if hit is not None:
            rule, parent = hit
            consumers = tuple(f"{parent}.{c}" for c in rule.consumers)
            norms.append(NormEntry(site=name, kind=rule.kind, consumers=consumers, module_class=rule.module_class,
                                   note=rule.note))
            for c in consumers:
                layout = producer_layout(modules[c]) if c in modules else None
                producers[c] = ProducerEntry(site=c, layout=layout or Layout.LINEAR)
            continue
        prule = registry.producer_rule(name, modules)
        if prule is not None:
            layout = producer_layout(modules[name])
            producers[name] = ProducerEntry(site=name, layout=layout if layout in prule.layouts else prule.layouts[0])
    return ArchEntry(model_type=REGISTRY_NAME, architectures=(PipelineModules.__name__,), norms=tuple(norms),
                     producers=tuple(producers.values()), bias_flags={},
                     notes=f"diffusers registry rules for the steered sites of a {pipeline_class}")


def _adaln_site(name: str, module: nn.Module, rule: AdalnRule, m: SiteMap) -> SitePlan:
    linear = module.get_submodule(rule.linear)
    if not isinstance(linear, nn.Linear):
        raise FoldError(f"site {name!r}: registry says {rule.module_class}.{rule.linear} is the modulation Linear, "
                        f"the model has a {type(linear).__name__}")
    k = len(rule.chunks)
    if linear.out_features % k or linear.out_features // k != m.dim:
        raise FoldError(f"site {name!r}: map has length {m.dim} but the {rule.module_class}'s modulation Linear makes "
                        f"{k} chunks of {linear.out_features / k:g}")
    common = dict(site=name, module_class=rule.module_class, kind=SiteKind.ADALN, source=SOURCE)
    identity, zero = bool((m.scale == 1).all()), bool((m.shift == 0).all())
    if identity and zero:
        return SitePlan(**common, scale=ScaleFold.IDENTITY, shift=ShiftFold.ZERO)
    if linear.bias is None:  # c' = a*c + (a-1) and a*c + b need a bias
        spec = AffineSpec(site=name, dim=m.dim, axis=feature_axis(module), scale=not identity, shift=not zero)
        return SitePlan(**common, scale=ScaleFold.IDENTITY if identity else ScaleFold.AFFINE,
                        shift=ShiftFold.ZERO if zero else ShiftFold.AFFINE, affine=spec,
                        reason=f"{name}.{rule.linear} has no bias to take the fold's constant rows")
    lin = f"{name}.{rule.linear}"
    step = FoldStep(op=FoldOp.ADALN_ROWS, module=lin, layout=Layout.LINEAR, tensors=(f"{lin}.weight", f"{lin}.bias"),
                    chunks=rule.chunks)
    return SitePlan(**common, scale=ScaleFold.IDENTITY if identity else ScaleFold.FOLDED,
                    shift=ShiftFold.ZERO if zero else ShiftFold.OWN_BIAS, steps=(step,))


def plan_pipeline(modules: PipelineModules, effective_maps, *, require_standard: bool = False,
                  registry: PipelineRegistry | None = None) -> FoldPlan:
    """The :class:`FoldPlan` for ``effective_maps`` on the pipeline ``modules``; nothing is modified.

    Raises :class:`FoldError` for maps that do not fit (unknown site, wrong length) and, with
    ``require_standard``, for a plan that needs an affine module (listing the sites and why).
    """
    registry = registry or load_pipeline_registry()
    maps = _normalise_maps(effective_maps)
    resolved = _resolve(modules, maps)
    known, notes = _component_notes(modules, maps, registry)
    adaln, ordinary = {}, {}
    for name, m in maps.items():
        rule = registry.adaln_rule(resolved[name]) if split_site(name)[0] in known else None
        if rule is not None:
            adaln[name] = _adaln_site(name, resolved[name], rule, m)
        else:
            ordinary[name] = m
    for name in adaln:  # the hook on the Linear acts before the AdaLN's: both folds write its rows, in plan order
        inner = [s for s in maps if s.startswith(name + ".")]
        if inner:
            raise FoldError(f"site {name!r} and the site(s) {inner} inside it are both steered; their folds write the "
                            f"same modulation rows, so bake one of them (or compose them into one map on {name!r})")
    shared = None
    if ordinary:
        named = dict(modules.named_modules())
        entry = site_entry(named, [s for s in ordinary if split_site(s)[0] in known], registry, modules.pipeline_class)
        shared = plan(modules, ordinary, entry=entry)
        notes.extend(shared.notes)
    by_site = {p.site: p for p in (shared.sites if shared else ())} | adaln
    result = FoldPlan(model_class=type(modules).__name__, model_type=modules.pipeline_class, registry=REGISTRY_NAME,
                      sites=tuple(by_site[s] for s in maps), maps_digest=maps_digest(maps), notes=tuple(notes))
    if require_standard and result.affine_sites:
        lines = [f"  {p.site}: {p.reason}" for p in result.sites if p.affine is not None]
        raise FoldError(f"{len(lines)} pipeline site(s) cannot be folded into standard weights; "
                        f"{NO_STANDARD_FALLBACK}:\n" + "\n".join(lines))
    return result
