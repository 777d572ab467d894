"""The verification report: per-check metrics, per-module divergence, and how they print.

Filled by :mod:`bake.verify.check`; metric definitions and limits are in :mod:`bake.verify.tolerances`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol

from bake.verify.noise_floor import NoiseFloor
from bake.verify.tolerances import Tolerance

if TYPE_CHECKING:
    from bake.verify.reference import Reference


class Report(Protocol):
    """A verification report of either family, as :class:`bake.errors.VerificationError` carries it and the
    CLI prints it on failure: :class:`VerificationReport` (causal LMs),
    :class:`bake.families.diffusers.verify.PipelineReport` and
    :class:`bake.families.diffusers.onnx.OnnxPipelineReport`."""

    @property
    def passed(self) -> bool: ...

    def to_table(self) -> str: ...

    def failure_details(self) -> str:
        """What to read after a failure: the check table and where the outputs diverge."""
        ...


@dataclass(frozen=True)
class ProbeStats:
    name: str
    max_abs: float
    max_rel: float
    mean_kl: float
    top1: float
    positions: int


@dataclass(frozen=True)
class SiteDivergence:
    module: str
    is_site: bool
    max_abs: float | None
    max_rel: float | None
    note: str = ""


@dataclass
class CheckResult:
    label: str
    tolerance: Tolerance
    max_abs: float
    max_rel: float
    mean_kl: float
    top1: float
    greedy_matched: int
    greedy_total: int
    per_probe: list[ProbeStats]
    failures: list[str]
    greedy_detail: list[dict] = field(default_factory=list)
    max_rel_limit: float | None = None  # the limit applied: the row's rule with the reference's noise floor
    details: dict = field(default_factory=dict)  # check-specific facts (the image probe: hooked vs base)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def gating(self) -> bool:
        return self.tolerance.gating

    def to_dict(self) -> dict:
        return {
            "label": self.label, "tolerance": self.tolerance.to_dict(), "passed": self.passed,
            "gating": self.gating, "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel),
            "max_rel_limit": self.max_rel_limit, "mean_kl": _num(self.mean_kl), "top1": _num(self.top1),
            "greedy_matched": self.greedy_matched, "greedy_total": self.greedy_total,
            "failures": list(self.failures), "per_probe": [_clean(asdict(p)) for p in self.per_probe],
            "greedy": self.greedy_detail, **({"details": self.details} if self.details else {}),
        }


def _num(x):
    """JSON has no NaN/inf: write them as strings so a failing report stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _clean(d: dict) -> dict:
    return {k: _num(v) for k, v in d.items()}


def at_most(x: float, limit: float) -> bool:
    return x <= limit  # False for NaN, which must fail


@dataclass
class VerificationReport:
    checks: list[CheckResult] = field(default_factory=list)
    sites: list[SiteDivergence] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    n_tokens: int = 0
    diag_probe: str = ""
    skipped: bool = False
    noise_floor: NoiseFloor | None = None
    notes: list[str] = field(default_factory=list)  # what was not verified, and why (printed as warnings)

    @classmethod
    def for_reference(cls, ref: Reference) -> VerificationReport:
        probes = [{"name": p.name, "kind": p.kind, "shape": list(p.input_ids.shape),
                   "positions": int(p.attention_mask.sum())} for p in ref.probes]
        return cls(probes=probes, n_tokens=ref.n_tokens, diag_probe=ref.diag_probe, noise_floor=ref.noise_floor,
                   notes=list(ref.notes))

    def add(self, check: CheckResult) -> CheckResult:
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.gating)

    @property
    def warnings(self) -> list[str]:
        return list(self.notes) + [f"{c.label}: {f}" for c in self.checks if not c.gating for f in c.failures]

    @property
    def failures(self) -> list[str]:
        return [f"{c.label}: {f}" for c in self.checks if c.gating for f in c.failures]

    def to_dict(self) -> dict:
        return {
            "skipped": self.skipped, "passed": self.passed and not self.skipped,
            "metric_definitions": METRIC_DEFINITIONS, "probes": self.probes, "greedy_new_tokens": self.n_tokens,
            "noise_floor": self.noise_floor.to_dict() if self.noise_floor is not None else None,
            "checks": [c.to_dict() for c in self.checks], "notes": list(self.notes),
            "site_divergence": {"probe": self.diag_probe, "modules": [_clean(asdict(s)) for s in self.sites]},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_table(self) -> str:
        if self.skipped:
            return "verification SKIPPED (--no-verify): the baked model was not compared with the hooked model"
        head = ("check", "max abs", "max rel", "mean KL", "top-1", "greedy", "limit (rel/KL/top-1)", "result")
        rows = [head]
        for c in self.checks:
            t = c.tolerance
            limit = "/".join("-" if v is None else f"{v:.3g}" for v in (c.max_rel_limit, t.max_mean_kl, t.min_top1))
            result = "ok" if c.passed else ("FAIL" if c.gating else "warn")
            rows.append((c.label, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.mean_kl:.3g}", f"{c.top1:.4f}",
                         f"{c.greedy_matched}/{c.greedy_total}", limit, result))
        table = format_table(rows)
        for c in self.checks:  # a probe that is not one of the reference's own: how far the maps move it
            if "hooked_vs_base_max_rel" in c.details:
                table += (f"\n{c.label}: hooked vs base max rel {c.details['hooked_vs_base_max_rel']:.3g} (how far the "
                          "maps move this probe)")
        if self.noise_floor is not None:
            table += (f"\nnoise floor of the hooked reference (every map entry moved by one float32 ulp): "
                      f"max rel {self.noise_floor.max_rel:.3g}")
        return table

    def failure_details(self) -> str:
        return (self.to_table() + "\n\nper-module divergence on probe " + self.diag_probe + ":\n"
                + self.site_table())

    def site_table(self, limit: float | None = None) -> str:
        """Per-module divergence on the diagnostic probe; marks the first module over ``limit``
        (default: the first check's max-relative limit, which scales with the noise floor)."""
        if limit is None:
            limit = next((c.max_rel_limit for c in self.checks if c.max_rel_limit is not None), 1e-5)
        rows = [("module", "site", "max abs", "max rel", "")]
        first = True
        for s in self.sites:
            mark = s.note
            if s.max_rel is not None and not s.note and not at_most(s.max_rel, limit):
                mark = "<- first divergence" if first else "diverges"
                first = False
            rows.append((s.module, "yes" if s.is_site else "", "-" if s.max_abs is None else f"{s.max_abs:.3g}",
                         "-" if s.max_rel is None else f"{s.max_rel:.3g}", mark))
        return format_table(rows)


METRIC_DEFINITIONS = {
    "max_abs": "max |candidate - reference| logit over probes, valid positions and vocabulary",
    "max_rel": "max over probes of (max |candidate - reference| / max |reference|) on that probe",
    "mean_kl": "mean over valid positions of KL(softmax(reference) || softmax(candidate)), nats, float64",
    "top1": "fraction of valid positions whose argmax token agrees",
    "greedy": "greedy prompts whose N new tokens are identical to the reference's",
    "noise_floor": "max_rel (and max_abs, mean_kl) of the hooked model with every map entry moved by one float32 "
                   "ulp, against the hooked reference: the rounding noise the max_rel limit scales with",
}


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
