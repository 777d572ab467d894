"""Numerical verification: does a candidate model reproduce the hooked reference?

The *reference* is the original fp32 model with the steering hooks attached
(:func:`lineas.hooks.attach_affine` with the effective maps).  It is recorded
once, **before** the weights are folded, into a :class:`Reference`: logits on
every probe, greedy continuations, and the per-module activations of one
diagnostic probe.  Keeping outputs instead of a second model copy halves the
memory of a bake while still comparing against the original weights, and lets
every later candidate (the in-memory bake, the exported folder reloaded from
disk in fp32 or bf16/fp16, an ONNX session) be checked against the same numbers.

The reference also records its own rounding-noise floor (:mod:`bake.verify.noise_floor`),
which the fp32 rows scale their max-relative limit with, and refuses maps that make
the hooked model itself non-finite (bad input, not a verification failure).

Metric definitions and thresholds live in :mod:`bake.verify.tolerances`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from bake.verify.guard import (  # noqa: F401 (the errors re-exported)
    Change,
    DegenerateReferenceError,
    NonFiniteReferenceError,
    NoVisibleChangeError,
    Sample,
    first_module,
    require_sound_reference,
    require_visible_change,
)
from bake.verify.image_probe import record_image_reference, visibility_note
from bake.verify.noise_floor import SAMPLES as FLOOR_SAMPLES
from bake.verify.noise_floor import NoiseFloor
from bake.verify.passes import (  # noqa: F401 (re-exported)
    RowSlice,
    Runner,
    greedy_tokens,
    run_batches,
    run_grouped,
    torch_runner,
)
from bake.verify.probes import Probe, build_greedy_prompts, build_probes, model_vocab_size
from bake.verify.reference import Reference  # noqa: F401 (re-exported)
from bake.verify.report import (  # noqa: F401  (re-exported: callers import the report types from here)
    METRIC_DEFINITIONS,
    CheckResult,
    ProbeStats,
    SiteDivergence,
    VerificationReport,
    at_most,
    format_table,
)
from bake.verify.schedule import ReferenceSchedule, ScheduledReference, run_schedule
from bake.verify.stats import STATS_CHUNK, LogitStats, logit_stats, probe_stats  # noqa: F401 (re-exported)
from bake.verify.tolerances import Tolerance, get_tolerance
from lineas.hooks import attach_affine

GUARD_ROW = "torch-float32"  # the check whose limit the maps must exceed: every verified bake runs it (fp32)
DIAG_PROBE_KIND = "random"  # the first random probe has no padding: every position is comparable

def bar_disabled(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: ``progress=None`` lets tqdm decide (bars only on a terminal)."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------- running models
def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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
def record_outputs(model: nn.Module, names: Sequence[str], rows: RowSlice | None = None):
    """Forward hooks that only *record* (never modify) the first output of each named module.

    The dict fills in execution order.  Register after any steering hooks so the
    recorded value is the steered output.  ``rows``: keep only one batch's part of a pass
    that runs several (sliced in the hook: the rest of the pass is never copied).
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
                y = y if rows is None else rows.take(y)
                store[name] = y.detach().to("cpu", torch.float32).clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- reference
def _diag_index(probes: Sequence[Probe]) -> int:
    return next((i for i, p in enumerate(probes) if p.kind == DIAG_PROBE_KIND), 0)


def _run_all(model_or_runner, probes, greedy_prompts, greedy_of, watch, progress, desc,
             reference_vocab: int | None = None):
    """A candidate's logits on every probe, its greedy tokens, and the diagnostic probe's module outputs.

    The probes run as one batch (:func:`run_grouped`; the logits of a large vocabulary are split over a
    few passes).  ``reference_vocab``: the logits' width, for runners that are not torch models.  The
    candidate is *teacher-forced* on the reference's greedy tokens ``greedy_of`` in the same batch: its
    argmax after each reference prefix.  Up to the first mismatch these are exactly the tokens its own
    greedy decoding would produce, so "identical greedy tokens" and the first divergence are decided
    without decoding token by token."""
    run = (torch_runner(model_or_runner, keep_layout=watch) if isinstance(model_or_runner, nn.Module)
           else model_or_runner)
    batches = [(p.input_ids, p.attention_mask) for p in probes]
    prompts = greedy_prompts.to(torch.int64)
    forced = torch.cat([prompts, torch.tensor(greedy_of, dtype=torch.int64)], 1)
    batches.append((forced, torch.ones_like(forced)))
    n_tokens = len(greedy_of[0]) if greedy_of else 0
    taught = slice(prompts.shape[1] - 1, prompts.shape[1] - 1 + n_tokens)  # positions whose argmax is a greedy token
    teacher = torch.zeros(forced.shape, dtype=torch.bool)
    teacher[:, taught] = True
    vocab = reference_vocab if reference_vocab else model_vocab_size(model_or_runner)
    with tqdm(total=1, desc=desc, disable=bar_disabled(progress), leave=False) as bar:
        record = (lambda rows: record_outputs(model_or_runner, watch, rows)) if (
            isinstance(model_or_runner, nn.Module) and watch) else None
        # The full logits budget, as the reference's: with the reads of bake.store.rawmem (and no resident block
        # when they are mapped) the Gemma-2-2B-shaped bake peaks at 3.77 GiB for a float32 and for a
        # bfloat16 export (benchmarks/bake_scale.py; half the budget took a third pass).
        outs, acts = run_grouped(run, batches, vocab, first=_diag_index(probes), record=record,
                                 keeps=[None] * len(probes) + [teacher])
        bar.update()
    greedy = outs.pop()[:, taught].argmax(-1).tolist()
    return outs, greedy, acts


@torch.no_grad()
def record_reference(model: nn.Module, affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     tokenizer=None, n_tokens: int = 8, progress: bool = False,
                     noise_floor: bool = True, source: str | None = None) -> Reference:
    """Run the probes through ``model`` with ``affines`` hooked; hooks are removed afterwards.

    Raises :class:`NonFiniteReferenceError` when the hooked logits are not finite, and the other refusals of
    :func:`guard_reference` (maps that erase the input, or that change nothing the check can see).
    ``noise_floor``: also measure :class:`bake.verify.noise_floor.NoiseFloor` (the probes under each perturbation,
    riding along in the greedy passes: :mod:`bake.verify.schedule`).
    ``source``: the folder ``model`` was loaded from; a vision-language model's processor there builds its
    image+text probe (:mod:`bake.verify.image_probe`), else the reference notes why there is none.
    """
    probes = build_probes(model, tokenizer)
    prompts = build_greedy_prompts(model, tokenizer)
    watch = watch_modules(model, affines)
    diag = _diag_index(probes)
    schedule = ReferenceSchedule.build(probes, prompts, n_tokens, samples=FLOOR_SAMPLES if noise_floor else 0,
                                       vocab=model_vocab_size(model), base=True)
    with tqdm(total=len(schedule.passes), desc="verify: hooked reference", disable=bar_disabled(progress),
              leave=False) as bar:
        done = run_schedule(model, schedule, affines, probes, prompts, diag=diag, watch=watch,
                            record=(lambda rows: record_outputs(model, watch, rows)) if watch else None,
                            on_pass=bar.update)
    floor = NoiseFloor.worst_of(done.floor_samples) if noise_floor else None
    guard_reference(model, probes, done, affines, floor.max_rel if floor is not None else None)
    image, note = record_image_reference(model, affines, source)
    if image is not None:
        note = visibility_note(image, get_tolerance(GUARD_ROW).max_rel_limit(floor.max_rel if floor else None))
    return Reference(probes, done.logits, prompts, done.greedy, n_tokens, watch, done.activations,
                     probes[diag].name, noise_floor=floor, image=image, notes=[note] if note else [])


def guard_reference(model: nn.Module, probes: Sequence[Probe], done: ScheduledReference,
                    affines: Mapping[str, tuple[torch.Tensor, torch.Tensor]], noise_floor: float | None) -> None:
    """The shared guard (:mod:`bake.verify.guard`) on a causal LM's hooked logits: refuse maps that make the
    hooked model non-finite, all zero or constant (naming the first module), or that move no probe's logits
    (hooked vs base, max rel; the base probes ride along in the schedule) by more than the ``torch-float32``
    check's limit."""
    samples = [Sample(p.name, x[p.attention_mask.bool()], b.degeneracy) for p, x, b in zip(probes, done.logits,
                                                                                          done.base)]

    def locate(i: int, test, among) -> str | None:
        p = probes[i]
        with attach_affine(model, affines):
            return first_module(model, lambda: torch_runner(model)(p.input_ids, p.attention_mask), test, among)

    require_sound_reference(samples, locate, affines)
    limit = get_tolerance(GUARD_ROW).max_rel_limit(noise_floor)
    require_visible_change([Change(p.name, "max rel logit", b.stats.max_rel, limit) for p, b in zip(probes, done.base)],
                           GUARD_ROW)


@torch.no_grad()
def first_divergence(want: list[int], got: list[int]) -> int | None:
    """The first position where two greedy token lists differ (None: no difference over the shorter)."""
    return next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)


# ----------------------------------------------------------------------------- comparison
def compare(candidate, reference: Reference, tolerance: str | Tolerance, *, label: str,
            progress: bool = False) -> tuple[CheckResult, dict[str, torch.Tensor]]:
    """Run ``candidate`` (a torch model or a :data:`Runner`) on the reference probes and judge it.

    The max-relative limit comes from the tolerance row and the reference's measured
    noise floor (:meth:`bake.verify.tolerances.Tolerance.max_rel_limit`).  Returns the check and
    the candidate's activations on the diagnostic probe (empty for non-torch runners)
    for :func:`site_divergence`.
    """
    tol = get_tolerance(tolerance) if isinstance(tolerance, str) else tolerance
    logits, greedy, acts = _run_all(candidate, reference.probes, reference.greedy_prompts, reference.greedy,
                                    reference.watch, progress, f"verify: {label}",
                                    reference_vocab=reference.logits[0].shape[-1])
    st = logit_stats(reference.probes, reference.logits, logits)
    max_abs, max_rel, mean_kl, top1 = st.max_abs, st.max_rel, st.mean_kl, st.top1
    floor = reference.noise_floor.max_rel if reference.noise_floor is not None else None
    rel_limit = tol.max_rel_limit(floor)
    detail, matched = [], 0
    for prompt, want, got in zip(reference.greedy_prompts, reference.greedy, greedy):
        same = want == got
        matched += same
        first = first_divergence(want, got)
        # Teacher-forced: after its first divergence the candidate's own decoding is unknown, so stop there.
        detail.append({"prompt_len": int(prompt.numel()), "identical": same, "first_mismatch": first,
                       "reference": want, "candidate": got if first is None else got[:first + 1]})
    failures = []
    if rel_limit is not None and not at_most(max_rel, rel_limit):
        floor_note = f" (limit from noise floor {floor:.3g})" if floor is not None and tol.noise_multiple else ""
        failures.append(f"max relative logit error {max_rel:.3g} > {rel_limit:.3g}{floor_note}")
    if tol.max_mean_kl is not None and not at_most(mean_kl, tol.max_mean_kl):
        failures.append(f"mean KL {mean_kl:.3g} > {tol.max_mean_kl:g}")
    if tol.min_top1 is not None and not top1 >= tol.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {tol.min_top1:g}")
    if tol.greedy_identical and matched != len(detail):
        failures.append(f"greedy generation differs on {len(detail) - matched}/{len(detail)} prompts "
                        f"({reference.n_tokens} new tokens)")
    check = CheckResult(label=label, tolerance=tol, max_abs=max_abs, max_rel=max_rel, mean_kl=mean_kl, top1=top1,
                        greedy_matched=matched, greedy_total=len(detail), per_probe=st.per_probe, failures=failures,
                        greedy_detail=detail, max_rel_limit=rel_limit)
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


