"""Decide, per site, how its effective map ``y -> s*y + t`` is baked; describe it as frozen data.

:func:`plan` looks at the model (registry entry, module types, biases, config
flags, tied weights) and returns a :class:`FoldPlan`; nothing is modified.
:func:`bake.execute.apply_plan` carries the plan out.  The split lets
``lineas-bake --dry-run`` print exactly what would happen.

Decision rules, per site (an identity scale / zero shift needs nothing):

* **norm** (registry entry whose class matches, or ``nn.LayerNorm`` /
  ``nn.GroupNorm`` / ``torch.nn.RMSNorm`` by type): the scale folds into the
  weight (``s*w`` or Gemma's ``s*(1+w) - 1``); the shift folds into the norm's
  own bias when it has one, else into the biases of *every* consumer linear the
  registry lists (``b += W t``) when each has a bias or a config flag that adds
  one; else the shift stays in a shift-only affine module.
* **producer** (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv2d``, plain
  ``nn.Embedding``): rows ``W' = diag(s) W``, ``b' = s*b + t``; a missing bias
  comes from a registry flag or the shift stays in an affine module.  A tied
  weight is never written: the site gets an affine module unless ``untie=True``
  and the tie is the config's ``tie_word_embeddings``.
* anything else: a full affine module.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Mapping

import torch
from torch import nn

from lineas.hooks import SteeringError, feature_axis, module_feature_dim, resolve_sites
from lineas.maps import SiteMap, SteeringMaps

from .errors import FoldError
from .fold import is_identity_scale, is_zero_shift
from .registry import ArchEntry, NormEntry, entry_for, expand, match_template

PLAN_VERSION = 1


# -- plan data ----------------------------------------------------------------
@dataclass(frozen=True)
class FoldStep:
    """One tensor update.

    ``op``: ``norm_scale`` (w' = s*w), ``norm_scale_1p`` (w' = s*(1+w) - 1),
    ``norm_bias`` (b' = s*b + t), ``rows`` (producer: W' = diag(s) W, b' = s*b + t),
    ``input_shift`` (consumer: b' = b + W t, with t of ``site``).
    """

    op: str
    module: str
    layout: str
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class AffineSpec:
    """An affine module to insert after ``site`` (see :class:`bake.affine_module.LineasAffine`)."""

    site: str
    dim: int
    axis: int | None
    scale: bool
    shift: bool

    def to_config(self) -> dict:
        return {"site": self.site, "dim": self.dim, "axis": self.axis, "scale": self.scale, "shift": self.shift}


@dataclass(frozen=True)
class SitePlan:
    site: str
    module_class: str
    kind: str      # rmsnorm | rmsnorm_1p | layernorm | groupnorm | linear | conv1d | conv | embedding | module
    source: str    # "registry:<model_type>" or "module type"
    scale: str     # identity | folded | affine
    shift: str     # zero | folded | consumers | affine
    steps: tuple[FoldStep, ...] = ()
    affine: AffineSpec | None = None
    shift_targets: tuple[str, ...] = ()   # modules whose bias receives the shift
    reason: str = ""                      # why an affine module is needed

    @property
    def fully_folded(self) -> bool:
        return self.affine is None


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: object
    new: object
    reason: str
    adds_bias_to: tuple[str, ...] = ()   # modules that get a zero bias when the flag is switched on


@dataclass(frozen=True)
class Untie:
    parameter: str
    tied_to: tuple[str, ...]


@dataclass(frozen=True)
class FoldPlan:
    model_class: str
    model_type: str | None
    registry: str | None
    sites: tuple[SitePlan, ...]
    config_changes: tuple[ConfigChange, ...] = ()
    untied: tuple[Untie, ...] = ()
    maps_digest: str = ""

    # -- views -----------------------------------------------------------------
    @property
    def affine_sites(self) -> tuple[str, ...]:
        return tuple(p.site for p in self.sites if p.affine is not None)

    @property
    def affine_specs(self) -> tuple[AffineSpec, ...]:
        return tuple(p.affine for p in self.sites if p.affine is not None)

    @property
    def fully_folded(self) -> bool:
        return not self.affine_sites

    def site(self, name: str) -> SitePlan:
        for p in self.sites:
            if p.site == name:
                return p
        raise KeyError(name)

    def summary(self) -> str:
        n = len(self.sites)
        scales = sum(p.scale == "folded" for p in self.sites)
        parts = [f"{scales} scale{'s' if scales != 1 else ''} folded"]
        own = sum(p.shift == "folded" for p in self.sites)
        if own:
            parts.append(f"{own} shift{'s' if own != 1 else ''} folded into own bias")
        by_dest = Counter(_short_targets(p.shift_targets) for p in self.sites if p.shift == "consumers")
        for i, (dest, k) in enumerate(sorted(by_dest.items())):
            head = f"{k} shift{'s' if k != 1 else ''} folded" if (i == 0 and not own) else f"{k}"
            parts.append(f"{head} into {dest} biases")
        n_aff = len(self.affine_sites)
        shift_only = sum(1 for p in self.sites if p.affine is not None and not p.affine.scale)
        aff = f"{n_aff} affine module{'s' if n_aff != 1 else ''}"
        if shift_only:
            aff += f" ({shift_only} shift-only)"
        parts.append(aff)
        ident = sum(p.scale == "identity" and p.shift == "zero" for p in self.sites)
        if ident:
            parts.append(f"{ident} identity")
        extra = []
        if self.config_changes:
            extra.append("config: " + ", ".join(f"{c.key}={c.new!r}" for c in self.config_changes))
        if self.untied:
            extra.append("untied: " + ", ".join(u.parameter for u in self.untied))
        return f"{n} site{'s' if n != 1 else ''}: " + ", ".join(parts) + ("; " + "; ".join(extra) if extra else "")

    def to_table(self) -> str:
        rows = [("site", "kind", "scale", "shift", "notes")]
        for p in self.sites:
            if p.shift == "consumers":
                shift = "-> " + _short_targets(p.shift_targets) + " bias"
            elif p.shift == "folded":
                shift = "-> own bias"
            else:
                shift = p.shift
            if p.affine is not None:
                mod = "affine module" if p.affine.scale else "shift-only affine module"
                notes = f"{mod}: {p.reason}"
            else:
                notes = p.source
            rows.append((p.site, p.kind, p.scale, shift, notes))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
        for c in self.config_changes:
            lines.append(f"config: {c.key}: {c.old!r} -> {c.new!r} ({c.reason}; zero bias added to "
                         f"{len(c.adds_bias_to)} module{'s' if len(c.adds_bias_to) != 1 else ''})")
        for u in self.untied:
            lines.append(f"untie: {u.parameter} gets its own copy (was tied to {', '.join(u.tied_to)})")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able description (provenance, model card)."""
        return {
            "plan_version": PLAN_VERSION,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "registry": self.registry,
            "maps_digest": self.maps_digest,
            "summary": self.summary(),
            "sites": [_jsonable(asdict(p)) for p in self.sites],
            "config_changes": [_jsonable(asdict(c)) for c in self.config_changes],
            "untied": [_jsonable(asdict(u)) for u in self.untied],
            "affine_sites": list(self.affine_sites),
        }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _short_targets(targets: tuple[str, ...]) -> str:
    """``model.layers.0.self_attn.q_proj, ...k_proj`` -> ``q/k``."""
    names = []
    for t in targets:
        short = t.rsplit(".", 1)[-1]
        if short not in names:
            names.append(short)
    if len(names) > 1 and all(n.endswith("_proj") for n in names):
        names = [n[: -len("_proj")] for n in names]   # q_proj/k_proj/v_proj -> q/k/v
    return "/".join(names)


def maps_digest(maps: Mapping[str, SiteMap]) -> str:
    h = hashlib.sha256()
    for site in sorted(maps):
        m = maps[site]
        h.update(site.encode() + b"\0")
        h.update(m.scale.numpy().tobytes())
        h.update(m.shift.numpy().tobytes())
    return h.hexdigest()


# -- planning -----------------------------------------------------------------
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing: no Conv1D to recognise
        return ()


def producer_layout(module: nn.Module) -> str | None:
    """Layout of a module whose output rows fold exactly, by type only (None: not a producer)."""
    if isinstance(module, nn.Linear):
        return "linear"
    conv1d = _conv1d_type()
    if conv1d and isinstance(module, conv1d):
        return "conv1d"
    if type(module) is nn.Conv2d:
        return "conv"
    if type(module) is nn.Embedding:
        return "embedding"
    return None


def _norm_by_type(module: nn.Module) -> str | None:
    if type(module) is nn.LayerNorm:
        return "layernorm"
    if type(module) is nn.GroupNorm:
        return "groupnorm"
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and type(module) is rms:
        return "rmsnorm"
    return None


def _tied_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
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


def _normalise_maps(effective_maps) -> dict[str, SiteMap]:
    if isinstance(effective_maps, SteeringMaps):  # a maps object at strength 1 is its own effective map
        effective_maps = effective_maps.maps
    out = {}
    for site, m in dict(effective_maps).items():
        if isinstance(m, SiteMap):
            pass
        elif isinstance(m, (tuple, list)) and len(m) == 2:
            try:
                m = SiteMap(torch.as_tensor(m[0]), torch.as_tensor(m[1]))
            except ValueError as e:
                raise FoldError(f"site {site!r}: {e}") from None
        else:
            raise FoldError(f"site {site!r}: expected a SiteMap or (scale, shift), got {type(m).__name__}")
        for name in ("scale", "shift"):
            bad = ~torch.isfinite(getattr(m, name))
            if bad.any():
                raise FoldError(f"site {site!r}: {name} has {int(bad.sum())} non-finite value(s) "
                                f"(first at index {int(bad.nonzero()[0])})")
        out[site] = m
    if not out:
        raise FoldError("no sites to bake: the effective maps are empty")
    return out


class _Planner:
    def __init__(self, model: nn.Module, untie: bool):
        self.model = model
        self.config = getattr(model, "config", None)
        self.entry: ArchEntry | None = entry_for(self.config) if self.config is not None else None
        self.modules = dict(model.named_modules())
        self.tied = _tied_groups(model)
        self.allow_untie = untie
        self.flags: dict[str, list[str]] = {}     # flag -> sites needing it
        self.untie: dict[str, tuple[str, ...]] = {}

    # ---- helpers
    def _flag_available(self, flag: str | None) -> bool:
        return flag is not None and self.config is not None and hasattr(self.config, flag)

    def _bias_route(self, name: str, module: nn.Module) -> tuple[bool, str | None, str]:
        """Can ``module`` hold a bias? -> (ok, flag to switch on or None, reason if not)."""
        if getattr(module, "bias", None) is not None:
            return True, None, ""
        flag = self.entry.flag_for(name) if self.entry else None
        if self._flag_available(flag):
            return True, flag, ""
        if flag is not None:
            return False, None, f"{name} has no bias and the config lacks the {flag!r} flag"
        return False, None, f"{name} has no bias and no config flag adds one"

    def _tie_block(self, param: str) -> str | None:
        """None if ``param`` may be written (untying it if planned), else the reason."""
        others = self.tied.get(param)
        if not others:
            return None
        if self.allow_untie and self._untie_by_config(param, others):
            self.untie[param] = others
            return None
        why = f"{param} is tied to {', '.join(others)}"
        if not self.allow_untie:
            return why + " (pass untie=True to give it its own copy)"
        return why + " by something other than config.tie_word_embeddings, so it cannot be untied safely"

    def _untie_by_config(self, param: str, others: tuple[str, ...]) -> bool:
        cfg = self.config
        if cfg is None or not getattr(cfg, "tie_word_embeddings", False):
            return False
        try:
            emb = self.model.get_input_embeddings().weight
            out = self.model.get_output_embeddings().weight
        except Exception:
            return False
        return emb is out and dict(self.model.named_parameters(remove_duplicate=False)).get(param) is emb

    def _affine(self, site: str, dim: int, *, scale: bool, shift: bool) -> AffineSpec:
        return AffineSpec(site, dim, feature_axis(self.modules[site]), scale, shift)

    # ---- per site
    def plan_site(self, site: str, m: SiteMap) -> SitePlan:
        module = self.modules[site]
        cls = type(module).__name__
        s_id, t_zero = is_identity_scale(m.scale), is_zero_shift(m.shift)
        if s_id and t_zero:
            return SitePlan(site, cls, "module", "module type", "identity", "zero")
        if self.entry is not None:
            hit = self.entry.match_norm(site)
            if hit is not None:
                norm, layer = hit
                if norm.module_class is None or norm.module_class == cls:
                    consumers = tuple(expand(c, layer) for c in norm.consumers)
                    return self._plan_norm(site, module, m, norm.kind, consumers, norm,
                                           f"registry:{self.entry.model_type}")
        kind = _norm_by_type(module)
        if kind is not None:
            return self._plan_norm(site, module, m, kind, None, None, "module type")
        layout = producer_layout(module)
        if layout is not None:
            src = (f"registry:{self.entry.model_type}" if self.entry and self.entry.match_producer(site)
                   else "module type")
            return self._plan_producer(site, module, m, layout, src)
        return SitePlan(site, cls, "module", "module type", "identity" if s_id else "affine",
                        "zero" if t_zero else "affine",
                        affine=self._affine(site, m.dim, scale=not s_id, shift=not t_zero),
                        reason=f"no exact fold is known for a {cls} output")

    def _plan_norm(self, site, module, m: SiteMap, kind: str, consumers, norm: NormEntry | None, source: str):
        cls = type(module).__name__
        s_id, t_zero = is_identity_scale(m.scale), is_zero_shift(m.shift)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor) or (kind.startswith("rmsnorm") and bias is not None):
            why = "norm has no weight" if not isinstance(weight, torch.Tensor) else "RMSNorm with a bias is not a known convention"
            return SitePlan(site, cls, kind, source, "identity" if s_id else "affine", "zero" if t_zero else "affine",
                            affine=self._affine(site, m.dim, scale=not s_id, shift=not t_zero), reason=why)
        block = self._tie_block(f"{site}.weight")
        if block:
            return SitePlan(site, cls, kind, source, "identity" if s_id else "affine", "zero" if t_zero else "affine",
                            affine=self._affine(site, m.dim, scale=not s_id, shift=not t_zero), reason=block)
        steps: list[FoldStep] = []
        if not s_id:
            op = "norm_scale_1p" if kind == "rmsnorm_1p" else "norm_scale"
            steps.append(FoldStep(op, site, "norm", (f"{site}.weight",)))
        scale_state = "identity" if s_id else "folded"
        if bias is not None and (not s_id or not t_zero):
            steps.append(FoldStep("norm_bias", site, "norm", (f"{site}.bias",)))
        if t_zero:
            return SitePlan(site, cls, kind, source, scale_state, "zero", tuple(steps))
        if bias is not None:
            return SitePlan(site, cls, kind, source, scale_state, "folded", tuple(steps))
        # Shift on a bias-free norm: it moves to every consumer's bias, or stays in an affine module.
        reason = self._consumer_block(consumers, norm)
        if reason is None:
            flags = {}
            for c in consumers:
                ok, flag, _ = self._bias_route(c, self.modules[c])
                if flag:
                    flags[flag] = True
                layout = producer_layout(self.modules[c])
                steps.append(FoldStep("input_shift", c, layout, (f"{c}.bias",)))
            for flag in flags:
                self.flags.setdefault(flag, []).append(site)
            return SitePlan(site, cls, kind, source, scale_state, "consumers", tuple(steps),
                            shift_targets=tuple(consumers))
        return SitePlan(site, cls, kind, source, scale_state, "affine", tuple(steps),
                        affine=self._affine(site, m.dim, scale=False, shift=True), reason=reason)

    def _consumer_block(self, consumers, norm: NormEntry | None) -> str | None:
        if consumers is None:
            return "no registry entry names the linears that read this output, so its shift cannot move into their biases"
        if not consumers:
            return (norm.note if norm is not None and norm.note else "no linear consumes this output") + \
                "; the shift has no bias to fold into"
        for c in consumers:
            mod = self.modules.get(c)
            if mod is None:
                return f"registry consumer {c} is not in the model"
            layout = producer_layout(mod)
            if layout not in ("linear", "conv1d"):
                return f"consumer {c} is a {type(mod).__name__}, not a linear layer"
            ok, _, why = self._bias_route(c, mod)
            if not ok:
                return f"consumer {why}"
            block = self._tie_block(f"{c}.bias") if getattr(mod, "bias", None) is not None else None
            if block:
                return f"consumer {block}"
        return None

    def _plan_producer(self, site, module, m: SiteMap, layout: str, source: str):
        cls = type(module).__name__
        s_id, t_zero = is_identity_scale(m.scale), is_zero_shift(m.shift)
        block = self._tie_block(f"{site}.weight")
        if block is None and getattr(module, "bias", None) is not None:
            block = self._tie_block(f"{site}.bias")
        if block:
            return SitePlan(site, cls, layout, source, "identity" if s_id else "affine",
                            "zero" if t_zero else "affine",
                            affine=self._affine(site, m.dim, scale=not s_id, shift=not t_zero), reason=block)
        if t_zero or layout == "embedding":
            shift_state = "zero" if t_zero else "folded"
            return SitePlan(site, cls, layout, source, "identity" if s_id else "folded", shift_state,
                            (FoldStep("rows", site, layout, _row_tensors(site, module, layout)),))
        ok, flag, why = self._bias_route(site, module)
        if ok:
            if flag:
                self.flags.setdefault(flag, []).append(site)
            tensors = (f"{site}.weight", f"{site}.bias")
            return SitePlan(site, cls, layout, source, "identity" if s_id else "folded", "folded",
                            (FoldStep("rows", site, layout, tensors),))
        steps = () if s_id else (FoldStep("rows", site, layout, _row_tensors(site, module, layout)),)
        return SitePlan(site, cls, layout, source, "identity" if s_id else "folded", "affine", steps,
                        affine=self._affine(site, m.dim, scale=False, shift=True), reason=why)

    # ---- config changes
    def config_changes(self) -> tuple[ConfigChange, ...]:
        out = []
        for flag, sites in self.flags.items():
            old = getattr(self.config, flag)
            if old is True:
                continue
            templates = self.entry.bias_flags[flag]
            targets = tuple(name for name, mod in self.modules.items()
                            if any(match_template(t, name) is not False for t in templates)
                            and getattr(mod, "bias", None) is None)
            reason = f"needed by {len(sites)} site{'s' if len(sites) != 1 else ''}"
            out.append(ConfigChange(flag, old, True, reason, targets))
        if self.untie:
            out.append(ConfigChange("tie_word_embeddings", True, False, "untie " + ", ".join(self.untie)))
        return tuple(out)


def _row_tensors(site: str, module: nn.Module, layout: str) -> tuple[str, ...]:
    if layout != "embedding" and getattr(module, "bias", None) is not None:
        return (f"{site}.weight", f"{site}.bias")
    return (f"{site}.weight",)


def plan(model: nn.Module, effective_maps: Mapping[str, SiteMap], *, require_standard: bool = False,
         untie: bool = False) -> FoldPlan:
    """Plan how to bake ``effective_maps`` (site -> effective ``SiteMap``, e.g. from
    :func:`lineas.maps.effective_maps`) into ``model``.  Nothing is modified.

    ``require_standard``: raise :class:`FoldError` naming every site that would need an
    affine module (so the result loads with plain transformers, no remote code).
    ``untie``: allow giving a tied output/input embedding its own copy so it can be folded.
    """
    maps = _normalise_maps(effective_maps)
    try:
        modules = resolve_sites(model, list(maps))
    except SteeringError as e:
        raise FoldError(str(e)) from None
    for site, m in maps.items():
        d = module_feature_dim(modules[site])
        if d is not None and d != m.dim:
            raise FoldError(f"site {site!r}: map has length {m.dim} but {type(modules[site]).__name__} "
                            f"outputs {d} features")
    planner = _Planner(model, untie)
    sites = tuple(planner.plan_site(site, m) for site, m in maps.items())
    config = getattr(model, "config", None)
    result = FoldPlan(
        model_class=type(model).__name__,
        model_type=getattr(config, "model_type", None),
        registry=planner.entry.model_type if planner.entry else None,
        sites=sites,
        config_changes=planner.config_changes(),
        untied=tuple(Untie(p, o) for p, o in planner.untie.items()),
        maps_digest=maps_digest(maps),
    )
    if require_standard and result.affine_sites:
        lines = [f"  {p.site}: {p.reason}" for p in result.sites if p.affine is not None]
        raise FoldError(f"{len(lines)} site(s) cannot be folded into standard weights "
                        f"(require_standard=True):\n" + "\n".join(lines))
    return result
