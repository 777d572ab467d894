"""Decide, per site, how its effective map ``y -> s*y + t`` is baked; describe it as frozen data.

:func:`plan` looks at the model (registry entry, module types, biases, config
flags, tied weights) and returns a :class:`FoldPlan` (records in
:mod:`bake.core.plan_types`); nothing is modified.  :func:`bake.fold.execute.apply_plan`
carries the plan out.  The split lets ``lineas-bake --dry-run`` print exactly
what would happen, after the same checks as the real run.

Decision rules, per site (an identity scale / zero shift needs nothing):

* **norm** (registry entry whose class matches, or ``nn.LayerNorm`` /
  ``nn.GroupNorm`` / ``torch.nn.RMSNorm`` by type): the scale folds into the
  weight (``s*w`` or Gemma's ``s*(1+w) - 1``); the shift folds into the norm's
  own bias when it has one, else into the biases of *every* consumer linear the
  registry lists (``b += W t``) when each has a bias or a config flag that adds
  one, and of every consumer tensor it names (a MoE router, fused 3-D experts:
  :mod:`bake.plan.tensor_consumers`), which must have its bias; else the shift
  stays in a shift-only affine module.
* **producer** (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d``, plain
  ``nn.Embedding``; a registry producer must have the layout the registry
  says): rows ``W' = diag(s) W``, ``b' = s*b + t``; a missing bias comes from a
  registry flag or the shift stays in an affine module.  A tied weight is never
  written: the site gets an affine module unless untying is allowed and the tie
  is the config's ``tie_word_embeddings``.
* anything else: a full affine module.

Each decision is a function of the site's facts that returns its
:class:`SitePlan` and what it needs from the whole plan (config flags to switch
on, parameters to untie, notes: :class:`bake.plan.sites.Needs`); :class:`_Planner`
gathers those afterwards.  The maps are checked first (:mod:`bake.plan.check`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import nn

from bake.core.plan_types import (
    NORM_KINDS,
    PLAN_VERSION,
    AffineSpec,
    ConfigChange,
    FoldOp,
    FoldPlan,
    FoldStep,
    Layout,
    ScaleFold,
    ShiftFold,
    SiteKind,
    SitePlan,
    Untie,
)
from bake.errors import FoldError
from bake.plan.check import check_site_outputs, maps_digest, normalise_maps, resolve_site_modules
from bake.plan.module_kinds import norm_kind_by_type, producer_layout, tied_groups
from bake.plan.runtimes import check_required, runtime_matrix
from bake.plan.sites import NOTHING, Needs, Site, folded_scale, to_affine
from bake.plan.tensor_consumers import expand_consumers, tensor_consumer_route
from bake.registry.llm import ArchEntry, entry_for, expand, match_template
from bake.registry.vlm import text_decoder, vlm_entry
from lineas.maps import SiteMap

# Callers import the plan types from here, beside plan() itself.
__all__ = ["NORM_KINDS", "PLAN_VERSION", "AffineSpec", "ConfigChange", "FoldOp", "FoldPlan", "FoldStep", "Layout",
           "ScaleFold", "ShiftFold", "SiteKind", "SitePlan", "Untie", "maps_digest", "plan", "producer_layout"]

log = logging.getLogger(__name__)

UNTIE_HINT = "pass --untie-embeddings (Python: untie=True) to give it its own copy"
REQUIRE_STANDARD = "--require-standard (Python: require_standard=True)"


class _Planner:
    """The model-wide facts (registry entry, modules, ties, config) that per-site decisions consult,
    and the bookkeeping that merges what the decisions need into one plan."""

    def __init__(self, model: nn.Module, *, untie: bool, entry: ArchEntry | None = None):
        self.model = model
        self.config = getattr(model, "config", None)
        self.modules = dict(model.named_modules())
        self.tied = tied_groups(model)
        self.allow_untie = untie
        self.notes: list[str] = []
        self.decoder: str | None = None  # a vision-language model's text decoder (bake.registry.vlm)
        if entry is None and self.config is not None:
            found = vlm_entry(model)
            entry, self.decoder = found if found is not None else (entry_for(self.config), text_decoder(model))
        # The config that holds the bias flags: a vision-language model's text config
        self.flag_config = self.config.get_text_config() if self.decoder is not None else self.config
        self.entry: ArchEntry | None = entry
        if self.entry is not None and self.entry.describes(model) is None:
            self._note(f"registry entry {self.entry.model_type!r} describes {', '.join(self.entry.architectures)}, "
                       f"not {type(model).__name__}: every site is planned by module type")
            self.entry = None
        self.registry_source = f"registry:{self.entry.model_type}" if self.entry else ""

    def _note(self, text: str) -> None:
        if text not in self.notes:
            log.warning("fold plan: %s", text)
            self.notes.append(text)

    # ---- facts
    def classify(self, name: str, m: SiteMap) -> Site:
        module = self.modules[name]
        cls = type(module).__name__
        mismatch = ""
        if self.entry is not None:
            mt = self.entry.model_type
            hit = self.entry.match_norm(name)
            producer = self.entry.match_producer(name)
            if hit is not None:
                norm, layer = hit
                if norm.module_class == cls:
                    return Site(name=name, module=module, map=m, kind=norm.kind, source=self.registry_source,
                                 consumers=tuple(expand(c, layer) for c in norm.consumers),
                                 consumers_note=norm.note,
                                 tensor_consumers=expand_consumers(norm.tensor_consumers, layer))
                mismatch = f"registry {mt!r} expects a {norm.module_class} at {name}, the model has a {cls}"
            elif producer is not None:
                if producer_layout(module) is producer.layout:
                    return Site(name=name, module=module, map=m, kind=SiteKind(producer.layout.value),
                                 source=self.registry_source, layout=producer.layout)
                mismatch = (f"registry {mt!r} lists {name} as a {producer.layout.value} layer, "
                            f"the model has a {cls}")
        kind = norm_kind_by_type(module)
        if kind is not None:
            return Site(name=name, module=module, map=m, kind=kind, source="module type", mismatch=mismatch)
        layout = producer_layout(module)
        if layout is not None:
            return Site(name=name, module=module, map=m, kind=SiteKind(layout.value), source="module type",
                         layout=layout, mismatch=mismatch)
        return Site(name=name, module=module, map=m, kind=SiteKind.MODULE, source="module type", mismatch=mismatch)

    def write_access(self, params: Iterable[str]) -> tuple[str | None, Needs]:
        """(None, the unties needed) when every parameter may be written; else (why not, nothing)."""
        untie = []
        for param in params:
            others = self.tied.get(param)
            if not others:
                continue
            if self.allow_untie and self._tied_by_config(param):
                untie.append((param, others))
                continue
            why = f"{param} is tied to {', '.join(others)}"
            if not self.allow_untie:
                return f"{why} ({UNTIE_HINT})", NOTHING
            return why + " by something other than config.tie_word_embeddings, so it cannot be untied safely", NOTHING
        return None, Needs(untie=tuple(untie))

    def _tied_by_config(self, param: str) -> bool:
        if self.config is None or not getattr(self.config, "tie_word_embeddings", False):
            return False
        try:
            emb = self.model.get_input_embeddings().weight
            out = self.model.get_output_embeddings().weight
        except Exception:
            return False
        return emb is out and dict(self.model.named_parameters(remove_duplicate=False)).get(param) is emb

    def bias_route(self, name: str, module: nn.Module) -> tuple[str | None, Needs]:
        """(None, flag to switch on if any) when ``module`` has or can get a bias; else (why not, nothing)."""
        if getattr(module, "bias", None) is not None:
            return None, NOTHING
        flag = self.entry.flag_for(name) if self.entry else None
        if flag is not None and self.flag_config is not None and hasattr(self.flag_config, flag):
            return None, Needs(flags=(flag,))
        if flag is not None:
            return f"{name} has no bias and the config lacks the {flag!r} flag", NOTHING
        return f"{name} has no bias and no config flag adds one", NOTHING

    def consumer_route(self, site: Site) -> tuple[str | None, tuple[FoldStep, ...], Needs]:
        """Can the shift move into the bias of every linear reading the site? (why not | None, steps, needs)"""
        if site.consumers is None:
            return ("no registry entry names the linears that read this output, so its shift cannot move into "
                    "their biases"), (), NOTHING
        if not site.consumers and not site.tensor_consumers:
            return (site.consumers_note or "no linear consumes this output") + "; the shift has no bias to fold into", \
                (), NOTHING
        steps, needs = [], NOTHING
        for c in site.consumers:
            mod = self.modules.get(c)
            if mod is None:
                return f"registry consumer {c} is not in the model", (), NOTHING
            layout = self.entry.match_producer(c).layout  # the registry validator made every consumer a producer
            if producer_layout(mod) is not layout:
                mismatch = f"registry {self.entry.model_type!r} lists {c} as a {layout.value} layer, the model has a " \
                           f"{type(mod).__name__}"
                return f"consumer {c}: {mismatch}", (), Needs(notes=(mismatch + ": shift not folded into it",))
            why, flag = self.bias_route(c, mod)
            if why is None and getattr(mod, "bias", None) is not None:
                why, _ = self.write_access([f"{c}.bias"])
            if why is not None:
                return f"consumer {why}", (), NOTHING
            steps.append(FoldStep(op=FoldOp.INPUT_SHIFT, module=c, layout=layout, tensors=(f"{c}.bias",)))
            needs = needs + flag
        # a router or fused experts (MoE): biases addressed by tensor, b' = b + W t (bake.plan.tensor_consumers)
        why, tensor_steps, tensor_needs = tensor_consumer_route(
            site.tensor_consumers, dict(self.model.named_parameters(remove_duplicate=False)), self.write_access)
        if why is not None:
            return why, (), tensor_needs
        return None, tuple(steps) + tensor_steps, needs + tensor_needs

    # ---- decisions
    def decide(self, site: Site) -> tuple[SitePlan, Needs]:
        if site.identity_scale and site.zero_shift:
            return site.plan(scale=ScaleFold.IDENTITY, shift=ShiftFold.ZERO), NOTHING
        if site.kind.is_norm:
            return self.decide_norm(site)
        if site.layout is not None:
            return self.decide_producer(site)
        return to_affine(site, reason=f"no exact fold is known for a {type(site.module).__name__} output"), NOTHING

    def decide_norm(self, site: Site) -> tuple[SitePlan, Needs]:
        name, module = site.name, site.module
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor) and not site.identity_scale:
            # elementwise_affine=False: a shift can still move into the consumers' biases, a scale cannot
            return to_affine(site, reason="norm has no weight (elementwise_affine=False) to take the scale"), NOTHING
        if site.kind in (SiteKind.RMSNORM, SiteKind.RMSNORM_1P) and bias is not None:
            return to_affine(site, reason="RMSNorm with a bias is not a known convention"), NOTHING
        steps = []
        if not site.identity_scale:
            op = FoldOp.NORM_SCALE_1P if site.kind is SiteKind.RMSNORM_1P else FoldOp.NORM_SCALE
            steps.append(FoldStep(op=op, module=name, layout=Layout.NORM, tensors=(f"{name}.weight",)))
        if bias is not None:  # b' = s*b + t: written whenever the map is not the identity
            steps.append(FoldStep(op=FoldOp.NORM_BIAS, module=name, layout=Layout.NORM, tensors=(f"{name}.bias",)))
        blocked, needs = self.write_access(t for step in steps for t in step.tensors)
        if blocked:
            return to_affine(site, reason=blocked), NOTHING
        scale = folded_scale(site)
        if site.zero_shift:
            return site.plan(scale=scale, shift=ShiftFold.ZERO, steps=steps), needs
        if bias is not None:
            return site.plan(scale=scale, shift=ShiftFold.OWN_BIAS, steps=steps), needs
        # A shift on a bias-free norm moves to every consumer's bias, or stays in an affine module.
        why, consumer_steps, consumer_needs = self.consumer_route(site)
        if why is None:
            targets = site.consumers + tuple(dict.fromkeys(c.module for c in site.tensor_consumers))
            return site.plan(scale=scale, shift=ShiftFold.CONSUMERS, steps=[*steps, *consumer_steps],
                             shift_targets=targets), needs + consumer_needs
        return to_affine(site, reason=why, steps=steps, scale_folded=True), needs + consumer_needs

    def decide_producer(self, site: Site) -> tuple[SitePlan, Needs]:
        name, module, layout = site.name, site.module, site.layout
        has_bias = layout is not Layout.EMBEDDING and getattr(module, "bias", None) is not None
        rows = (f"{name}.weight", f"{name}.bias") if has_bias else (f"{name}.weight",)
        if site.zero_shift or layout is Layout.EMBEDDING:  # an embedding's shift goes into every row
            blocked, needs = self.write_access(rows)
            if blocked:
                return to_affine(site, reason=blocked), NOTHING
            step = FoldStep(op=FoldOp.ROWS, module=name, layout=layout, tensors=rows)
            shift = ShiftFold.ZERO if site.zero_shift else ShiftFold.OWN_BIAS
            return site.plan(scale=folded_scale(site), shift=shift, steps=[step]), needs
        no_bias, flag = self.bias_route(name, module)
        if no_bias is None:
            blocked, needs = self.write_access(rows)
            if blocked:
                return to_affine(site, reason=blocked), NOTHING
            step = FoldStep(op=FoldOp.ROWS, module=name, layout=layout, tensors=(f"{name}.weight", f"{name}.bias"))
            return site.plan(scale=folded_scale(site), shift=ShiftFold.OWN_BIAS, steps=[step]), needs + flag
        # No bias to take the shift: the scale folds into the rows, the shift stays in an affine module.
        if site.identity_scale:
            return to_affine(site, reason=no_bias), NOTHING
        blocked, needs = self.write_access(rows)
        if blocked:
            return to_affine(site, reason=blocked), NOTHING
        step = FoldStep(op=FoldOp.ROWS, module=name, layout=layout, tensors=rows)
        return to_affine(site, reason=no_bias, steps=[step], scale_folded=True), needs

    # ---- bookkeeping
    def plan_sites(self, maps: Mapping[str, SiteMap]) -> tuple[tuple[SitePlan, ...], dict[str, list[str]],
                                                                dict[str, tuple[str, ...]]]:
        """Every site's plan, the config flags to switch on (flag -> sites) and the parameters to untie."""
        sites, flags, untie = [], {}, {}
        for name, m in maps.items():
            site = self.classify(name, m)
            if site.mismatch:
                self._note(site.mismatch + ": planned by module type")
            site_plan, needs = self.decide(site)
            sites.append(site_plan)
            for flag in dict.fromkeys(needs.flags):
                flags.setdefault(flag, []).append(name)
            untie.update(needs.untie)
            for note in needs.notes:
                self._note(note)
        return tuple(sites), flags, untie

    def config_changes(self, flags: Mapping[str, list[str]], untie: Mapping[str, tuple[str, ...]]
                       ) -> tuple[ConfigChange, ...]:
        out = []
        for flag, sites in flags.items():
            old = getattr(self.flag_config, flag)
            if old is True:
                continue
            templates = self.entry.bias_flags[flag]
            targets = tuple(name for name, mod in self.modules.items()
                            if any(match_template(t, name) is not False for t in templates)
                            and getattr(mod, "bias", None) is None)
            out.append(ConfigChange(key=flag, old=old, new=True,
                                    reason=f"needed by {len(sites)} site{'s' if len(sites) != 1 else ''}",
                                    adds_bias_to=targets))
        if untie:
            out.append(ConfigChange(key="tie_word_embeddings", old=True, new=False, reason="untie " + ", ".join(untie)))
        return tuple(out)


def plan(model: nn.Module, effective_maps: Mapping[str, SiteMap], *, require_standard: bool = False,
         untie: bool = False, runnable=None, entry: ArchEntry | None = None,
         require_runtimes=()) -> FoldPlan:
    """Plan how to bake ``effective_maps`` (site -> effective ``SiteMap``, e.g. from
    :func:`lineas.maps.effective_maps`) into ``model``.  Nothing is modified.

    Raises :class:`FoldError` for maps the bake would refuse: unknown or root sites, a map
    length that does not match the site's output (checked with one tiny forward pass for
    sites whose type does not tell their size), non-finite values.
    ``require_standard``: raise :class:`FoldError` naming every site that would need an
    affine module (so the result loads with plain transformers, no remote code).
    ``untie``: allow giving a tied output/input embedding its own copy so it can be folded.
    ``model`` may be a skeleton on the meta device (nothing here reads a weight); ``runnable``
    then opens a runnable copy for the one check forward pass, if a site needs it.
    ``entry``: the registry entry to plan with (default: the one for ``model.config``); a model
    family without configs (a diffusers pipeline, :mod:`bake.plan.diffusers`) builds its own.
    ``require_runtimes``: :class:`bake.plan.runtimes.Runtime` values that must serve the export without custom
    code (:attr:`FoldPlan.runtimes`); raise :class:`FoldError` with the reasons otherwise.
    """
    maps = normalise_maps(effective_maps)
    check_site_outputs(model, resolve_site_modules(model, maps), maps, runnable=runnable)
    planner = _Planner(model, untie=untie, entry=entry)
    sites, flags, untied = planner.plan_sites(maps)
    config = getattr(model, "config", None)
    result = FoldPlan(
        model_class=type(model).__name__,
        model_type=getattr(config, "model_type", None),
        registry=planner.entry.model_type if planner.entry else None,
        sites=sites,
        config_changes=planner.config_changes(flags, untied),
        untied=tuple(Untie(parameter=p, tied_to=o) for p, o in untied.items()),
        maps_digest=maps_digest(maps),
        notes=tuple(planner.notes),
    )
    result = replace(result, runtimes=runtime_matrix(
        model_type=result.model_type, registry=result.registry, affine_sites=result.affine_sites,
        config_changes=result.config_changes, vision_language=planner.decoder is not None))
    check_required(result, require_runtimes)
    if require_standard and result.affine_sites:
        lines = [f"  {p.site}: {p.reason}" for p in result.sites if p.affine is not None]
        raise FoldError(f"{len(lines)} site(s) cannot be folded into standard weights, as {REQUIRE_STANDARD} "
                        f"demands:\n" + "\n".join(lines))
    return result
