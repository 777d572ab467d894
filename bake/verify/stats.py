"""Logit metrics of a candidate against the reference, per probe and pooled over probes
(definitions: :data:`bake.verify.report.METRIC_DEFINITIONS`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bake.verify.probes import Probe
from bake.verify.report import ProbeStats

STATS_CHUNK = 16  # positions per float64 block in probe_stats: a 256k vocabulary stays ~33 MB per temporary


def probe_stats(name: str, ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor):
    """Per-probe metrics over valid positions; also returns (kl_sum, agree, n) for pooling.
    Computed in float64, a few positions at a time (the logits of a large vocabulary are big)."""
    if cand.shape != ref.shape:
        nan = float("nan")
        return ProbeStats(name, nan, nan, nan, 0.0, 0), (nan, 0, int(mask.sum()))
    valid = mask.bool()
    r_all, c_all = ref[valid], cand[valid]  # [N, V]
    n = r_all.shape[0]
    max_abs, denom, kl_sum, agree = 0.0, 0.0, 0.0, 0
    for i in range(0, n, STATS_CHUNK):
        r = r_all[i:i + STATS_CHUNK].double()
        c = c_all[i:i + STATS_CHUNK].double()
        max_abs = max(max_abs, float((c - r).abs().max()))
        denom = max(denom, float(r.abs().max()))
        lp_r = torch.log_softmax(r, -1)
        lp_c = torch.log_softmax(c, -1)
        kl_sum += float((lp_r.exp() * (lp_r - lp_c)).sum())
        agree += int((r.argmax(-1) == c.argmax(-1)).sum())
    if not torch.isfinite(c_all).all():
        max_abs = float("inf")
    if n == 0:
        denom = 1.0
    max_rel = max_abs / denom if denom > 0 else max_abs
    stats = ProbeStats(name, max_abs, max_rel, kl_sum / n if n else 0.0, agree / n if n else 1.0, n)
    return stats, (kl_sum, agree, n)


@dataclass(frozen=True)
class LogitStats:
    """The logit metrics of a candidate over all probes (pooled as :data:`METRIC_DEFINITIONS` says)."""

    per_probe: list[ProbeStats]
    max_abs: float
    max_rel: float
    mean_kl: float
    top1: float


def logit_stats(probes: Sequence[Probe], ref_logits: Sequence[torch.Tensor],
                cand_logits: Sequence[torch.Tensor]) -> LogitStats:
    return pool_probe_stats([probe_stats(probe.name, ref, cand, probe.attention_mask)
                             for probe, ref, cand in zip(probes, ref_logits, cand_logits)])


def pool_probe_stats(results: Sequence[tuple[ProbeStats, tuple[float, int, int]]]) -> LogitStats:
    """:class:`LogitStats` from the :func:`probe_stats` of each probe (in probe order)."""
    per_probe, kl_sum, agree, total = [], 0.0, 0, 0
    for stats, (k, a, n) in results:
        per_probe.append(stats)
        kl_sum, agree, total = kl_sum + k, agree + a, total + n
    max_abs = max(p.max_abs for p in per_probe) if all(math.isfinite(p.max_abs) for p in per_probe) else float("inf")
    max_rel = max(p.max_rel for p in per_probe) if math.isfinite(max_abs) else float("inf")
    return LogitStats(per_probe=per_probe, max_abs=max_abs, max_rel=max_rel,
                      mean_kl=kl_sum / total if total else 0.0, top1=agree / total if total else 1.0)
