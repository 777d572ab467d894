"""Learning steering maps: LinEAS (default) and Linear-AcT, behind one entry point.

LinEAS (Rodriguez et al., NeurIPS 2025): per-site maps ``y -> scale*y + shift``
are trained *jointly* from identity.  The loss is the mean over sites of the
per-neuron squared 2-Wasserstein distance between pooled steered-source
activations and pooled target activations.  Targets are computed once without
gradients and kept sorted; each step runs one source batch with all maps active
and stops the forward after the last site.  The model is frozen, so autograd
only builds graph through activations towards the map parameters -- no weight
gradients are ever formed.  An optional sparse-group-lasso proximal step after
every optimiser step drives whole sites (and single neurons) back to identity.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from lineas import __version__
from lineas.collect import (
    TokenSet,
    collect_pooled,
    forward_order,
    match_sites,
    run_to_sites,
    tokenize,
)
from lineas.learn.config import ConfigError, Foldable, Init, Method, Optimizer, Schedule, TrainConfig
from lineas.learn.linear_act import fit_linear_act
from lineas.learn.ot import sparse_group_prox, w2, w2_to_sorted_target
from lineas.learn.parts import METADATA_KEY, FoldableSites, FoldPlanner, SiteParts
from lineas.learn.result import SiteReport, TrainResult
from lineas.maps import SiteMap, SteeringMaps
from lineas.prompts import split_texts, texts_sha256
from lineas.provenance import model_provenance

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "Foldable", "FoldPlanner", "Init", "Method", "Optimizer", "Schedule", "TrainConfig",
           "SiteReport", "TrainResult", "learn_maps", "train_lineas"]


def _bar(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


NO_PLANNER = ("no fold planner given (learn_maps(planner=...)); lineas-train passes bake's, "
              "bake.plan.foldable.FOLD_PLANNER")


def learn_maps(model: nn.Module, tokenizer, source_texts: Sequence, target_texts: Sequence, sites: Sequence[str],
               config: TrainConfig | None = None, *, progress: bool = True,
               eval_batch_size: int | None = None, base_model: str | None = None,
               source_desc: str | None = None, target_desc: str | None = None,
               source_sha256: str | None = None, target_sha256: str | None = None,
               metadata: dict[str, str] | None = None, target_model: nn.Module | None = None,
               encode: Callable[[Sequence], TokenSet] | None = None, planner: FoldPlanner | None = None,
               **hyperparameters) -> TrainResult:
    """Learn per-site affine maps that move source activations towards target activations.

    Hyperparameters: ``config`` (default ``TrainConfig()``, where the defaults live) with any
    ``TrainConfig`` field given as a keyword on top (``steps=100, lr=3e-3``).

    ``sites``: exact module names or full-match regexes (see :func:`match_sites`);
    the maps are applied in forward-execution order.  Prompts are strings (needs a
    tokenizer) or token-id lists.  The model is not modified (it is frozen during
    training and its ``requires_grad`` flags are restored).  Runs on the model's
    device; the maps come back as float32 on CPU.

    ``init="linear-act"`` starts LinEAS from the closed-form Linear-AcT maps.  Its result is then
    never worse than Linear-AcT on the reported training W2 (the mean over sites of the full-data
    W2, the figure in the report): after training both are measured on the full training set and,
    if LinEAS ended worse, the Linear-AcT maps are returned (metadata ``init_fallback``).  One end
    check costs one collection pass; tracking the best iterate would cost one per step, and
    mini-batch losses cannot show it.

    ``foldable`` (default ``auto``, see :mod:`lineas.learn.parts`) with a fold ``planner``
    (:class:`~lineas.learn.parts.FoldPlanner`; ``lineas-train`` passes bake's,
    :data:`bake.plan.foldable.FOLD_PLANNER`): before training, the planner says which parts of each
    site's map fold into standard weights; only those are trained (the rest stays exactly at
    ``scale = 1`` / ``shift = 0``, for Linear-AcT too), sites where nothing folds are left out
    (``ValueError`` if none is left), and the trained maps are checked with the planner's
    ``check_standard`` before they are returned.  Metadata ``foldable`` records what was frozen.
    ``runtimes`` (``--require-runtime``): shifts whose fold one of those runtimes cannot serve (a bias flag
    it does not load) are frozen too, and the check above requires them.
    Without a planner (``lineas`` never imports the baker): ``foldable="auto"`` is not applied and every
    part is trained (``result.foldable.note`` says no planner was given); ``foldable="on"`` or
    ``runtimes`` raise a :class:`ConfigError` naming ``planner`` before any work; ``"off"`` needs none.

    ``target_model`` (default: ``model``) is the model whose activations on the
    target prompts define the target distribution -- e.g. a copy of the model
    with known maps attached (ground-truth tests) or a fine-tuned sibling with
    the same module names.

    ``encode`` turns a prompt list into the model's input set (default: :func:`tokenize` with
    ``tokenizer`` and ``max_length``).  Any object with ``TokenSet``'s ``__len__``, ``batch`` and
    ``batches`` works: :mod:`lineas.learn.pipeline_collect` passes prompt-and-seed sets that a diffusers
    pipeline denoises.
    """
    cfg = replace(config or TrainConfig(), **hyperparameters)
    _require_planner(cfg, planner)
    t0 = time.perf_counter()
    device = _model_device(model)
    site_names = _resolve(model, sites)
    inputs = _Inputs.encode(source_texts, target_texts, cfg,
                            encode or (lambda texts: tokenize(tokenizer, texts, cfg.max_length)))
    was_training = model.training
    model.eval()
    try:
        probe_batch = inputs.source.batch(range(min(2, len(inputs.source))), device)
        fold = _plan_foldable(model, probe_batch, forward_order(model, probe_batch, site_names), cfg, planner)
        collect = _Collector(model, fold.trained, eval_batch_size or max(cfg.batch_size, 16), device)
        before = _collect_unsteered(collect, inputs, target_model, progress)
        t_collect = time.perf_counter() - t0
        t1 = time.perf_counter()
        affines, losses, start = _fit(collect, inputs.source, before.target, cfg, fold.parts(), progress)
        t_fit = time.perf_counter() - t1
        affines, src_after, fallback = _keep_the_better(collect, inputs.source, before.target, affines,
                                                        start if cfg.method is Method.LINEAS else None)
        reports = _site_reports(collect, inputs, before, src_after, affines)
    finally:
        model.train(was_training)

    described = {
        "source": source_desc or f"{len(source_texts)} prompts (in memory)",
        "source_sha256": source_sha256 or texts_sha256(source_texts),
        "target": target_desc or f"{len(target_texts)} prompts (in memory)",
        "target_sha256": target_sha256 or texts_sha256(target_texts),
    }
    maps_obj = _steering_maps(model, base_model, affines, cfg, described, fold, reports, fallback, metadata)
    if fold.applied:  # the guarantee, on the maps themselves: what --require-standard will plan
        planner.check_standard(model, maps_obj, fold.runtimes)
    timing = {"collect_s": t_collect, "fit_s": t_fit}
    if losses:
        timing["steps_per_s"] = len(losses) / t_fit
    return TrainResult(maps_obj, tuple(reports), maps_obj.support(), cfg, tuple(losses), time.perf_counter() - t0,
                       timing, fell_back_to_linear_act=fallback is not None, foldable=fold)


def _require_planner(cfg: TrainConfig, planner: FoldPlanner | None) -> None:
    """``foldable="on"`` and ``runtimes`` need a fold planner: refused before any work without one."""
    if planner is not None:
        return
    if cfg.foldable is Foldable.ON or cfg.runtimes:
        what = "foldable='on'" if cfg.foldable is Foldable.ON else f"runtimes={list(cfg.runtimes)!r}"
        raise ConfigError("planner", f"is required for {what} (lineas-train passes bake's: "
                                     "planner=bake.plan.foldable.FOLD_PLANNER); or train every part with "
                                     "foldable='off'")


def _plan_foldable(model: nn.Module, batch, sites: list[str], cfg: TrainConfig,
                   planner: FoldPlanner | None) -> FoldableSites:
    """What ``planner`` trains of maps at the sites' real lengths (one short forward pass); with
    ``foldable="off"`` or no planner, every part."""
    if cfg.foldable is Foldable.OFF:
        fold = FoldableSites.not_applied(cfg.foldable, sites, "--foldable off")
    elif planner is None:
        fold = FoldableSites.not_applied(cfg.foldable, sites, NO_PLANNER)
    else:
        with torch.no_grad():
            pooled = run_to_sites(model, batch, sites)
        fold = planner.plan(model, {s: int(pooled[s].shape[-1]) for s in sites}, cfg.foldable, cfg.runtimes)
    if fold.applied and (fold.partly_frozen or fold.excluded):
        log.info("%s", fold.summary())
    if not fold.trained:
        raise ValueError(f"no part of any site's map folds into standard weights, so --foldable {cfg.foldable.value} "
                         "leaves nothing to train:\n" + fold.summary()
                         + "\nchoose other --sites, or pass --foldable off (the bake then needs affine modules)")
    return fold


@dataclass(frozen=True)
class _Inputs:
    """The encoded prompt sets: training source and target, and the held-out pair (with ``holdout``)."""

    source: TokenSet
    target: TokenSet
    held: tuple[TokenSet, TokenSet] | None

    @classmethod
    def encode(cls, source_texts: Sequence, target_texts: Sequence, cfg: TrainConfig, encode) -> _Inputs:
        src_train, src_held = split_texts(source_texts, cfg.holdout, cfg.seed)
        tgt_train, tgt_held = split_texts(target_texts, cfg.holdout, cfg.seed + 1)
        source, target = encode(src_train), encode(tgt_train)
        return cls(source, target, (encode(src_held), encode(tgt_held)) if cfg.holdout > 0 else None)

    def __len__(self) -> int:
        return len(self.source) + len(self.target) + (len(self.held[0]) + len(self.held[1]) if self.held else 0)


@dataclass(frozen=True)
class _Collector:
    """Pooled activations at the trained ``sites`` (in forward order), ``batch_size`` prompts at a time."""

    model: nn.Module
    sites: list[str]
    batch_size: int
    device: torch.device

    def __call__(self, tokens: TokenSet, affines=None, bar=None, model: nn.Module | None = None):
        return collect_pooled(self.model if model is None else model, tokens, self.sites, batch_size=self.batch_size,
                              affines=affines, device=self.device, progress=bar)

    def mean_w2(self, pooled, target) -> float:
        return sum(w2(pooled[s], target[s]) for s in self.sites) / len(self.sites)


@dataclass(frozen=True)
class _Unsteered:
    """Activations without maps: the target prompts (on ``target_model``) and the source prompts."""

    target: dict[str, torch.Tensor]
    source: dict[str, torch.Tensor]
    held_target: dict[str, torch.Tensor] | None = None
    held_source: dict[str, torch.Tensor] | None = None


def _collect_unsteered(collect: _Collector, inputs: _Inputs, target_model: nn.Module | None,
                       progress: bool) -> _Unsteered:
    with _bar(progress, total=len(inputs), desc="collecting activations", unit="prompt") as bar:
        target = collect(inputs.target, bar=bar, model=target_model)
        source = collect(inputs.source, bar=bar)
        if not inputs.held:
            return _Unsteered(target, source)
        held_target = collect(inputs.held[1], bar=bar, model=target_model)
        return _Unsteered(target, source, held_target, collect(inputs.held[0], bar=bar))


def _fit(collect: _Collector, source: TokenSet, target: dict[str, torch.Tensor], cfg: TrainConfig,
         parts: Mapping[str, SiteParts] | None, progress: bool):
    """``(maps, LinEAS losses, Linear-AcT maps or None)`` of ``cfg.method`` (and ``cfg.init``)."""
    start = None
    if cfg.method is Method.LINEAR_ACT or cfg.init is Init.LINEAR_ACT:
        with _bar(progress, total=len(collect.sites), desc="Linear-AcT (incremental)", unit="site") as bar:
            start = fit_linear_act(collect.model, source, target, collect.sites, batch_size=collect.batch_size,
                                   device=collect.device, progress=bar, parts=parts)
    if cfg.method is Method.LINEAR_ACT:
        return start, [], start
    affines, losses = train_lineas(collect.model, source, target, collect.sites, cfg, device=collect.device,
                                   progress=progress, init=start, parts=parts)
    return affines, losses, start


def _keep_the_better(collect: _Collector, source: TokenSet, target: dict[str, torch.Tensor], affines, start):
    """``(maps, steered source activations, init_fallback record or None)``: the LinEAS maps, or its
    Linear-AcT ``start`` when LinEAS ended at a higher training W2 (``start`` None: no such check)."""
    src_after = collect(source, affines)
    if start is None:
        return affines, src_after, None
    src_start = collect(source, start)
    w2_start, w2_end = collect.mean_w2(src_start, target), collect.mean_w2(src_after, target)
    if w2_end <= w2_start:
        return affines, src_after, None
    log.warning("LinEAS from Linear-AcT ended at training W2 %.4g > %.4g of its Linear-AcT start; "
                "returning the Linear-AcT maps", w2_end, w2_start)
    return start, src_start, {"lineas_w2": w2_end, "linear_act_w2": w2_start}


def _site_reports(collect: _Collector, inputs: _Inputs, before: _Unsteered, src_after, affines) -> list[SiteReport]:
    held_after = collect(inputs.held[0], affines) if inputs.held else None
    reports = []
    for s in collect.sites:
        r = SiteReport(s, w2(before.source[s], before.target[s]), w2(src_after[s], before.target[s]))
        if held_after is not None:
            r = replace(r, w2_before_holdout=w2(before.held_source[s], before.held_target[s]),
                        w2_after_holdout=w2(held_after[s], before.held_target[s]))
        reports.append(r)
    return reports


def _steering_maps(model: nn.Module, base_model: str | None, affines, cfg: TrainConfig, described: dict[str, str],
                   fold: FoldableSites, reports: list[SiteReport], fallback: dict | None,
                   metadata: dict[str, str] | None) -> SteeringMaps:
    """The maps (float32, on CPU) with their metadata: provenance, training, what was frozen, the report."""
    site_maps = {s: SiteMap(sc.detach().float().cpu(), sh.detach().float().cpu()) for s, (sc, sh) in affines.items()}
    meta = model_provenance(model, base_model)
    meta.update({"method": cfg.method.value, "sites": json.dumps(fold.trained), "pooling": "mean",
                 "hyperparameters": cfg.to_json(), **described, "created_by": f"lineas-bake {__version__}"})
    if fallback:
        meta["init_fallback"] = json.dumps(fallback)
    meta[METADATA_KEY] = fold.to_metadata()
    meta["support"] = f"{SteeringMaps(site_maps, meta).support():.6f}"
    meta["train_report"] = json.dumps([asdict(r) for r in reports])
    meta.update(metadata or {})
    return SteeringMaps(site_maps, meta)


def _resolve(model: nn.Module, sites: Sequence[str]) -> list[str]:
    """Exact module names are taken as they are; anything else is a full-match regex."""
    if isinstance(sites, str):
        sites = [sites]
    names = {n for n, _ in model.named_modules() if n}
    if sites and all(s in names for s in sites):
        return list(dict.fromkeys(sites))
    return match_sites(model, list(sites))


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- LinEAS -----------------------------------------------------------------------
def train_lineas(model: nn.Module, source: TokenSet, target_pooled: dict[str, torch.Tensor], sites: Sequence[str],
                 cfg: TrainConfig, *, device="cpu", progress: bool = False,
                 init: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 parts: Mapping[str, SiteParts] | None = None,
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Jointly train all maps from identity (or from ``init``, ``{site: (scale, shift)}``);
    returns ``({site: (scale, shift)}, losses)``.

    ``parts`` (a :class:`~lineas.learn.parts.FoldPlanner`'s plan): per site, which of scale and shift are trained;
    a frozen one is a constant tensor at exactly 1 / 0 (``init`` is projected), outside the
    optimiser and the proximal step.

    ``sites`` must be in forward order (the forward stops after the last one).
    """
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order only; the global RNG is left alone
    # Sorted once: each step only sorts the (small) source batch.
    sorted_tgt = {s: target_pooled[s].to(device).sort(dim=0).values for s in sites}
    params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for s in sites:
        d = target_pooled[s].shape[1]
        scale, shift = init[s] if init is not None else (torch.ones(d), torch.zeros(d))
        trained = (True, True) if parts is None else (parts[s].scale, parts[s].shift)
        if parts is not None:
            scale, shift = parts[s].project(scale, shift)
        params[s] = tuple(nn.Parameter(t.detach().to(device=device, dtype=torch.float32).clone()) if on
                          else t.detach().to(device=device, dtype=torch.float32).clone()
                          for t, on in zip((scale, shift), trained))
    flat = [p for pair in params.values() for p in pair if isinstance(p, nn.Parameter)]
    opt = (torch.optim.SGD(flat, lr=cfg.lr) if cfg.optimizer is Optimizer.SGD
           else torch.optim.Adam(flat, lr=cfg.lr, betas=cfg.betas))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps) if cfg.schedule is Schedule.COSINE
             else None)
    prox = cfg.sparsity_l1 > 0 or cfg.sparsity_group > 0
    bs = min(cfg.batch_size, len(source))
    order: list[int] = []
    losses: list[float] = []

    frozen = _freeze(model)
    try:
        with _bar(progress, total=cfg.steps, desc="LinEAS", unit="step") as bar:
            for step in range(cfg.steps):
                if len(order) < bs:  # a fresh seeded permutation per epoch
                    order += torch.randperm(len(source), generator=gen).tolist()
                idx, order = order[:bs], order[bs:]
                pooled = run_to_sites(model, source.batch(idx, device), sites, params)
                loss = torch.stack([w2_to_sorted_target(pooled[s], sorted_tgt[s]) for s in sites]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                step_lr = opt.param_groups[0]["lr"]
                opt.step()
                if prox:
                    with torch.no_grad():
                        for scale, shift in params.values():
                            new_scale, new_shift = sparse_group_prox(scale, shift, step_lr, cfg.sparsity_l1,
                                                                     cfg.sparsity_group)
                            for param, new in ((scale, new_scale), (shift, new_shift)):
                                if isinstance(param, nn.Parameter):  # frozen parts stay exactly at identity
                                    param.copy_(new)
                if sched is not None:
                    sched.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise FloatingPointError(f"LinEAS loss became {value} at step {step}; lower --lr")
                losses.append(value)
                bar.update(1)
                if step % 10 == 0 or step == cfg.steps - 1:
                    bar.set_postfix(loss=f"{value:.4g}")
    finally:
        _unfreeze(frozen)
    return {s: (sc.detach(), sh.detach()) for s, (sc, sh) in params.items()}, losses


def _freeze(model: nn.Module) -> list[nn.Parameter]:
    """Turn off grads on every model weight; returns those that had them on."""
    was = [p for p in model.parameters() if p.requires_grad]
    for p in was:
        p.requires_grad_(False)
    return was


def _unfreeze(params: list[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)
