"""Pure tensor math for 1-D (per-neuron) optimal transport.

All functions take samples as ``[N, D]``: N samples of D independent neurons.
In 1-D the optimal coupling pairs samples by rank, so the squared 2-Wasserstein
distance is the mean squared difference of sorted samples; when the counts
differ we compare quantile functions at common levels ``(i + 0.5) / n``.
"""

from __future__ import annotations

import torch


def quantiles_at(sorted_x: torch.Tensor, n: int) -> torch.Tensor:
    """Values of the empirical quantile function of ``sorted_x`` ``[N, D]`` at
    levels ``(i + 0.5) / n``, ``i = 0..n-1``, by linear interpolation -> ``[n, D]``.

    With ``n == N`` this returns ``sorted_x`` itself (exactly).
    """
    N = sorted_x.shape[0]
    if n == N:
        return sorted_x
    # Positions in float64 on CPU (MPS has no float64), then moved to the data.
    levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    pos = (levels * N - 0.5).clamp(0, N - 1)  # sample i sits at level (i + 0.5) / N
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=N - 1)
    w = (pos - lo.to(pos.dtype)).to(sorted_x.dtype).unsqueeze(1).to(sorted_x.device)
    lo, hi = lo.to(sorted_x.device), hi.to(sorted_x.device)
    return sorted_x[lo] * (1 - w) + sorted_x[hi] * w


def matched_quantiles(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-paired samples per neuron: sort both, bring them to the larger count."""
    sa, sb = a.sort(dim=0).values, b.sort(dim=0).values
    n = max(sa.shape[0], sb.shape[0])
    return quantiles_at(sa, n), quantiles_at(sb, n)


def w2_per_neuron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared 2-Wasserstein distance per neuron ``[D]`` between samples ``a`` and ``b``."""
    qa, qb = matched_quantiles(a, b)
    return (qa - qb).pow(2).mean(dim=0)


def w2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over neurons of :func:`w2_per_neuron` (the LinEAS per-site loss)."""
    return float(w2_per_neuron(a.detach().cpu().double(), b.detach().cpu().double()).mean())


def w2_to_sorted_target(src: torch.Tensor, sorted_tgt: torch.Tensor) -> torch.Tensor:
    """Differentiable W2^2 (mean over neurons) of a source batch against a pre-sorted target set.

    The target quantiles are taken at the batch's own levels, so every source
    sample is compared with the target quantile of its rank.
    """
    s = src.sort(dim=0).values
    t = quantiles_at(sorted_tgt, s.shape[0])
    return (s - t).pow(2).mean()


def fit_affine_1d(src: torch.Tensor, tgt: torch.Tensor, eps: float = 1e-12, *, fit_scale: bool = True,
                  fit_shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear-AcT closed form: per-neuron least squares ``tgt ~ scale * src + shift``
    on rank-paired samples, in float64.  Returns ``(scale, shift)`` ``[D]`` float64.

    A neuron whose source samples are constant gets ``scale = 1`` and the
    mean difference as shift (the only affine map the data can determine).
    ``fit_scale=False`` / ``fit_shift=False``: the least-squares fit with the scale held at 1
    (``shift = mean(tgt - src)``) / the shift held at 0 (``scale = E[src*tgt] / E[src^2]``),
    the projection of the fit onto maps that keep that part at the identity.
    """
    x, y = matched_quantiles(src.double(), tgt.double())
    mx, my = x.mean(dim=0), y.mean(dim=0)
    ones = torch.ones_like(mx)
    if not fit_scale:
        return ones, (my - mx) if fit_shift else torch.zeros_like(mx)
    if not fit_shift:
        sq = x.pow(2).mean(dim=0)
        flat = sq <= eps
        return torch.where(flat, ones, (x * y).mean(dim=0) / torch.where(flat, ones, sq)), torch.zeros_like(mx)
    xc, yc = x - mx, y - my
    var = xc.pow(2).mean(dim=0)
    cov = (xc * yc).mean(dim=0)
    flat = var <= eps * (1.0 + mx.abs()).pow(2)
    scale = torch.where(flat, ones, cov / torch.where(flat, ones, var))
    shift = my - scale * mx
    return scale, shift


def soft_threshold(v: torch.Tensor, thr: float) -> torch.Tensor:
    return v.sign() * (v.abs() - thr).clamp_min(0.0)


def group_shrink(v: torch.Tensor, thr: float) -> torch.Tensor:
    """Block soft-thresholding: ``v * max(0, 1 - thr / ||v||)``."""
    norm = v.norm()
    if norm <= thr or norm == 0:
        return torch.zeros_like(v)
    return v * (1.0 - thr / norm)


def sparse_group_prox(scale: torch.Tensor, shift: torch.Tensor, lr: float, l1: float, group: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Proximal step of the sparse group lasso on ``(scale - 1, shift)`` of one site.

    L1: soft-threshold every coordinate by ``lr * l1``; then group L2: shrink
    each parameter vector (scale deviation, shift) by ``lr * group * sqrt(D)``.
    """
    u, t = scale - 1.0, shift
    if l1 > 0:
        u, t = soft_threshold(u, lr * l1), soft_threshold(t, lr * l1)
    if group > 0:
        thr = lr * group * (u.numel() ** 0.5)
        u, t = group_shrink(u, thr), group_shrink(t, thr)
    return u + 1.0, t
