"""What :func:`lineas.learn.train.learn_maps` returns: the maps, the per-site W2 report, and how it got there."""

from __future__ import annotations

from dataclasses import dataclass, field

from lineas.learn.config import TrainConfig
from lineas.learn.parts import FoldableSites
from lineas.maps import SteeringMaps

__all__ = ["SiteReport", "TrainResult"]


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
            def mean(k):
                return sum(getattr(r, k) for r in rows) / len(rows)

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
