"""The guard every family's check runs on its hooked reference before a bake is compared with it.

A check compares the baked model with the hooked one (original weights + steering hooks).  It says
nothing when the hooked reference is itself broken, or when the maps change it so little that an
unsteered model would pass as well; both are bad input (a :class:`bake.errors.FoldError`, exit 2), not a
verification failure:

* :func:`require_sound_reference`: the hooked outputs must be finite, and not all zero nor constant where the
  base model's are not (maps that erase the input, e.g. a final norm with scale 0); the first module whose
  output became so is named;
* :func:`require_visible_change`: on some probe, hooked vs base must differ by more than the check's limit.

The causal-LM family runs it in :func:`bake.verify.check.record_reference`, the diffusers family in
:meth:`bake.families.diffusers.family.DiffusersFamily.reference`; each gives its probes' outputs, its
metric and limits, and a way to find the module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bake.errors import FoldError

Affines = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
NO_VISIBLE_CHANGE = "these maps at this λ change nothing the check can see"


class DegenerateReferenceError(FoldError):
    """The hooked model itself gives constant, all-zero or non-finite outputs: the maps are bad input."""


class NonFiniteReferenceError(DegenerateReferenceError):
    """The hooked model itself produces inf/NaN: the maps are bad input, there is nothing to bake."""


class NoVisibleChangeError(FoldError):
    """The maps move no probe's hooked output by more than the check's limit: the check could not tell
    the bake from no bake."""


@dataclass(frozen=True)
class Sample:
    """One probe's outputs (the compared values only, e.g. the logits at real positions)."""

    probe: str
    hooked: torch.Tensor
    base: str | None  # what is wrong with the base output (:func:`degeneracy`): a base as degenerate is no refusal


@dataclass(frozen=True)
class Change:
    """How far the maps move one probe's output (hooked vs base, in the check's metric), and the check's limit."""

    probe: str
    metric: str
    value: float
    limit: float


def degeneracy(x: torch.Tensor) -> str | None:
    """What is wrong with an output: "not finite", "all zero", "constant" (every value equal), or None."""
    if not x.is_floating_point() or x.numel() == 0:
        return None
    if not bool(torch.isfinite(x).all()):
        return "not finite"
    if not bool(x.any()):
        return "all zero"
    if float(x.amax()) == float(x.amin()):
        return "constant"
    return None


def first_module(model: nn.Module, run: Callable[[], object], test: Callable[[torch.Tensor], bool],
                 among: Collection[str] | None = None) -> str | None:
    """The first module of ``model`` (of ``among``, if given), in execution order, whose (first) floating output
    passes ``test`` while ``run()`` runs it; forward hooks that only look."""
    found: list[str] = []

    def look(name):
        def hook(_m, _i, output):
            y = output[0] if isinstance(output, (tuple, list)) and output else output
            if not found and isinstance(y, torch.Tensor) and y.is_floating_point() and test(y.detach()):
                found.append(name)
        return hook

    handles = [mod.register_forward_hook(look(name)) for name, mod in model.named_modules()
               if name and (among is None or name in among)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def require_sound_reference(samples: Sequence[Sample], locate: Callable[..., str | None],
                            affines: Affines | None = None) -> None:
    """Refuse a hooked reference whose outputs are non-finite, or all zero / constant where the base
    outputs are not.  ``locate(i, test, among)``: the first module (of the names ``among``; None: of all) whose
    output passes ``test`` when probe ``i`` runs hooked (:func:`first_module`).  Non-finite outputs name the
    first module that overflows; all-zero or constant ones the first steered site whose output is so (other
    modules may be constant by design, e.g. a rotary embedding at one position)."""
    for i, s in enumerate(samples):
        what = degeneracy(s.hooked)
        if what is None or (what != "not finite" and s.base is not None):
            continue
        if what == "not finite":
            first = locate(i, lambda y: degeneracy(y) == "not finite", None)
        else:
            first = locate(i, lambda y: degeneracy(y) is not None, set(affines or ()))
        where = f"first at module {first!r}" if first else "first in its output"
        if what == "not finite":
            raise NonFiniteReferenceError(
                f"the hooked model (original weights + steering maps) is itself not finite on probe {s.probe!r}, "
                f"{where}: these maps overflow float32 activations at this strength{_largest(affines)}; there is "
                "nothing correct to bake, so check the maps and the strength")
        raise DegenerateReferenceError(
            f"the hooked model (original weights + steering maps) is itself {what} on probe {s.probe!r} (the base "
            f"model's output is not), {where}: these maps erase the input at this strength (a scale of 0?); "
            "there is nothing a check could verify, so check the maps and the strength")


def require_visible_change(changes: Sequence[Change], check: str) -> None:
    """Refuse maps that move no probe's output (hooked vs base) by more than the limit of ``check``:
    an unsteered model would pass that check too."""
    if not changes or any(not c.value <= c.limit for c in changes):
        return
    worst = max(changes, key=lambda c: c.value / c.limit if c.limit > 0 else float("inf"))
    raise NoVisibleChangeError(
        f"{NO_VISIBLE_CHANGE}: hooked vs base {worst.metric} is at most {worst.value:.3g} (probe {worst.probe!r}), "
        f"within the {check} limit {worst.limit:.3g} on all {len(changes)} probe(s), so an unsteered model "
        "would pass the check too; raise the strength (or check the maps)")


def _largest(affines: Affines | None) -> str:
    if not affines:
        return ""
    site = max(affines, key=lambda k: float(affines[k][0].abs().max() + affines[k][1].abs().max()))
    s, t = affines[site]
    return f" (largest map: {site!r}, max |scale| {float(s.abs().max()):.3g}, max |shift| {float(t.abs().max()):.3g})"
