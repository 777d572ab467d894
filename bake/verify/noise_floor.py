"""How much does the hooked reference itself move under float32 rounding?

A fold replaces the hooked model's run-time ``s*y + t`` by weights that were
rounded once when stored, so the baked logits differ from the hooked ones by
rounding noise, amplified by every layer after the site.  How much depends on
the model (depth, logit magnitude, how sharp its attention is) and on the maps,
so one fixed limit either refuses good bakes of deep models or passes wrong
folds of shallow ones.  Instead, verification measures the noise floor of the
reference on the same probes: the hooked model with every scale and shift entry
moved by one float32 ulp (random direction), i.e. a change of exactly the size
a fold's single rounding makes, and nothing more.  The ``torch-float32`` row of
:mod:`bake.verify.tolerances` turns the measured floor into a limit.

One perturbation is one random direction, and the logit error's max is heavy-tailed
in it: on SmolLM2-135M (60 norm sites, maps +- 0.2) eight perturbations gave max rel
5.7e-6 to 3.2e-5 (median 1.3e-5) while the bake's error was 2.0e-5.  The floor is
therefore the largest of :data:`SAMPLES` perturbations (the max of two pairs of those
eight was never below 1.2e-5), at the cost of the probes' positions once per sample (they ride
along in the reference's greedy passes: :mod:`bake.verify.schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

Affines = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
SAMPLES = 2  # independent one-ulp perturbations; the floor is the largest (see above)


@dataclass(frozen=True)
class NoiseFloor:
    """Logit error of the one-ulp-perturbed hooked model against the hooked reference
    (same metric definitions as :class:`bake.verify.check.ProbeStats`)."""

    max_rel: float
    max_abs: float
    mean_kl: float
    samples: tuple[float, ...] = ()  # max_rel of each perturbation; ``max_rel`` is their max

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def worst_of(cls, samples: Sequence) -> NoiseFloor:
        """The floor of the :class:`bake.verify.stats.LogitStats` of each perturbation: its worst one's."""
        worst = max(samples, key=lambda st: st.max_rel)
        return cls(max_rel=worst.max_rel, max_abs=worst.max_abs, mean_kl=worst.mean_kl,
                   samples=tuple(st.max_rel for st in samples))


def _ulp_step(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    x = x.detach().to(torch.float32)
    up = torch.rand(x.shape, generator=gen) < 0.5
    toward = torch.where(up, torch.tensor(math.inf), torch.tensor(-math.inf)).to(x.device)
    return torch.nextafter(x, toward)


def rounding_perturbed(affines: Affines, *, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``affines`` with every scale and shift entry moved by one float32 ulp in a random direction."""
    gen = torch.Generator().manual_seed(seed)
    return {site: (_ulp_step(s, gen), _ulp_step(t, gen)) for site, (s, t) in affines.items()}
