"""The data a fold plan is made of: typed states, frozen records, and their renderings.

:mod:`bake.plan.planner` decides; :mod:`bake.fold.execute` carries out; this module only
describes.  Every state is an ``Enum`` whose values are the strings written to
``lineas_provenance.json`` (``to_dict``), so the JSON stays plain strings while
the code compares members, never bare strings.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum

# 2: ShiftFold.OWN_BIAS is written "own_bias" (was "folded"); plan-level "notes".
PLAN_VERSION = 2


class SiteKind(str, Enum):
    """What the steered module is, as far as folding is concerned."""

    RMSNORM = "rmsnorm"          # w * x_hat
    RMSNORM_1P = "rmsnorm_1p"    # (1 + w) * x_hat (Gemma)
    LAYERNORM = "layernorm"
    GROUPNORM = "groupnorm"
    LINEAR = "linear"
    CONV1D = "conv1d"            # GPT-2 Conv1D, weight [in, out]
    CONV = "conv"                # nn.Conv2d
    EMBEDDING = "embedding"
    ADALN = "adaln"              # adaptive LayerNorm: n(x)*(1+scale)+shift, scale/shift rows of a Linear
    MODULE = "module"            # anything else: no exact fold is known

    @property
    def is_norm(self) -> bool:
        return self in NORM_KINDS


NORM_KINDS = (SiteKind.LAYERNORM, SiteKind.RMSNORM, SiteKind.RMSNORM_1P, SiteKind.GROUPNORM)


class Layout(str, Enum):
    """How the tensors a fold step writes are laid out (``bake.core.fold_math`` takes the value)."""

    NORM = "norm"
    LINEAR = "linear"
    CONV1D = "conv1d"
    CONV = "conv"
    EMBEDDING = "embedding"
    EXPERTS_IN_OUT = "experts_in_out"    # fused experts [E, in, out]: x @ W[e] (GPT-OSS gate_up_proj)
    EXPERTS_OUT_IN = "experts_out_in"    # fused experts [E, out, in]: F.linear(x, W[e])


class ScaleFold(str, Enum):
    IDENTITY = "identity"   # scale is 1 everywhere: nothing to do
    FOLDED = "folded"       # written into the site's weight
    AFFINE = "affine"       # kept in an affine module after the site


class ShiftFold(str, Enum):
    ZERO = "zero"             # shift is 0 everywhere: nothing to do
    OWN_BIAS = "own_bias"     # written into the site's own bias
    CONSUMERS = "consumers"   # written into the bias of every linear that reads the site
    AFFINE = "affine"         # kept in an affine module after the site


class FoldOp(str, Enum):
    NORM_SCALE = "norm_scale"        # w' = s*w
    NORM_SCALE_1P = "norm_scale_1p"  # w' = s*(1+w) - 1
    NORM_BIAS = "norm_bias"          # b' = s*b + t
    ROWS = "rows"                    # producer: W' = diag(s) W, b' = s*b + t
    INPUT_SHIFT = "input_shift"      # consumer: b' = b + W t, with t of the site
    TENSOR_INPUT_SHIFT = "tensor_input_shift"  # consumer tensors named by the registry (a router, fused experts):
                                                # bias' = bias + W t, W in ``reads``, bias in ``tensors``
    ADALN_ROWS = "adaln_rows"        # modulation Linear: scale rows a*W, a*c+(a-1); shift rows a*W, a*c+b
    MODULATED_ROWS = "modulated_rows"  # a norm modulated after it runs: scale rows as above; shift rows W+bW_s


@dataclass(frozen=True)
class FoldStep:
    """One tensor update: ``op`` on ``module``'s ``tensors``."""

    op: FoldOp
    module: str
    layout: Layout
    tensors: tuple[str, ...]
    chunks: tuple[str, ...] = ()   # *_ROWS of a modulation Linear: each row block's name; "scale"/"shift" are
                                   # the blocks the step rewrites (bake.core.fold_math)
    reads: tuple[str, ...] = ()    # TENSOR_INPUT_SHIFT: the weight it reads (not written)

    def __post_init__(self):  # a typo'd state fails here, not as a silent "no match" later
        object.__setattr__(self, "op", FoldOp(self.op))
        object.__setattr__(self, "layout", Layout(self.layout))
        if (self.op in (FoldOp.ADALN_ROWS, FoldOp.MODULATED_ROWS)) != bool(self.chunks):
            raise ValueError(f"{self.module}: chunks are given exactly for the modulation-row steps")
        if (self.op is FoldOp.TENSOR_INPUT_SHIFT) != bool(self.reads):
            raise ValueError(f"{self.module}: reads are given exactly for the tensor input-shift steps")


@dataclass(frozen=True)
class AffineSpec:
    """An affine module to insert after ``site`` (see :class:`bake.fold.affine_module.LineasAffine`)."""

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
    kind: SiteKind
    source: str                           # "registry:<model_type>" or "module type"
    scale: ScaleFold
    shift: ShiftFold
    steps: tuple[FoldStep, ...] = ()
    affine: AffineSpec | None = None
    shift_targets: tuple[str, ...] = ()   # modules whose bias receives the shift (ShiftFold.CONSUMERS)
    reason: str = ""                      # why an affine module is needed

    def __post_init__(self):
        object.__setattr__(self, "kind", SiteKind(self.kind))
        object.__setattr__(self, "scale", ScaleFold(self.scale))
        object.__setattr__(self, "shift", ShiftFold(self.shift))

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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


@dataclass(frozen=True)
class FoldPlan:
    model_class: str
    model_type: str | None
    registry: str | None                  # model_type of the registry entry used, None when none was
    sites: tuple[SitePlan, ...]
    config_changes: tuple[ConfigChange, ...] = ()
    untied: tuple[Untie, ...] = ()
    maps_digest: str = ""
    notes: tuple[str, ...] = ()           # registry/model disagreements the user should know about
    runtimes: tuple = ()                  # bake.plan.runtimes.RuntimeVerdict per runtime (set by plan())

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

    def differs_by_design(self) -> dict[str, str]:
        """Sites whose own output legitimately differs after the fold (the shift moved to consumers),
        with the reason, for the per-site divergence report."""
        return {p.site: "shift folded into " + ", ".join(t.rsplit(".", 1)[-1] for t in p.shift_targets)
                for p in self.sites if p.shift is ShiftFold.CONSUMERS}

    def site(self, name: str) -> SitePlan:
        for p in self.sites:
            if p.site == name:
                return p
        raise KeyError(name)

    def summary(self) -> str:
        parts = [_plural(sum(p.scale is ScaleFold.FOLDED for p in self.sites), "scale") + " folded"]
        own = sum(p.shift is ShiftFold.OWN_BIAS for p in self.sites)
        if own:
            parts.append(_plural(own, "shift") + " folded into own bias")
        by_dest = Counter(_short_targets(p.shift_targets) for p in self.sites if p.shift is ShiftFold.CONSUMERS)
        for i, (dest, k) in enumerate(sorted(by_dest.items())):
            head = _plural(k, "shift") + " folded" if (i == 0 and not own) else f"{k}"
            parts.append(f"{head} into {dest} biases")
        aff = _plural(len(self.affine_sites), "affine module")
        shift_only = sum(1 for p in self.sites if p.affine is not None and not p.affine.scale)
        if shift_only:
            aff += f" ({shift_only} shift-only)"
        parts.append(aff)
        ident = sum(p.scale is ScaleFold.IDENTITY and p.shift is ShiftFold.ZERO for p in self.sites)
        if ident:
            parts.append(f"{ident} identity")
        extra = []
        if self.config_changes:
            extra.append("config: " + ", ".join(f"{c.key}={c.new!r}" for c in self.config_changes))
        if self.untied:
            extra.append("untied: " + ", ".join(u.parameter for u in self.untied))
        return _plural(len(self.sites), "site") + ": " + ", ".join(parts) + ("; " + "; ".join(extra) if extra else "")

    def to_table(self) -> str:
        rows = [("site", "kind", "scale", "shift", "notes")]
        for p in self.sites:
            if p.shift is ShiftFold.CONSUMERS:
                shift = "-> " + _short_targets(p.shift_targets) + " bias"
            elif p.shift is ShiftFold.OWN_BIAS:
                shift = "-> own bias"
            else:
                shift = p.shift.value
            if p.affine is not None:
                mod = "affine module" if p.affine.scale else "shift-only affine module"
                notes = f"{mod}: {p.reason}"
            else:
                notes = p.source
            rows.append((p.site, p.kind.value, p.scale.value, shift, notes))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 5)
        for c in self.config_changes:
            lines.append(f"config: {c.key}: {c.old!r} -> {c.new!r} ({c.reason}; zero bias added to "
                         f"{_plural(len(c.adds_bias_to), 'module')})")
        for u in self.untied:
            lines.append(f"untie: {u.parameter} gets its own copy (was tied to {', '.join(u.tied_to)})")
        lines.extend(f"note: {n}" for n in self.notes)
        if self.runtimes:
            lines += ["runtimes (does the export load without custom code?):", matrix_table(self.runtimes)]
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-able description (provenance, model card); enum states are written as their values."""
        return {
            "plan_version": PLAN_VERSION,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "registry": self.registry,
            "maps_digest": self.maps_digest,
            "summary": self.summary(),
            "notes": list(self.notes),
            "sites": [_jsonable(asdict(p)) for p in self.sites],
            "config_changes": [_jsonable(asdict(c)) for c in self.config_changes],
            "untied": [_jsonable(asdict(u)) for u in self.untied],
            "affine_sites": list(self.affine_sites),
            "runtimes": [v.to_dict() for v in self.runtimes],
        }


def matrix_table(verdicts) -> str:
    """Plain-text rows for ``--dry-run`` (sources are in the card and the provenance)."""
    rows = [("runtime", "loads without custom code", "evidence", "why")]
    rows += [(v.runtime.value, v.serves.value, v.evidence.value, v.reason) for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 3)
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, Enum):
        return obj.value
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
