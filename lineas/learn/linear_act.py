"""Linear-AcT (Rodriguez et al., ICLR 2025): closed-form per-neuron affine transport.

Sites are estimated one at a time in forward order ("incremental"): the
source activations of site k are collected with the maps of sites < k already
active, because those maps change what site k sees.  Targets are unsteered
and collected once for all sites.  For each neuron the sorted source and
target pooled activations are paired by rank (1-D optimal transport) and
``scale, shift`` are fitted by least squares in float64
(:func:`lineas.learn.ot.fit_affine_1d`).

Only AcT's "transport everywhere" variant (``quantiles_src = q_all``) exists:
the map must stay affine so it can be baked into weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lineas.collect import TokenSet, collect_pooled
from lineas.learn.ot import fit_affine_1d
from lineas.learn.parts import SiteParts


def fit_linear_act(model: nn.Module, source: TokenSet, target_pooled: dict[str, torch.Tensor], sites: Sequence[str], *,
                   batch_size: int, device="cpu", progress=None, parts: Mapping[str, SiteParts] | None = None,
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Incremental closed-form fit; ``target_pooled`` holds unsteered target activations per site.

    ``parts`` (a :class:`~lineas.learn.parts.FoldPlanner`'s plan): per site, which of scale and shift are fitted;
    a frozen one stays exactly at the identity and the other is the constrained least-squares fit.
    Returns float32 ``(scale, shift)`` per site, in ``sites`` order.
    """
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site in sites:
        # Only the forward up to this site is needed; earlier maps are active.
        src = collect_pooled(model, source, [site], batch_size=batch_size, affines=maps, device=device)[site]
        fit = parts[site] if parts is not None else None
        scale, shift = fit_affine_1d(src.cpu(), target_pooled[site].cpu(), fit_scale=fit is None or fit.scale,
                                     fit_shift=fit is None or fit.shift)
        maps[site] = (scale.float().to(device), shift.float().to(device))
        if progress is not None:
            progress.update(1)
    return maps
