"""Numerical verification: does a candidate model reproduce the hooked reference?

The *reference* is the original fp32 model with the steering hooks attached
(:func:`lineas.hooks.attach_affine` with the effective maps).  It is recorded
once, **before** the weights are folded, into a :class:`Reference`: logits on
every probe, greedy continuations, and the per-module activations of one
diagnostic probe.  Keeping outputs instead of a second model copy halves the
memory of a bake while still comparing against the original weights, and lets
every later candidate (the in-memory bake, the exported folder reloaded from
disk in fp32 or bf16/fp16, an ONNX session) be checked against the same numbers.

Metric definitions and thresholds live in :mod:`bake.tolerances`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lineas.hooks import attach_affine

from .probes import Probe, build_greedy_prompts, build_probes
from .tolerances import Tolerance, get_tolerance

DIAG_PROBE_KIND = "random"  # the first random probe has no padding: every position is comparable

# A candidate is anything mapping (input_ids, attention_mask) -> logits [B, L, V];
# torch models are wrapped by :func:`torch_runner`; ONNX exporters pass their own.
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``progress=None`` lets tqdm decide (bars only on a terminal)."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------- running models
def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def torch_runner(model: nn.Module) -> Runner:
    device = model_device(model)

    @torch.no_grad()
    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.detach().to("cpu", torch.float32)

    return run


def greedy_tokens(run: Runner, prompts: torch.Tensor, n_new: int) -> list[list[int]]:
    """Greedy continuation of each row of ``prompts`` ``[P, L]`` (one batch, no padding, no KV cache:
    the same code path for every candidate, ONNX included)."""
    ids = prompts.to(torch.int64)
    for _ in range(n_new):
        logits = run(ids, torch.ones_like(ids))[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1]:].tolist()


# ----------------------------------------------------------------------------- activation recording
def watch_modules(model: nn.Module, sites: Iterable[str]) -> list[str]:
    """Modules whose outputs the per-site report compares: the steered sites and every
    block of every ``nn.ModuleList`` (decoder layers), so a divergence can be localised."""
    names = set(sites)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            names.update(f"{name}.{i}" if name else str(i) for i in range(len(mod)))
    return [n for n, _ in model.named_modules() if n in names]


@contextmanager
def record_outputs(model: nn.Module, names: Sequence[str]):
    """Forward hooks that only *record* (never modify) the first output of each named module.

    The dict fills in execution order.  Register after any steering hooks so the
    recorded value is the steered output.
    """
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        if name not in modules:
            continue

        def hook(_m, _i, output, name=name):
            y = output[0] if isinstance(output, (tuple, list)) else output
            if name not in store and isinstance(y, torch.Tensor):
                store[name] = y.detach().to("cpu", torch.float32).clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- reference
def _ulp_step(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    up = torch.rand(x.shape, generator=gen) < 0.5
    toward = torch.where(up, torch.tensor(math.inf), torch.tensor(-math.inf)).to(x.device)
    return torch.nextafter(x, toward)


def rounding_perturbed(affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, seed: int = 0
                       ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``affines`` with every scale and shift entry moved by one float32 ulp in a random direction:
    a change of the size a fold's single rounding makes, and nothing more."""
    gen = torch.Generator().manual_seed(seed)
    return {site: (_ulp_step(s, gen), _ulp_step(t, gen)) for site, (s, t) in affines.items()}


@dataclass
class Reference:
    probes: list[Probe]
    logits: list[torch.Tensor]  # per probe, [B, L, V] fp32 cpu
    greedy_prompts: torch.Tensor  # [P, L]
    greedy: list[list[int]]
    n_tokens: int
    watch: list[str]
    activations: dict[str, torch.Tensor]  # diagnostic probe, execution order
    diag_probe: str


def _diag_index(probes: Sequence[Probe]) -> int:
    return next((i for i, p in enumerate(probes) if p.kind == DIAG_PROBE_KIND), 0)


def _run_all(model_or_runner, probes, greedy_prompts, n_tokens, watch, progress, desc):
    run = torch_runner(model_or_runner) if isinstance(model_or_runner, nn.Module) else model_or_runner
    diag = _diag_index(probes)
    logits, acts = [], {}
    bar = tqdm(total=len(probes) + n_tokens, desc=desc, disable=bar_disabled(progress), leave=False)
    try:
        for i, p in enumerate(probes):
            if i == diag and isinstance(model_or_runner, nn.Module) and watch:
                with record_outputs(model_or_runner, watch) as store:
                    logits.append(run(p.input_ids, p.attention_mask))
                acts = dict(store)
            else:
                logits.append(run(p.input_ids, p.attention_mask))
            bar.update()
        counted = run if bar.disable else _counting(run, bar)
        greedy = greedy_tokens(counted, greedy_prompts, n_tokens)
    finally:
        bar.close()
    return logits, greedy, acts


def _counting(run: Runner, bar) -> Runner:
    def wrapped(ids, mask):
        out = run(ids, mask)
        bar.update()
        return out
    return wrapped


def record_reference(model: nn.Module, affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     tokenizer=None, n_tokens: int = 8, progress: bool = False) -> Reference:
    """Run the probes through ``model`` with ``affines`` hooked; hooks are removed afterwards."""
    probes = build_probes(model, tokenizer)
    prompts = build_greedy_prompts(model, tokenizer)
    watch = watch_modules(model, affines)
    handle = attach_affine(model, affines)
    try:
        logits, greedy, acts = _run_all(model, probes, prompts, n_tokens, watch, progress, "verify: hooked reference")
    finally:
        handle.remove()
    return Reference(probes, logits, prompts, greedy, n_tokens, watch, acts, probes[_diag_index(probes)].name)


# ----------------------------------------------------------------------------- comparison
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
            "mean_kl": _num(self.mean_kl), "top1": _num(self.top1),
            "greedy_matched": self.greedy_matched, "greedy_total": self.greedy_total,
            "failures": list(self.failures), "per_probe": [_clean(asdict(p)) for p in self.per_probe],
            "greedy": self.greedy_detail,
        }


def _num(x):
    """JSON has no NaN/inf: write them as strings so a failing report stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _clean(d: dict) -> dict:
    return {k: _num(v) for k, v in d.items()}


def _le(x: float, limit: float) -> bool:
    return x <= limit  # False for NaN, which must fail


def probe_stats(name: str, ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor):
    """Per-probe metrics over valid positions; also returns (kl_sum, agree, n) for pooling."""
    if cand.shape != ref.shape:
        nan = float("nan")
        return ProbeStats(name, nan, nan, nan, 0.0, 0), (nan, 0, int(mask.sum()))
    valid = mask.bool()
    r = ref[valid].double()  # [N, V]
    c = cand[valid].double()
    diff = (c - r).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not torch.isfinite(c).all():
        max_abs = float("inf")
    denom = float(r.abs().max()) if r.numel() else 1.0
    max_rel = max_abs / denom if denom > 0 else max_abs
    lp_r = torch.log_softmax(r, -1)
    lp_c = torch.log_softmax(c, -1)
    kl = (lp_r.exp() * (lp_r - lp_c)).sum(-1)  # [N]
    agree = int((r.argmax(-1) == c.argmax(-1)).sum())
    n = r.shape[0]
    stats = ProbeStats(name, max_abs, max_rel, float(kl.mean()) if n else 0.0, agree / n if n else 1.0, n)
    return stats, (float(kl.sum()), agree, n)


def compare(candidate, reference: Reference, tolerance: str | Tolerance, *, label: str,
            progress: bool = False) -> tuple[CheckResult, dict[str, torch.Tensor]]:
    """Run ``candidate`` (a torch model or a :data:`Runner`) on the reference probes and judge it.

    Returns the check and the candidate's activations on the diagnostic probe
    (empty for non-torch runners) for :func:`site_divergence`.
    """
    tol = get_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
    logits, greedy, acts = _run_all(candidate, reference.probes, reference.greedy_prompts, reference.n_tokens,
                                    reference.watch, progress, f"verify: {label}")
    per_probe, kl_sum, agree, total = [], 0.0, 0, 0
    for probe, ref, cand in zip(reference.probes, reference.logits, logits):
        stats, (k, a, n) = probe_stats(probe.name, ref, cand, probe.attention_mask)
        per_probe.append(stats)
        kl_sum, agree, total = kl_sum + k, agree + a, total + n
    max_abs = max(p.max_abs for p in per_probe) if all(math.isfinite(p.max_abs) for p in per_probe) else float("inf")
    max_rel = max(p.max_rel for p in per_probe) if math.isfinite(max_abs) else float("inf")
    mean_kl = kl_sum / total if total else 0.0
    top1 = agree / total if total else 1.0
    detail, matched = [], 0
    for prompt, want, got in zip(reference.greedy_prompts, reference.greedy, greedy):
        same = want == got
        matched += same
        first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
        detail.append({"prompt_len": int(prompt.numel()), "identical": same, "first_mismatch": first,
                       "reference": want, "candidate": got})
    failures = []
    if tol.max_rel is not None and not _le(max_rel, tol.max_rel):
        failures.append(f"max relative logit error {max_rel:.3g} > {tol.max_rel:g}")
    if tol.max_mean_kl is not None and not _le(mean_kl, tol.max_mean_kl):
        failures.append(f"mean KL {mean_kl:.3g} > {tol.max_mean_kl:g}")
    if tol.min_top1 is not None and not top1 >= tol.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {tol.min_top1:g}")
    if tol.greedy_identical and matched != len(detail):
        failures.append(f"greedy generation differs on {len(detail) - matched}/{len(detail)} prompts "
                        f"({reference.n_tokens} new tokens)")
    check = CheckResult(label, tol, max_abs, max_rel, mean_kl, top1, matched, len(detail), per_probe, failures,
                        detail)
    return check, acts


def site_divergence(reference: Reference, candidate_acts: Mapping[str, torch.Tensor], sites: Iterable[str],
                    expected: Mapping[str, str] | None = None) -> list[SiteDivergence]:
    """Per watched module (execution order of the reference), how far the candidate's output is.

    ``expected``: modules whose own output legitimately differs (e.g. a norm whose
    shift was folded into its consumers' biases), with the reason; the block
    outputs after them are the ones to read.
    """
    sites = set(sites)
    expected = dict(expected or {})
    rows = []
    for name, ref in reference.activations.items():
        cand = candidate_acts.get(name)
        if cand is None:
            rows.append(SiteDivergence(name, name in sites, None, None, "not present in candidate"))
            continue
        if cand.shape != ref.shape:
            rows.append(SiteDivergence(name, name in sites, None, None,
                                       f"shape {tuple(cand.shape)} vs reference {tuple(ref.shape)}"))
            continue
        d = float((cand.double() - ref.double()).abs().max())
        denom = float(ref.abs().max())
        rows.append(SiteDivergence(name, name in sites, d, d / denom if denom > 0 else d,
                                   f"differs by design: {expected[name]}" if name in expected else ""))
    return rows


# ----------------------------------------------------------------------------- report
@dataclass
class VerificationReport:
    checks: list[CheckResult] = field(default_factory=list)
    sites: list[SiteDivergence] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    n_tokens: int = 0
    diag_probe: str = ""
    skipped: bool = False

    @classmethod
    def for_reference(cls, ref: Reference) -> VerificationReport:
        probes = [{"name": p.name, "kind": p.kind, "shape": list(p.input_ids.shape),
                   "positions": int(p.attention_mask.sum())} for p in ref.probes]
        return cls(probes=probes, n_tokens=ref.n_tokens, diag_probe=ref.diag_probe)

    def add(self, check: CheckResult) -> CheckResult:
        self.checks.append(check)
        return check

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if c.gating)

    @property
    def warnings(self) -> list[str]:
        return [f"{c.label}: {f}" for c in self.checks if not c.gating for f in c.failures]

    @property
    def failures(self) -> list[str]:
        return [f"{c.label}: {f}" for c in self.checks if c.gating for f in c.failures]

    def to_dict(self) -> dict:
        return {
            "skipped": self.skipped, "passed": self.passed and not self.skipped,
            "metric_definitions": METRIC_DEFINITIONS, "probes": self.probes, "greedy_new_tokens": self.n_tokens,
            "checks": [c.to_dict() for c in self.checks],
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
            limit = "/".join("-" if v is None else f"{v:g}" for v in (t.max_rel, t.max_mean_kl, t.min_top1))
            result = "ok" if c.passed else ("FAIL" if c.gating else "warn")
            rows.append((c.label, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.mean_kl:.3g}", f"{c.top1:.4f}",
                         f"{c.greedy_matched}/{c.greedy_total}", limit, result))
        return format_table(rows)

    def site_table(self, limit: float = 1e-5) -> str:
        """Per-module divergence on the diagnostic probe; marks the first module over ``limit``."""
        rows = [("module", "site", "max abs", "max rel", "")]
        first = True
        for s in self.sites:
            mark = s.note
            if s.max_rel is not None and not s.note and not _le(s.max_rel, limit):
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
}


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
