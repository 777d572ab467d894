"""Check, before anything is planned or baked, that the maps are sound and fit their sites' outputs.

:func:`normalise_maps` turns what the caller gave into finite :class:`SiteMap` values;
:func:`resolve_site_modules` finds each site's module; :func:`maps_digest` binds a plan to them.

A module whose type tells its output size (a norm, a linear, ...) is checked from
that size.  Any other site (a decoder layer, an attention block) shows its output
only when it runs, and the steering hook refuses a wrong length only then: minutes
into a real bake, and never in ``--dry-run``.  So :func:`check_site_outputs` runs
one tiny forward pass (one row of a few token ids, no gradients, stopped once
every such site has run) whose hooks make the steering hook's own check
(:func:`lineas.hooks.apply_affine`) and return nothing, so the model's outputs
and weights are untouched.  ``lineas-bake
--dry-run`` and the real run call the same :func:`bake.plan.planner.plan`, so both refuse
the same maps.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import torch
from torch import nn

from bake.errors import FoldError
from bake.verify.probes import model_vocab_size
from lineas.collect import run_hooked
from lineas.evaluate import input_device
from lineas.hooks import SteeringError, apply_affine, feature_axis, module_feature_dim, resolve_sites
from lineas.maps import SiteMap, SteeringMaps

log = logging.getLogger(__name__)


def maps_digest(maps: Mapping[str, SiteMap]) -> str:
    """sha256 over every site's name, scale and shift: what binds a plan to its maps."""
    h = hashlib.sha256()
    for site in sorted(maps):
        m = maps[site]
        h.update(site.encode() + b"\0")
        h.update(m.scale.numpy().tobytes())
        h.update(m.shift.numpy().tobytes())
    return h.hexdigest()


def normalise_maps(effective_maps) -> dict[str, SiteMap]:
    """Site -> finite :class:`SiteMap` from a maps object, or a mapping of SiteMaps or (scale, shift) pairs."""
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


def site_names(model: nn.Module) -> frozenset[str]:
    """Every module name of ``model`` (the root too): what a maps file's header is checked
    against before its tensors are read (``known_sites`` of :func:`bake.plan.inputs.normalise_maps`)."""
    return frozenset(name for name, _ in model.named_modules())  # the root too: the planner says why it cannot be


def resolve_site_modules(model: nn.Module, sites: Iterable[str]) -> dict[str, nn.Module]:
    """Site name -> module; :class:`FoldError` for an unknown or root site."""
    try:
        return resolve_sites(model, list(sites))
    except SteeringError as e:
        raise FoldError(str(e)) from None


CHECK_TOKENS = 4  # enough for any sequence-shaped output; the pass costs one short forward


class _AllSitesSeen(Exception):
    """Raised by the last checking hook: the rest of the forward pass has nothing to tell."""


def check_site_outputs(model: nn.Module, modules: Mapping[str, nn.Module], maps: Mapping[str, SiteMap], *,
                       runnable: Callable[[], AbstractContextManager[nn.Module]] | None = None) -> None:
    """Raise :class:`FoldError` naming every site whose output does not fit its map (length or type).

    ``runnable``: for a ``model`` on the meta device (a skeleton), opens a runnable copy for the
    check forward pass; it is called only when a site's type does not tell its output size."""
    for site, m in maps.items():
        d = module_feature_dim(modules[site])
        if d is not None and d != m.dim:
            raise FoldError(f"site {site!r}: map has length {m.dim} but {type(modules[site]).__name__} "
                            f"outputs {d} features")
    unknown = [site for site in maps if module_feature_dim(modules[site]) is None]
    if unknown:
        checks = {site: (modules[site], maps[site]) for site in unknown}
        if runnable is not None and _on_meta(model):
            with runnable() as real:
                _check_by_forward(real, checks)
                del real  # freed on leaving the block
        else:
            _check_by_forward(model, checks)


def _on_meta(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def _check_batch(model: nn.Module) -> tuple[dict | None, str]:
    """(a few token ids on the model's device, "") or (None, why no forward pass can run)."""
    try:
        vocab = model_vocab_size(model)
    except (AttributeError, NotImplementedError, TypeError):
        return None, "it reads no token ids"
    device = input_device(model)
    if device.type == "meta":  # weights not loaded: nothing can run, and nothing can be baked either
        return None, "its weights are on the meta device"
    ids = ((torch.arange(CHECK_TOKENS) + 3) % vocab).unsqueeze(0).to(device)  # skip ids 0-2 (special tokens)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ""


def _output_problem(site: str, module: nn.Module, m: SiteMap, output) -> str | None:
    head = output[0] if isinstance(output, (tuple, list)) and len(output) else output
    if not isinstance(head, torch.Tensor):
        return (f"site {site!r}: the {type(module).__name__} there outputs a {type(head).__name__}, "
                f"not a tensor (nor a tuple starting with one), so no map can act on it; steer a submodule")
    try:
        apply_affine(head, m.scale, m.shift, site, feature_axis(module))
    except SteeringError as e:
        return str(e)
    return None


def _check_by_forward(model: nn.Module, sites: Mapping[str, tuple[nn.Module, SiteMap]]) -> None:
    batch, why_not = _check_batch(model)
    names = ", ".join(sites)
    if batch is None:
        log.warning("cannot run a check forward pass through %s (%s): the output size of %s is checked only "
                    "when the steering hooks run", type(model).__name__, why_not, names)
        return
    problems: dict[str, str] = {}
    seen: set[str] = set()

    def hook_for(site: str):
        module, m = sites[site]

        def hook(_module, _inputs, output):
            if site not in seen:
                seen.add(site)
                problem = _output_problem(site, module, m, output)
                if problem is not None:
                    problems[site] = problem
                if len(seen) == len(sites):
                    raise _AllSitesSeen
            return None  # never replace the output

        return hook

    with torch.no_grad():
        try:
            run_hooked(model, batch, {site: hook_for(site) for site in sites})  # removes its hooks on any exit
        except _AllSitesSeen:
            pass
        except Exception as e:  # any failure of the model itself: say what we were doing, not a traceback
            raise FoldError(f"the check forward pass through {type(model).__name__} (to measure the output of "
                            f"{names}) failed: {type(e).__name__}: {e}") from e
    if problems:
        raise FoldError("\n".join(problems[s] for s in sites if s in problems))
