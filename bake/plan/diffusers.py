"""Plan a bake into a diffusers pipeline: the shared planner plus the AdaLN decision.

The pipeline's components are one module tree (:class:`lineas.pipelines.PipelineModules`), so the
shared :func:`bake.plan.planner.plan` plans every ordinary site (norms, Linear/Conv producers, shifts into
consumer biases) unchanged, with an :class:`bake.registry.llm.ArchEntry` built here from the class-based
diffusers registry (:mod:`bake.registry.diffusers`) for exactly the steered sites.  Sites whose class
is an adaptive LayerNorm with a registry rule are decided here: their map folds into the rows of the
modulation Linear (:data:`FoldOp.ADALN_ROWS`, :func:`bake.core.fold_math.fold_adaln_rows`).  The two halves are
merged into one :class:`FoldPlan`, which :func:`bake.fold.execute.apply_plan` carries out like any other.

Fallback: diffusers has no standard way to load a component with extra modules (an affine module
after an unfoldable site) -- a custom component class is loaded only as remote code, which plain
``DiffusionPipeline.from_pretrained`` refuses.  So a pipeline plan with an affine site is refused
by the bake (:data:`NO_STANDARD_FALLBACK`): a pipeline is never written that would load unsteered.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from bake.core.fold_math import ADALN_SCALE, ADALN_SHIFT
from bake.core.plan_types import (
    AffineSpec,
    FoldOp,
    FoldPlan,
    FoldStep,
    Layout,
    ScaleFold,
    ShiftFold,
    SiteKind,
    SitePlan,
)
from bake.errors import FoldError
from bake.plan.check import maps_digest, normalise_maps, resolve_site_modules
from bake.plan.module_kinds import producer_layout
from bake.plan.planner import plan
from bake.registry.diffusers import (
    REGISTRY_NAME,
    AdalnRule,
    ModulatedNormRule,
    PipelineRegistry,
    load_pipeline_registry,
)
from bake.registry.llm import ArchEntry, NormEntry, ProducerEntry
from lineas.hooks import feature_axis
from lineas.maps import SiteMap
from lineas.pipelines import PipelineModules, split_site

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


def site_entry(modules: Mapping[str, nn.Module], sites, registry: PipelineRegistry) -> ArchEntry:
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
                     producers=tuple(producers.values()), bias_flags={})


def _modulation_linear(name: str, owner: str, module: nn.Module, rule: AdalnRule, m: SiteMap) -> nn.Linear:
    """The AdaLN ``module``'s (named ``owner``) modulation Linear, checked against the map of ``name``."""
    linear = module.get_submodule(rule.linear)
    if not isinstance(linear, nn.Linear):
        raise FoldError(f"site {name!r}: registry says {rule.module_class}.{rule.linear} is the modulation Linear, "
                        f"{owner}.{rule.linear} is a {type(linear).__name__}")
    k = len(rule.chunks)
    if linear.out_features % k or linear.out_features // k != m.dim:
        raise FoldError(f"site {name!r}: map has length {m.dim} but the {rule.module_class}'s modulation Linear makes "
                        f"{k} chunks of {linear.out_features / k:g}")
    return linear


def _rows_site(name: str, module: nn.Module, kind: SiteKind, m: SiteMap, op: FoldOp, lin: str, linear: nn.Linear,
               chunks: tuple[str, ...], *, shift_into: ShiftFold) -> SitePlan:
    """The plan of a site whose map folds into row blocks of the modulation Linear ``lin``."""
    common = dict(site=name, module_class=type(module).__name__, kind=kind, source=SOURCE)
    identity, zero = bool((m.scale == 1).all()), bool((m.shift == 0).all())
    if identity and zero:
        return SitePlan(**common, scale=ScaleFold.IDENTITY, shift=ShiftFold.ZERO)
    if linear.bias is None:  # the folds' constant rows (a - 1, b) need a bias
        spec = AffineSpec(site=name, dim=m.dim, axis=feature_axis(module), scale=not identity, shift=not zero)
        return SitePlan(**common, scale=ScaleFold.IDENTITY if identity else ScaleFold.AFFINE,
                        shift=ShiftFold.ZERO if zero else ShiftFold.AFFINE, affine=spec,
                        reason=f"{lin} has no bias to take the fold's constant rows")
    step = FoldStep(op=op, module=lin, layout=Layout.LINEAR, tensors=(f"{lin}.weight", f"{lin}.bias"), chunks=chunks)
    return SitePlan(**common, scale=ScaleFold.IDENTITY if identity else ScaleFold.FOLDED,
                    shift=ShiftFold.ZERO if zero else shift_into, steps=(step,),
                    shift_targets=(lin,) if shift_into is ShiftFold.CONSUMERS and not zero else ())


def _adaln_site(name: str, module: nn.Module, rule: AdalnRule, m: SiteMap) -> SitePlan:
    linear = _modulation_linear(name, name, module, rule, m)
    return _rows_site(name, module, SiteKind.ADALN, m, FoldOp.ADALN_ROWS, f"{name}.{rule.linear}", linear,
                      rule.chunks, shift_into=ShiftFold.OWN_BIAS)


def _modulated_site(name: str, modules: Mapping[str, nn.Module], hit: tuple[ModulatedNormRule, str],
                    registry: PipelineRegistry, m: SiteMap) -> SitePlan:
    rule, parent = hit
    owner = f"{parent}.{rule.modulator}"
    arule = registry.adaln_rule(modules[owner]) if owner in modules else None
    if arule is None or rule.scale not in arule.chunks or rule.shift not in arule.chunks:
        raise FoldError(f"site {name!r}: registry says {owner} modulates it with chunks {rule.scale!r}/{rule.shift!r}, "
                        f"but {owner} is a {type(modules.get(owner)).__name__} without them")
    linear = _modulation_linear(name, owner, modules[owner], arule, m)
    # the blocks this step rewrites are called "scale"/"shift" (bake.core.fold_math); the AdaLN's own are renamed
    renamed = {rule.scale: ADALN_SCALE, rule.shift: ADALN_SHIFT, ADALN_SCALE: "out_scale", ADALN_SHIFT: "out_shift"}
    chunks = tuple(renamed.get(n, n) for n in arule.chunks)
    return _rows_site(name, modules[name], SiteKind.LAYERNORM, m, FoldOp.MODULATED_ROWS, f"{owner}.{arule.linear}",
                      linear, chunks, shift_into=ShiftFold.CONSUMERS)


def plan_pipeline(modules: PipelineModules, effective_maps, *, require_standard: bool = False,
                  registry: PipelineRegistry | None = None) -> FoldPlan:
    """The :class:`FoldPlan` for ``effective_maps`` on the pipeline ``modules``; nothing is modified.

    Raises :class:`FoldError` for maps that do not fit (unknown site, wrong length) and, with
    ``require_standard``, for a plan that needs an affine module (listing the sites and why).
    """
    registry = registry or load_pipeline_registry()
    maps = normalise_maps(effective_maps)
    resolved = resolve_site_modules(modules, maps)
    known, notes = _component_notes(modules, maps, registry)
    named = dict(modules.named_modules())
    adaln, ordinary = {}, {}
    for name, m in maps.items():
        known_component = split_site(name)[0] in known
        rule = registry.adaln_rule(resolved[name]) if known_component else None
        hit = registry.modulated_rule(name, named) if known_component else None
        if rule is not None:
            adaln[name] = _adaln_site(name, resolved[name], rule, m)
        elif hit is not None:
            adaln[name] = _modulated_site(name, named, hit, registry, m)
        else:
            ordinary[name] = m
    for name, p in adaln.items():  # a hook on the Linear itself acts before these folds: both write its rows
        linear = p.steps[0].module if p.steps else None
        inner = [s for s in maps if linear and (s == linear or s.startswith(linear + "."))]
        if inner:
            raise FoldError(f"site {name!r} folds into the rows of {linear}, which is steered too ({inner}); bake one "
                            f"of them (or compose them into one map on {name!r})")
    shared = None
    if ordinary:
        entry = site_entry(named, [s for s in ordinary if split_site(s)[0] in known], registry)
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
