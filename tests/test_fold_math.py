"""Random-tensor identities for the pure fold math in bake/core/fold_math.py (fp32 and bf16)."""

import pytest
import torch
import torch.nn.functional as F

from bake.core.fold_math import fold_input_shift, fold_norm_bias, fold_norm_scale, fold_output_rows

D_IN, D_OUT = 24, 16


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _st(n, seed=1):
    g = _g(seed)
    return 1 + 0.5 * torch.randn(n, generator=g), torch.randn(n, generator=g)


def _close(a, b, tol=2e-6):
    a, b = a.double(), b.double()
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


def _affine(y, s, t):
    return y * s + t


def test_layernorm_scale_and_shift():
    g = _g()
    x, w, b = torch.randn(5, D_OUT, generator=g), torch.randn(D_OUT, generator=g), torch.randn(D_OUT, generator=g)
    s, t = _st(D_OUT)
    ref = _affine(F.layer_norm(x, (D_OUT,), w, b), s, t)
    assert not torch.allclose(ref, F.layer_norm(x, (D_OUT,), w, b))
    out = F.layer_norm(x, (D_OUT,), fold_norm_scale(w, s), fold_norm_bias(b, s, t))
    _close(out, ref)


def test_groupnorm_channels():
    g = _g()
    x, w, b = torch.randn(2, 8, 3, 3, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    s, t = _st(8)
    ref = F.group_norm(x, 4, w, b) * s.view(1, 8, 1, 1) + t.view(1, 8, 1, 1)
    _close(F.group_norm(x, 4, fold_norm_scale(w, s), fold_norm_bias(b, s, t)), ref)


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_rmsnorm_llama_convention():
    g = _g()
    x, w = torch.randn(5, D_OUT, generator=g), torch.randn(D_OUT, generator=g)
    s, _ = _st(D_OUT)
    _close(fold_norm_scale(w, s) * _rms(x), s * (w * _rms(x)))


def test_rmsnorm_gemma_one_plus_convention():
    g = _g()
    x, w = torch.randn(5, D_OUT, generator=g), 0.3 * torch.randn(D_OUT, generator=g)
    s, _ = _st(D_OUT)
    w2 = fold_norm_scale(w, s, one_plus=True)
    _close((1 + w2) * _rms(x), s * ((1 + w) * _rms(x)))
    # the plain convention would be wrong here: the test can tell the two apart
    assert not torch.allclose((1 + fold_norm_scale(w, s)) * _rms(x), s * ((1 + w) * _rms(x)), atol=1e-3)


def test_linear_rows():
    g = _g()
    x, W, b = torch.randn(5, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g)
    s, t = _st(D_OUT)
    W2, b2 = fold_output_rows(W, b, s, t)
    _close(F.linear(x, W2, b2), _affine(F.linear(x, W, b), s, t))
    W3, b3 = fold_output_rows(W, None, s, None)  # scale only, no bias
    assert b3 is None
    _close(F.linear(x, W3), s * F.linear(x, W))


def test_conv1d_transposed_rows_and_input_shift():
    """GPT-2 Conv1D stores W as [in, out]: y = x @ W + b."""
    g = _g()
    x, W, b = torch.randn(5, D_IN, generator=g), torch.randn(D_IN, D_OUT, generator=g), torch.randn(D_OUT, generator=g)
    s, t = _st(D_OUT)
    W2, b2 = fold_output_rows(W, b, s, t, layout="conv1d")
    _close(x @ W2 + b2, _affine(x @ W + b, s, t))
    _, t_in = _st(D_IN, seed=3)
    _close(x @ W + fold_input_shift(W, b, t_in, layout="conv1d"), (x + t_in) @ W + b)


def test_conv2d_rows():
    g = _g()
    x, W, b = torch.randn(2, 3, 5, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, generator=g)
    s, t = _st(4)
    W2, b2 = fold_output_rows(W, b, s, t, layout="conv")
    _close(F.conv2d(x, W2, b2), F.conv2d(x, W, b) * s.view(1, 4, 1, 1) + t.view(1, 4, 1, 1))


def test_embedding_rows():
    g = _g()
    E, ids = torch.randn(10, D_OUT, generator=g), torch.tensor([[1, 4, 9]])
    s, t = _st(D_OUT)
    E2, none = fold_output_rows(E, None, s, t, layout="embedding")
    assert none is None
    _close(F.embedding(ids, E2), _affine(F.embedding(ids, E), s, t))


def test_linear_input_shift():
    g = _g()
    x, W, b = torch.randn(5, D_IN, generator=g), torch.randn(D_OUT, D_IN, generator=g), torch.randn(D_OUT, generator=g)
    _, t = _st(D_IN)
    _close(F.linear(x, W, fold_input_shift(W, b, t)), F.linear(x + t, W, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", ["norm_scale", "norm_scale_1p", "norm_bias", "rows", "input_shift"])
def test_computed_in_float64_and_rounded_once(fn, dtype):
    """Out in the input dtype, equal to the float64 result rounded once: the fold adds one rounding
    (half an ulp of the stored value), not one per operation (s*(1+w)-1, s*b+t and W@t have several)."""
    g = _g()
    W = torch.randn(D_OUT, D_IN, generator=g).to(dtype)
    w, b = torch.randn(D_OUT, generator=g).to(dtype), torch.randn(D_OUT, generator=g).to(dtype)
    s, t = _st(D_OUT)
    _, t_in = _st(D_IN)
    folds = {  # what bake.core.fold_math computes, and the same formula written out in float64
        "norm_scale": (lambda: fold_norm_scale(w, s), lambda w, b, W, s, t, ti: s * w),
        "norm_scale_1p": (lambda: fold_norm_scale(w, s, one_plus=True), lambda w, b, W, s, t, ti: s * (1 + w) - 1),
        "norm_bias": (lambda: fold_norm_bias(b, s, t), lambda w, b, W, s, t, ti: s * b + t),
        "rows": (lambda: fold_output_rows(W, b, s, t), lambda w, b, W, s, t, ti: (s[:, None] * W, s * b + t)),
        "input_shift": (lambda: fold_input_shift(W, b, t_in), lambda w, b, W, s, t, ti: b + W @ ti),
    }
    fold, formula = folds[fn]
    got = fold()
    exact = formula(*(x.double() for x in (w, b, W, s, t, t_in)))
    for g_, e_ in zip(*((got, exact) if fn == "rows" else ((got,), (exact,)))):
        assert g_.dtype == dtype
        assert torch.equal(g_, e_.to(dtype))


def test_bf16_linear_identity_within_rounding():
    g = _g()
    x = torch.randn(5, D_IN, generator=g)
    W, b = torch.randn(D_OUT, D_IN, generator=g).bfloat16(), torch.randn(D_OUT, generator=g).bfloat16()
    s, t = _st(D_OUT)
    W2, b2 = fold_output_rows(W, b, s, t)
    ref = _affine(F.linear(x, W.float(), b.float()), s, t)
    # one bf16 rounding of W' and b' (relative 2^-8) bounds the error
    _close(F.linear(x, W2.float(), b2.float()), ref, tol=2e-2)


def test_bad_inputs():
    W, b = torch.randn(D_OUT, D_IN), torch.randn(D_OUT)
    s, t = _st(D_OUT)
    with pytest.raises(ValueError, match="length 16"):
        fold_output_rows(W, b, s[:-1], t)
    with pytest.raises(ValueError, match="needs a bias"):
        fold_output_rows(W, None, s, t)
    with pytest.raises(ValueError, match="layout"):
        fold_output_rows(W, b, s, t, layout="nope")
    with pytest.raises(ValueError, match="length 24"):
        fold_input_shift(W, b, t)
    with pytest.raises(ValueError, match="length 8, got shape .16"):
        fold_norm_scale(torch.ones(8), s)
