"""Carry out a :class:`bake.plan.planner.FoldPlan` on a model, in place.

All new tensor values are computed first, in float64 on working copies (see
:mod:`bake.core.fold_math` for why), then cast once to their target dtypes and checked
for finiteness; only when every value is good are config flags flipped, zero
biases created, tied weights untied, tensors written and affine modules inserted.  A failure leaves the model as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from bake.core.fold_math import (
    fold_adaln_rows,
    fold_experts_input_shift,
    fold_input_shift,
    fold_modulated_norm_rows,
    fold_norm_bias,
    fold_norm_scale,
    fold_output_rows,
    work_dtype,
)
from bake.errors import FoldError, NonFiniteCastError
from bake.fold.affine_module import LineasAffine, wrap_affine_sites
from bake.fold.remote_code import AFFINE_SITES_KEY
from bake.plan.check import normalise_maps
from bake.plan.history import BAKED_KEY, check_rebake, earlier_bakes, new_entry, recorded_bakes
from bake.plan.planner import FoldOp, FoldPlan, FoldStep, Layout, maps_digest
from bake.store.stores import ModuleStore, TensorStore
from lineas.embedding_scale import outside_scale, table_scale
from lineas.maps import SiteMap

log = logging.getLogger(__name__)


def _split(name: str) -> tuple[str, str]:
    mod, _, attr = name.rpartition(".")
    return mod, attr


class _Working:
    """float64 working copies of the tensors a plan writes (a site's tensor may be folded by
    several steps, e.g. a q_proj that is a site and a consumer: the steps chain in float64 and
    the result is cast once).  ``model`` gives the structure (it may be a skeleton on the meta
    device), ``store`` the values."""

    def __init__(self, model: nn.Module, plan: FoldPlan, store: TensorStore):
        self.model = model
        self.store = store
        self.work = work_dtype(store.device)
        self.new_bias = {f"{m}.bias" for c in plan.config_changes for m in c.adds_bias_to}
        self.values: dict[str, torch.Tensor] = {}

    def target_dtype(self, name: str) -> torch.dtype:
        if self.store.has(name):
            return self.store.dtype(name)
        return self.store.dtype(_split(name)[0] + ".weight")

    def read(self, name: str) -> torch.Tensor:
        """The current value of a tensor that is only read (not kept: a consumer's weight)."""
        if name in self.values:
            return self.values[name]
        if not self.store.has(name):
            raise FoldError(f"plan refers to {name!r}, which the model does not have "
                            f"(was the plan made for another model?)")
        return self.store.read(name).to(self.work, copy=True)

    def get(self, name: str) -> torch.Tensor:
        """The working value of a tensor the plan writes (a new bias starts at zero)."""
        if name not in self.values:
            if name in self.new_bias and not self.store.has(name):
                mod = self.model.get_submodule(_split(name)[0])
                n_out = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]
                self.values[name] = torch.zeros(n_out, dtype=self.work, device=self.store.device)
            else:
                self.values[name] = self.read(name)
        return self.values[name]


def module_output_maps(model: nn.Module, maps: Mapping[str, SiteMap]) -> dict[str, SiteMap]:
    """The maps as they act on each site module's *output*: ``shift/c`` where the site's activation is ``c``
    times that output (a 4.x Gemma embedding, :func:`lineas.embedding_scale.outside_scale`); the others as given."""
    out = {}
    for site, m in maps.items():
        c = outside_scale(model, model.get_submodule(site))
        out[site] = m if c == 1.0 else SiteMap(m.scale, m.shift / c)
    return out


def _run_step(w: _Working, step: FoldStep, site: str, m: SiteMap) -> None:
    s, t = m.scale, m.shift
    mod, layout = step.module, step.layout.value  # bake.core.fold_math takes layouts as plain strings
    if step.op in (FoldOp.NORM_SCALE, FoldOp.NORM_SCALE_1P):
        name = f"{mod}.weight"
        w.values[name] = fold_norm_scale(w.get(name), s.to(w.get(name).device),
                                         one_plus=step.op is FoldOp.NORM_SCALE_1P)
    elif step.op is FoldOp.NORM_BIAS:
        name = f"{mod}.bias"
        b = w.get(name)
        w.values[name] = fold_norm_bias(b, s.to(b.device), t.to(b.device))
    elif step.op is FoldOp.ROWS:
        wname, bname = f"{mod}.weight", f"{mod}.bias"
        weight = w.get(wname)
        embedding = step.layout is Layout.EMBEDDING
        bias = None if embedding else (w.get(bname) if bname in step.tensors else None)
        shift = t.to(weight.device) if (bias is not None or embedding) else None
        if embedding and shift is not None:  # a scaled embedding multiplies its table: lineas.embedding_scale
            shift = shift / table_scale(w.model.get_submodule(mod))
        if shift is not None and bool(torch.all(shift == 0)):
            shift = None
        new_w, new_b = fold_output_rows(weight, bias, s.to(weight.device), shift, layout=layout)
        w.values[wname] = new_w
        if new_b is not None:
            w.values[bname] = new_b
    elif step.op is FoldOp.INPUT_SHIFT:
        wname, bname = f"{mod}.weight", f"{mod}.bias"
        weight = w.read(wname)
        w.values[bname] = fold_input_shift(weight, w.get(bname), t.to(weight.device), layout=layout)
    elif step.op is FoldOp.TENSOR_INPUT_SHIFT:  # a router's or fused experts' bias: b' = b + W t, W only read
        (bname,), (wname,) = step.tensors, step.reads
        weight = w.read(wname)
        fold = fold_input_shift if step.layout is Layout.LINEAR else fold_experts_input_shift
        w.values[bname] = fold(weight, w.get(bname), t.to(weight.device), layout=layout)
    elif step.op in (FoldOp.ADALN_ROWS, FoldOp.MODULATED_ROWS):
        wname, bname = f"{mod}.weight", f"{mod}.bias"
        weight = w.get(wname)
        fold = fold_adaln_rows if step.op is FoldOp.ADALN_ROWS else fold_modulated_norm_rows
        w.values[wname], w.values[bname] = fold(weight, w.get(bname), s.to(weight.device), t.to(weight.device),
                                                step.chunks)
    else:
        raise FoldError(f"site {site!r}: unknown fold operation {step.op!r}")


def check_applicable(model: nn.Module, plan: FoldPlan, effective_maps: Mapping[str, SiteMap], *,
                     allow_rebake: bool = False, maps_record: Sequence[dict] = ()) -> dict[str, SiteMap]:
    """The maps, after checking that ``plan`` was made for them and for this model, and that they
    are not already baked into it (unless ``allow_rebake``): the config's ``lineas_baked`` record holds
    neither the effective digest nor, with ``maps_record``, a maps file's sha256
    (:func:`bake.plan.history.check_rebake`, the rule of both families)."""
    maps = normalise_maps(effective_maps)
    if maps_digest(maps) != plan.maps_digest:
        raise FoldError("these maps are not the ones the plan was made for (maps digest differs); re-run plan()")
    if not allow_rebake:  # allowed: the caller's own check_rebake already warned
        check_rebake(earlier_bakes(getattr(model, "config", None), ""), maps_record, plan.maps_digest, allow=False)
    if type(model).__name__ != plan.model_class:
        raise FoldError(f"plan was made for a {plan.model_class}, not a {type(model).__name__}")
    modules = dict(model.named_modules())
    for p in plan.sites:
        if p.site not in modules:
            raise FoldError(f"plan site {p.site!r} is not a module of this model")
        if isinstance(modules[p.site], LineasAffine) and p.affine is not None:
            raise FoldError(f"site {p.site!r} already carries an affine module (model baked twice?)")
    return maps


def compute_folded(model: nn.Module, plan: FoldPlan, maps: Mapping[str, SiteMap], store: TensorStore, *,
                   out_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor the plan writes (and every zero bias a config flag adds), folded in float64 from
    ``store``'s values and cast once to ``out_dtype`` (default: each tensor's stored dtype).  Raises
    :class:`FoldError` naming a tensor that the cast makes non-finite.  Reads only the tensors the plan touches."""
    work = _Working(model, plan, store)
    maps = module_output_maps(model, maps)
    for name in sorted(work.new_bias):  # a flag adds biases to every module it governs, folded into or not
        work.get(name)
    for p in plan.sites:
        for step in p.steps:
            _run_step(work, step, p.site, maps[p.site])
    final: dict[str, torch.Tensor] = {}
    bad: dict[str, int] = {}
    for name, v in work.values.items():
        final[name] = v.to(out_dtype or work.target_dtype(name))
        n_bad = int((~torch.isfinite(final[name])).sum())
        if n_bad:
            bad[name] = n_bad
    if bad:
        raise NonFiniteCastError(final[next(iter(bad))].dtype, bad,
                                 " (map values too large for this dtype?); nothing was changed")
    return final


def commit_plan(model: nn.Module, plan: FoldPlan, maps: Mapping[str, SiteMap], final: Mapping[str, torch.Tensor],
                *, maps_record: Sequence[dict] = ()) -> nn.Module:
    """Change ``model`` as the plan says: config flags, new zero biases, untied copies, the folded
    values ``final`` (from :func:`compute_folded`), affine modules, and the ``lineas_baked`` record.

    On a skeleton on the meta device the values are not copied (there is no storage): the
    skeleton then has the structure and config of the baked model, which is what the
    streaming writer (:mod:`bake.formats.shard_writer`) needs."""
    config = getattr(model, "config", None)
    entry = new_entry(config, effective_digest=plan.maps_digest, sites=[p.site for p in plan.sites],
                      shift_in_consumers=[p.site for p in plan.sites if p.shift_targets], maps=maps_record)
    with torch.no_grad():
        for change in plan.config_changes:
            if config is None:
                raise FoldError(f"plan changes config key {change.key!r} but the model has no config")
            log.info("config: %s %r -> %r (%s)", change.key, change.old, change.new, change.reason)
            holder = config  # a bias flag of a vision-language model's text decoder lives in its text config
            if change.key != "tie_word_embeddings" and not hasattr(config, change.key) \
                    and hasattr(config, "get_text_config"):
                holder = config.get_text_config()
            setattr(holder, change.key, change.new)
            if change.key == "tie_word_embeddings" and hasattr(config, "get_text_config"):
                setattr(config.get_text_config(), change.key, change.new)
            for mname in change.adds_bias_to:
                mod = model.get_submodule(mname)
                weight = mod.weight
                n_out = weight.shape[1] if type(mod).__name__ == "Conv1D" else weight.shape[0]
                mod.bias = nn.Parameter(torch.zeros(n_out, dtype=weight.dtype, device=weight.device),
                                        requires_grad=weight.requires_grad)
        for u in plan.untied:
            mname, attr = _split(u.parameter)
            mod = model.get_submodule(mname)
            old = getattr(mod, attr)
            log.info("untie: %s gets its own copy (was tied to %s)", u.parameter, ", ".join(u.tied_to))
            setattr(mod, attr, nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad))
        for name, value in final.items():
            mname, attr = _split(name)
            param = getattr(model.get_submodule(mname), attr)
            if param.device.type != "meta":
                param.copy_(value)
        specs = [p.affine.to_config() for p in plan.sites if p.affine is not None]
        if specs:
            maps = module_output_maps(model, {spec["site"]: maps[spec["site"]] for spec in specs})
            wrapped = wrap_affine_sites(model, specs)
            for spec in specs:
                module, m = wrapped[spec["site"]], maps[spec["site"]]
                for param, value in ((module.lineas_scale, m.scale), (module.lineas_shift, m.shift)):
                    if param is not None and param.device.type != "meta":
                        param.copy_(value)
            if config is not None:
                setattr(config, AFFINE_SITES_KEY, specs)
    if config is not None:  # the record that makes a second bake of the same maps refusable
        setattr(config, BAKED_KEY, recorded_bakes(config) + [entry])
    return model


def apply_plan(model: nn.Module, plan: FoldPlan, effective_maps: Mapping[str, SiteMap], *,
               allow_rebake: bool = False, maps_record: Sequence[dict] = ()) -> nn.Module:
    """Bake ``effective_maps`` into ``model`` (in memory) as ``plan`` says; returns the same model object.

    ``effective_maps`` must be the maps the plan was made for (checked by digest).
    After this call the model computes, without hooks, what the hooked model computed.
    The bake is recorded in ``model.config.lineas_baked`` (with ``maps_record``: what each
    maps input was); the same effective maps are refused a second time unless ``allow_rebake``.
    Everything is computed before anything is changed: a failure leaves the model as it was.
    """
    maps = check_applicable(model, plan, effective_maps, allow_rebake=allow_rebake, maps_record=maps_record)
    final = compute_folded(model, plan, maps, ModuleStore(model))
    return commit_plan(model, plan, maps, final, maps_record=maps_record)
