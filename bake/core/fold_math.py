"""Pure tensor math for folding an affine map ``y -> s * y + t`` into weights.

Every function takes all its inputs explicitly, computes in float64 (float32 on
devices without float64, e.g. MPS) and returns new tensors in the dtype of the
tensor it replaces (modelled on ``torch.nn.utils.fusion.fuse_linear_bn_weights``).
Why float64: the hooked model rounds ``s*y`` and ``y+t`` at run time, the folded
model rounds the folded weight once when it is stored.  Computing ``s*w`` or
``b + W t`` in float64 makes that single cast the only rounding the fold adds
(half an ulp of the stored value), so the baked model's distance from the hooked
one is the smallest fp32 allows (see the ``torch-float32`` row of
:mod:`bake.verify.tolerances`).  Nothing here touches a
module: finding the tensors, checking ties and committing the results is the
job of :mod:`bake.plan.planner` and :mod:`bake.fold.execute`.

Conventions (``s`` and ``t`` are 1-D, one entry per output feature):

* norm, weight convention ``w``  (LayerNorm, Llama RMSNorm):   ``w' = s*w``, ``b' = s*b + t``
* norm, weight convention ``1+w`` (Gemma RMSNorm):             ``w' = s*(1+w) - 1``
* producer linear, ``W`` is ``[out, in]`` (``nn.Linear``):     ``W' = diag(s) W``, ``b' = s*b + t``
* producer GPT-2 ``Conv1D``, ``W`` is ``[in, out]``:           ``W' = W diag(s)``, ``b' = s*b + t``
* producer conv, ``W`` is ``[out, in, *k]``:                   rows as for ``nn.Linear``
* embedding table ``E`` is ``[vocab, D]``:                     ``E' = E diag(s) + t``
* shift ``t`` on a consumer's input:                           ``b' = b + W t`` (``Conv1D``: ``b + t W``)
* shift ``t`` on the input of fused experts ``W`` ``[E, in, out]``: ``b'[e] = b[e] + t W[e]``
  (``[E, out, in]``: ``b[e] + W[e] t``)
"""

from __future__ import annotations

import torch

LAYOUTS = ("linear", "conv1d", "conv", "embedding")


def work_dtype(device: torch.device | str) -> torch.dtype:
    """float64, except on devices that have none (MPS), where float32 is the best there is."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(work_dtype(x.device))


def _check_len(name: str, vec: torch.Tensor, n: int) -> None:
    if vec.dim() != 1 or vec.numel() != n:
        raise ValueError(f"{name} must be 1-D of length {n}, got shape {tuple(vec.shape)}")


def fold_norm_scale(weight: torch.Tensor, scale: torch.Tensor, *, one_plus: bool = False) -> torch.Tensor:
    """Norm weight after multiplying the norm output by ``scale``.

    ``one_plus`` selects the Gemma convention ``out = (1 + w) * x_hat``.
    """
    _check_len("scale", scale, weight.numel())
    w, s = _wide(weight), _wide(scale).view(weight.shape)
    out = s * (1.0 + w) - 1.0 if one_plus else s * w
    return out.to(weight.dtype)


def fold_norm_bias(bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Norm bias after ``y -> s*y + t`` (the weight is handled by :func:`fold_norm_scale`)."""
    _check_len("scale", scale, bias.numel())
    _check_len("shift", shift, bias.numel())
    return (_wide(scale) * _wide(bias) + _wide(shift)).to(bias.dtype)


def fold_output_rows(weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor,
                     shift: torch.Tensor | None, *, layout: str = "linear"
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Producer fold: the layer's output ``y`` becomes ``s*y + t``.

    Returns ``(weight', bias')``.  ``bias`` may be None only when ``shift`` is None
    (a scale-only fold); a non-zero shift needs a bias to land in.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    out_axis = {"linear": 0, "conv": 0, "conv1d": 1, "embedding": 1}[layout]
    n_out = weight.shape[out_axis]
    _check_len("scale", scale, n_out)
    shape = [1] * weight.dim()
    shape[out_axis] = n_out
    s = _wide(scale)
    w = _wide(weight) * s.view(shape)
    if layout == "embedding":
        # An embedding has no bias: the shift is added to every row of the table.
        if bias is not None:
            raise ValueError("an embedding table has no bias")
        if shift is not None:
            _check_len("shift", shift, n_out)
            w = w + _wide(shift).view(shape)
        return w.to(weight.dtype), None
    if bias is None:
        if shift is not None:
            raise ValueError("a shift needs a bias to fold into; this layer has none")
        return w.to(weight.dtype), None
    _check_len("bias", bias, n_out)
    b = s * _wide(bias)
    if shift is not None:
        _check_len("shift", shift, n_out)
        b = b + _wide(shift)
    return w.to(weight.dtype), b.to(bias.dtype)


def fold_input_shift(weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, *,
                     layout: str = "linear") -> torch.Tensor:
    """Consumer fold: the layer's *input* ``x`` becomes ``x + t``, so ``b' = b + W t``."""
    if layout == "linear":
        n_in, n_out = weight.shape[1], weight.shape[0]
        _check_len("shift", shift, n_in)
        wt = _wide(weight) @ _wide(shift)
    elif layout == "conv1d":
        n_in, n_out = weight.shape[0], weight.shape[1]
        _check_len("shift", shift, n_in)
        wt = _wide(shift) @ _wide(weight)
    else:
        raise ValueError(f"input-shift fold supports layouts 'linear' and 'conv1d', not {layout!r}")
    _check_len("bias", bias, n_out)
    return (_wide(bias) + wt).to(bias.dtype)


EXPERT_LAYOUTS = ("experts_in_out", "experts_out_in")


def fold_experts_input_shift(weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor, *,
                             layout: str) -> torch.Tensor:
    """Consumer fold into a fused 3-D expert tensor: every expert ``e``'s input ``x`` becomes ``x + t``, so
    ``b'[e] = b[e] + W[e] t``.  ``layout`` ``"experts_in_out"``: ``W`` is ``[E, in, out]``, the expert computes
    ``x @ W[e]`` (GPT-OSS ``gate_up_proj``), so ``b'[e] = b[e] + t @ W[e]``; ``"experts_out_in"``: ``W`` is
    ``[E, out, in]`` (``F.linear(x, W[e])``).  ``bias`` is ``[E, out]``; only it is returned (the weight is read)."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert input-shift fold supports layouts {EXPERT_LAYOUTS}, not {layout!r}")
    if weight.dim() != 3:
        raise ValueError(f"expert weight must be 3-D [experts, ., .], got shape {tuple(weight.shape)}")
    n_in, n_out = (weight.shape[1], weight.shape[2]) if layout == "experts_in_out" else (weight.shape[2],
                                                                                         weight.shape[1])
    _check_len("shift", shift, n_in)
    if tuple(bias.shape) != (weight.shape[0], n_out):
        raise ValueError(f"bias must be [{weight.shape[0]}, {n_out}], got shape {tuple(bias.shape)}")
    t = _wide(shift)
    wt = torch.einsum("i,eio->eo", t, _wide(weight)) if layout == "experts_in_out" else \
        torch.einsum("eoi,i->eo", _wide(weight), t)
    return (_wide(bias) + wt).to(bias.dtype)


def is_identity_scale(scale: torch.Tensor) -> bool:
    return bool(torch.all(scale == 1))


def is_zero_shift(shift: torch.Tensor) -> bool:
    return bool(torch.all(shift == 0))


ADALN_SCALE, ADALN_SHIFT = "scale", "shift"


def _adaln_blocks(weight, bias, scale, shift, chunks: tuple[str, ...]) -> tuple[int, int]:
    """(number of row blocks, rows per block) after checking the chunk names and every length."""
    if chunks.count(ADALN_SCALE) != 1 or chunks.count(ADALN_SHIFT) != 1:
        raise ValueError(f"chunks {chunks} must name exactly one {ADALN_SCALE!r} and one {ADALN_SHIFT!r} block")
    k, n = len(chunks), weight.shape[0]
    if n % k:
        raise ValueError(f"a weight with {n} rows does not split into {k} equal chunks")
    _check_len("scale", scale, n // k)
    _check_len("shift", shift, n // k)
    _check_len("bias", bias, n)
    return k, n // k


def fold_adaln_rows(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                    chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaLN fold: the map ``y -> a*y + b`` on the output of an adaptive LayerNorm folds into the
    rows of the Linear that makes its modulation from the conditioning ``e``.

    The norm computes ``y = n(x) * (1 + m_scale) + m_shift`` with ``[m_0; ...; m_{k-1}] = W e + c``
    split into ``k = len(chunks)`` equal row blocks (``torch.chunk`` on the output), ``chunks`` naming
    each block; the blocks named ``"scale"`` and ``"shift"`` modulate the steered output.  Then

        a*y + b = n(x) * (a + a*m_scale) + (a*m_shift + b)
                = n(x) * (1 + [a*m_scale + (a - 1)]) + [a*m_shift + b]

    so with ``m' = W' e + c'``:

        scale rows:  W' = diag(a) W,  c' = a*c + (a - 1)
        shift rows:  W' = diag(a) W,  c' = a*c + b

    exactly, for every ``e`` (every timestep, every prompt).  Every other block (gates, the MLP's
    shift/scale of AdaLayerNormZero) is returned unchanged: it does not act on the steered output.
    """
    k, d = _adaln_blocks(weight, bias, scale, shift, chunks)
    w, c = _wide(weight).clone(), _wide(bias).clone()
    a = _wide(scale)
    for block, add in ((chunks.index(ADALN_SCALE), a - 1.0), (chunks.index(ADALN_SHIFT), _wide(shift))):
        rows = slice(block * d, (block + 1) * d)
        w[rows] = a.unsqueeze(1) * w[rows]
        c[rows] = a * c[rows] + add
    return w.to(weight.dtype), c.to(bias.dtype)


def fold_modulated_norm_rows(weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                             chunks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The map ``y -> a*y + b`` on a weightless norm whose output is modulated *after* it runs by two row
    blocks of an AdaLN Linear (SD3/FLUX ``norm2``: ``n(x) * (1 + m_scale) + m_shift`` with the AdaLN's
    ``scale_mlp``/``shift_mlp``), folded into those rows (named ``"scale"`` and ``"shift"`` in ``chunks``)::

        (a*n + b) * (1 + m_scale) + m_shift
            = n * (1 + [a*m_scale + (a - 1)]) + [m_shift + b + b*m_scale]

        scale rows:  W_s' = diag(a) W_s,          c_s' = a*c_s + (a - 1)
        shift rows:  W_h' = W_h + diag(b) W_s,    c_h' = c_h + b + b*c_s     (W_s, c_s before the fold)

    exactly, for every conditioning.  Other blocks are returned unchanged.
    """
    k, d = _adaln_blocks(weight, bias, scale, shift, chunks)
    w, c = _wide(weight).clone(), _wide(bias).clone()
    a, b = _wide(scale), _wide(shift)
    rs, rh = (slice(i * d, (i + 1) * d) for i in (chunks.index(ADALN_SCALE), chunks.index(ADALN_SHIFT)))
    w_s, c_s = w[rs].clone(), c[rs].clone()
    w[rs], c[rs] = a.unsqueeze(1) * w_s, a * c_s + (a - 1.0)
    w[rh], c[rh] = w[rh] + b.unsqueeze(1) * w_s, c[rh] + b + b * c_s
    return w.to(weight.dtype), c.to(bias.dtype)
