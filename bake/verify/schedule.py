"""The hooked reference in as few forward passes as its greedy decoding needs.

A model whose weights are read from disk as it runs (:func:`bake.store.checkpoint.load_bounded`) pays that
read on every pass (seconds for a 2B model), so passes, not positions, are what a reference costs.
Greedy decoding is ``n_tokens`` passes one after the other (each step needs the previous argmax); all
the other work of a reference is independent: the hooked logits of every probe, and the logits of
every probe under each noise-floor perturbation of the maps (:mod:`bake.verify.noise_floor`).  Those *units*
ride along in the greedy passes (:func:`bake.verify.passes.pack_passes`), each row group of a pass steered
by its own maps (:func:`lineas.hooks.attach_row_affines`: per row, bit for bit the arithmetic of those
maps hooked alone), and a pass is added only when the logits budget leaves no room.

A perturbed unit is reduced to its probe's statistics as soon as that probe's hooked logits exist, so
at most a pass's worth of perturbed logits is held at a time.  So is a *base* unit (the probe with identity
maps, i.e. the unsteered model), which the guard (:mod:`bake.verify.guard`) compares the hooked logits with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from bake.verify.guard import degeneracy
from bake.verify.noise_floor import rounding_perturbed
from bake.verify.passes import (
    RowSlice,
    last_position,
    pack_passes,
    position_cap,
    row_slice,
    run_batches,
    torch_runner,
)
from bake.verify.probes import Probe
from bake.verify.report import ProbeStats
from bake.verify.stats import LogitStats, pool_probe_stats, probe_stats
from lineas.hooks import attach_row_affines

Affines = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
HOOKED = 0  # variant of the hooked maps; variant 1 + s is noise-floor perturbation s, then the base (if any)


@dataclass(frozen=True)
class Unit:
    """One probe's batch under one variant of the maps."""

    variant: int
    probe: int


@dataclass(frozen=True)
class ReferenceSchedule:
    """Which units each forward pass carries; pass ``k < n_tokens`` also carries greedy step ``k``."""

    units: list[Unit]
    passes: list[list[int]]  # per pass, indices into ``units``
    n_tokens: int
    samples: int  # noise-floor perturbations
    base: bool = False  # also each probe unsteered (variant 1 + samples)

    @classmethod
    def build(cls, probes: Sequence[Probe], prompts: torch.Tensor, n_tokens: int, *, samples: int,
              vocab: int, base: bool = False) -> ReferenceSchedule:
        """``samples`` noise-floor perturbations; ``vocab`` sets the positions a pass may carry; ``base``: the
        unsteered probes too."""
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
        # Hooked units first: unit p is probe p's hooked batch, which its perturbed (and base) units wait for.
        units = [Unit(variant=v, probe=p) for v in range(1 + samples + base) for p in range(len(probes))]
        shapes = [tuple(probes[u.probe].input_ids.shape) for u in units]
        steps = [(prompts.shape[0], prompts.shape[1] + k) for k in range(n_tokens)]
        passes = pack_passes(shapes, position_cap(vocab), fixed=steps,
                             not_before=[None if u.variant == HOOKED else u.probe for u in units])
        return cls(units=units, passes=passes, n_tokens=n_tokens, samples=samples, base=base)

    def padded_positions(self, probes: Sequence[Probe], prompts: torch.Tensor) -> int:
        """Sum over passes of rows x width: the positions the model computes, padding included."""
        total = 0
        for k, members in enumerate(self.passes):
            shapes = [tuple(probes[self.units[i].probe].input_ids.shape) for i in members]
            if k < self.n_tokens:
                shapes.append((prompts.shape[0], prompts.shape[1] + k))
            total += sum(r for r, _ in shapes) * max(w for _, w in shapes)
        return total


@dataclass(frozen=True)
class BaseProbe:
    """One probe of the unsteered model, reduced as soon as its hooked logits exist."""

    stats: ProbeStats  # base vs hooked (max_rel: how far the maps move the logits)
    degeneracy: str | None  # what is wrong with the base logits themselves (bake.verify.guard.degeneracy)


@dataclass
class ScheduledReference:
    logits: list[torch.Tensor]  # hooked, per probe, [B, L, V] fp32 cpu
    greedy: list[list[int]]
    activations: dict[str, torch.Tensor]  # the diagnostic probe's hooked module outputs
    floor_samples: list[LogitStats]  # per perturbation, against the hooked logits
    base: list[BaseProbe] | None = None  # per probe, the unsteered model against the hooked one (None: not run)


def run_schedule(model: nn.Module, schedule: ReferenceSchedule, affines: Affines, probes: Sequence[Probe],
                 prompts: torch.Tensor, *, diag: int, watch: Sequence[str] = (),
                 record: Callable[[RowSlice], AbstractContextManager[dict]] | None = None,
                 on_pass: Callable[[], None] = lambda: None) -> ScheduledReference:
    """Run ``schedule``: the greedy continuation of ``prompts`` and the logits of every unit, each row
    group under its own maps.  ``record``: a context manager factory (:func:`bake.verify.check.record_outputs`)
    given the rows of probe ``diag``'s hooked batch in the pass that carries it; ``watch``: the modules
    it records and the steered sites (their outputs keep the pass's rows: :class:`bake.verify.passes.TorchRunner`).
    Only the logits compared are computed: every real position of a probe, the last of a greedy step."""
    variants = [affines] + [rounding_perturbed(affines, seed=s) for s in range(schedule.samples)]
    if schedule.base:  # identity maps on the same sites: every row group of a pass maps the same sites
        variants.append({site: (torch.ones_like(s), torch.zeros_like(t)) for site, (s, t) in affines.items()})
    base: list[BaseProbe | None] = [None] * len(probes)
    run = torch_runner(model, keep_layout=watch)
    ids = prompts.to(torch.int64)
    logits: list[torch.Tensor | None] = [None] * len(probes)
    pending: list[tuple[Unit, torch.Tensor]] = []  # perturbed logits whose hooked probe has not run yet
    stats: list[list] = [[None] * len(probes) for _ in range(schedule.samples)]  # per sample, per probe
    acts: dict[str, torch.Tensor] = {}
    diag_unit = Unit(variant=HOOKED, probe=diag)
    for k, members in enumerate(schedule.passes):
        units = [schedule.units[i] for i in members]
        batches = [(probes[u.probe].input_ids, probes[u.probe].attention_mask) for u in units]
        groups = [(probes[u.probe].input_ids.shape[0], variants[u.variant]) for u in units]
        keeps = [None] * len(units)  # every real position of a probe
        step = k < schedule.n_tokens
        if step:
            batches.insert(0, (ids, torch.ones_like(ids)))
            groups.insert(0, (ids.shape[0], affines))
            keeps.insert(0, last_position(ids))
        with ExitStack() as stack:
            stack.enter_context(attach_row_affines(model, groups))
            if record is not None and diag_unit in units:  # after the steering hooks: records steered outputs
                acts = stack.enter_context(record(row_slice(batches, units.index(diag_unit) + step)))
            outs = run_batches(run, batches, keeps)
        if step:
            ids = torch.cat([ids, outs.pop(0)[:, -1].argmax(-1, keepdim=True)], dim=1)
        for u, out in zip(units, outs):
            if u.variant == HOOKED:
                logits[u.probe] = out.clone()  # a compact copy: the pass's other rows can be freed
            else:
                pending.append((u, out))
        waiting = []
        for u, out in pending:
            if logits[u.probe] is None:
                waiting.append((u, out))
            else:
                p = probes[u.probe]
                if u.variant == 1 + schedule.samples:  # the base
                    base[u.probe] = BaseProbe(probe_stats(p.name, logits[u.probe], out, p.attention_mask)[0],
                                              degeneracy(out[p.attention_mask.bool()]))
                else:
                    stats[u.variant - 1][u.probe] = probe_stats(p.name, logits[u.probe], out, p.attention_mask)
        pending = waiting
        on_pass()
    return ScheduledReference(logits=logits, greedy=ids[:, prompts.shape[1]:].tolist(), activations=acts,
                              floor_samples=[pool_probe_stats(s) for s in stats],
                              base=base if schedule.base else None)
