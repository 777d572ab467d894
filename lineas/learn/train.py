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
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from bake.plan.foldable import METADATA_KEY, FoldableSites, SiteParts, check_standard, plan_foldable
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
from lineas.maps import SiteMap, SteeringMaps
from lineas.prompts import split_texts, texts_sha256
from lineas.provenance import model_provenance

log = logging.getLogger(__name__)

__all__ = ["ConfigError", "Foldable", "Init", "Method", "Optimizer", "Schedule", "TrainConfig", "SiteReport",
           "TrainResult", "learn_maps", "train_lineas"]


@dataclass(frozen=True)
class SiteReport:
    """Per-site W2^2 (mean over neurons) between pooled source and target, before/after steering."""

    site: str
    w2_before: float
    w2_after: float
    w2_before_holdout: float | None = None
    w2_after_holdout: float | None = None


@dataclass(frozen=True)
class TrainResult:
    maps: SteeringMaps
    report: tuple[SiteReport, ...]
    support: float
    config: TrainConfig
    losses: tuple[float, ...] = ()  # LinEAS: loss per step
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)  # collect_s, fit_s, steps_per_s (LinEAS)
    fell_back_to_linear_act: bool = False  # init=linear-act and LinEAS ended worse: the Linear-AcT maps
    foldable: FoldableSites | None = None  # what was frozen so that the maps bake into standard weights

    @property
    def w2_before(self) -> float:
        return sum(r.w2_before for r in self.report) / len(self.report)

    @property
    def w2_after(self) -> float:
        return sum(r.w2_after for r in self.report) / len(self.report)

    def table(self) -> str:
        """Human summary: per-site W2 before/after (train, and held-out when present), support."""
        held = self.report[0].w2_before_holdout is not None
        name_w = max(12, *(len(r.site) for r in self.report))
        head = f"{'site':<{name_w}}  {'W2 before':>10}  {'W2 after':>10}  {'change':>7}"
        if held:
            head += f"  {'held before':>11}  {'held after':>10}  {'change':>7}"
        lines = [head, "-" * len(head)]

        def pct(a, b):
            return f"{100 * (b - a) / a:+6.1f}%" if a > 0 else "   n/a"

        rows = list(self.report)
        if len(rows) > 1:
            mean = lambda k: sum(getattr(r, k) for r in rows) / len(rows)
            rows.append(SiteReport("(mean)", mean("w2_before"), mean("w2_after"),
                                   mean("w2_before_holdout") if held else None,
                                   mean("w2_after_holdout") if held else None))
        for r in rows:
            line = f"{r.site:<{name_w}}  {r.w2_before:>10.4g}  {r.w2_after:>10.4g}  {pct(r.w2_before, r.w2_after)}"
            if held:
                line += (f"  {r.w2_before_holdout:>11.4g}  {r.w2_after_holdout:>10.4g}  "
                         f"{pct(r.w2_before_holdout, r.w2_after_holdout)}")
            lines.append(line)
        lines.append(f"support: {self.support:.3f} of coordinates differ from identity (|scale-1| or |shift| > 1e-5)")
        return "\n".join(lines)


def _bar(progress: bool, **kw):
    from tqdm.auto import tqdm

    return tqdm(disable=not progress, file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def learn_maps(model: nn.Module, tokenizer, source_texts: Sequence, target_texts: Sequence, sites: Sequence[str],
               config: TrainConfig | None = None, *, progress: bool = True,
               eval_batch_size: int | None = None, base_model: str | None = None,
               source_desc: str | None = None, target_desc: str | None = None,
               source_sha256: str | None = None, target_sha256: str | None = None,
               metadata: dict[str, str] | None = None, target_model: nn.Module | None = None,
               encode: Callable[[Sequence], TokenSet] | None = None, **hyperparameters) -> TrainResult:
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

    ``foldable`` (default ``auto``, see :mod:`bake.plan.foldable`): before training, the bake planner
    says which parts of each site's map fold into standard weights; only those are trained (the
    rest stays exactly at ``scale = 1`` / ``shift = 0``, for Linear-AcT too), sites where nothing
    folds are left out (``ValueError`` if none is left), and the trained maps are planned with
    ``require_standard`` before they are returned.  Metadata ``foldable`` records what was frozen.
    ``runtimes`` (``--require-runtime``): shifts whose fold one of those runtimes cannot serve (a bias flag
    it does not load) are frozen too, and the check above requires them.

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
    t0 = time.perf_counter()
    device = _model_device(model)
    eval_bs = eval_batch_size or max(cfg.batch_size, 16)
    site_names = _resolve(model, sites)

    src_train, src_held = split_texts(source_texts, cfg.holdout, cfg.seed)
    tgt_train, tgt_held = split_texts(target_texts, cfg.holdout, cfg.seed + 1)
    encode = encode or (lambda texts: tokenize(tokenizer, texts, cfg.max_length))
    src_tok, tgt_tok = encode(src_train), encode(tgt_train)
    held = (encode(src_held), encode(tgt_held)) if cfg.holdout > 0 else None

    def collect(m, tokens, affines=None, bar=None):
        return collect_pooled(m, tokens, site_names, batch_size=eval_bs, affines=affines, device=device, progress=bar)

    def mean_w2(pooled, target):
        return sum(w2(pooled[s], target[s]) for s in site_names) / len(site_names)

    was_training = model.training
    model.eval()
    fallback = None
    try:
        probe_batch = src_tok.batch(range(min(2, len(src_tok))), device)
        site_names = forward_order(model, probe_batch, site_names)
        fold = _plan_foldable(model, probe_batch, site_names, cfg.foldable, cfg.runtimes)
        site_names = fold.trained
        parts = fold.parts()
        n_collect = len(src_tok) + len(tgt_tok) + (len(held[0]) + len(held[1]) if held else 0)
        with _bar(progress, total=n_collect, desc="collecting activations", unit="prompt") as bar:
            tgt_model = model if target_model is None else target_model
            tgt = collect(tgt_model, tgt_tok, bar=bar)
            src_before = collect(model, src_tok, bar=bar)
            if held:
                held_tgt = collect(tgt_model, held[1], bar=bar)
                held_before = collect(model, held[0], bar=bar)
        t_collect = time.perf_counter() - t0
        losses: list[float] = []
        t1 = time.perf_counter()
        start = None
        if cfg.method is Method.LINEAR_ACT or cfg.init is Init.LINEAR_ACT:
            with _bar(progress, total=len(site_names), desc="Linear-AcT (incremental)", unit="site") as bar:
                start = fit_linear_act(model, src_tok, tgt, site_names, batch_size=eval_bs, device=device,
                                       progress=bar, parts=parts)
        if cfg.method is Method.LINEAR_ACT:
            affines = start
        else:
            affines, losses = train_lineas(model, src_tok, tgt, site_names, cfg, device=device, progress=progress,
                                           init=start, parts=parts)
        t_fit = time.perf_counter() - t1

        src_after = collect(model, src_tok, affines)
        if cfg.method is Method.LINEAS and start is not None:
            src_start = collect(model, src_tok, start)
            w2_start, w2_end = mean_w2(src_start, tgt), mean_w2(src_after, tgt)
            if w2_end > w2_start:
                log.warning("LinEAS from Linear-AcT ended at training W2 %.4g > %.4g of its Linear-AcT start; "
                            "returning the Linear-AcT maps", w2_end, w2_start)
                fallback = {"lineas_w2": w2_end, "linear_act_w2": w2_start}
                affines, src_after = start, src_start
        if held:
            held_after = collect(model, held[0], affines)
        reports = []
        for s in site_names:
            r = SiteReport(s, w2(src_before[s], tgt[s]), w2(src_after[s], tgt[s]))
            if held:
                r = SiteReport(s, r.w2_before, r.w2_after, w2(held_before[s], held_tgt[s]),
                               w2(held_after[s], held_tgt[s]))
            reports.append(r)
    finally:
        model.train(was_training)

    site_maps = {s: SiteMap(sc.detach().float().cpu(), sh.detach().float().cpu()) for s, (sc, sh) in affines.items()}
    meta = model_provenance(model, base_model)
    meta.update({
        "method": cfg.method.value,
        "sites": json.dumps(site_names),
        "pooling": "mean",
        "hyperparameters": cfg.to_json(),
        "source": source_desc or f"{len(source_texts)} prompts (in memory)",
        "source_sha256": source_sha256 or texts_sha256(source_texts),
        "target": target_desc or f"{len(target_texts)} prompts (in memory)",
        "target_sha256": target_sha256 or texts_sha256(target_texts),
        "created_by": f"lineas-bake {__version__}",
    })
    if fallback:
        meta["init_fallback"] = json.dumps(fallback)
    meta[METADATA_KEY] = fold.to_metadata()
    maps_obj = SteeringMaps(site_maps, meta)
    support = maps_obj.support()
    meta["support"] = f"{support:.6f}"
    meta["train_report"] = json.dumps([asdict(r) for r in reports])
    meta.update(metadata or {})
    maps_obj = SteeringMaps(site_maps, meta)
    if fold.applied:  # the guarantee, on the maps themselves: what --require-standard will plan
        check_standard(model, maps_obj, fold.runtimes)
    timing = {"collect_s": t_collect, "fit_s": t_fit}
    if losses:
        timing["steps_per_s"] = len(losses) / t_fit
    return TrainResult(maps_obj, tuple(reports), support, cfg, tuple(losses), time.perf_counter() - t0, timing,
                       fell_back_to_linear_act=fallback is not None, foldable=fold)


def _plan_foldable(model: nn.Module, batch, sites: list[str], mode: Foldable, runtimes=()) -> FoldableSites:
    """:func:`bake.plan.foldable.plan_foldable` at the sites' real map lengths (one short forward pass)."""
    with torch.no_grad():
        pooled = run_to_sites(model, batch, sites)
    fold = plan_foldable(model, {s: int(pooled[s].shape[-1]) for s in sites}, mode, runtimes)
    if fold.applied and (fold.partly_frozen or fold.excluded):
        log.info("%s", fold.summary())
    if not fold.trained:
        raise ValueError(f"no part of any site's map folds into standard weights, so --foldable {mode.value} "
                         "leaves nothing to train:\n" + fold.summary()
                         + "\nchoose other --sites, or pass --foldable off (the bake then needs affine modules)")
    return fold


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

    ``parts`` (:func:`bake.plan.foldable.plan_foldable`): per site, which of scale and shift are trained;
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
