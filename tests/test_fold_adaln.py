"""The AdaLN fold (bake.core.fold_math.fold_adaln_rows): the identity, and each diffusers class against hooks."""

import pytest
import torch

from bake.core.fold_math import fold_adaln_rows, fold_modulated_norm_rows

D, E = 6, 5


def _modulate(w, c, e, x, chunks):
    """The AdaLN output n(x)*(1+scale)+shift with the chunks named as given, plus every chunk."""
    m = (e @ w.T + c).chunk(len(chunks), dim=-1)
    named = dict(zip(chunks, m))
    n = torch.nn.functional.layer_norm(x, (D,))
    return n * (1 + named["scale"]) + named["shift"], m


@pytest.mark.parametrize("chunks", [("shift", "scale", "gate"), ("scale", "shift"),
                                    ("shift", "scale", "gate", "shift_mlp", "scale_mlp", "gate_mlp")])
def test_identity_in_float64_and_other_chunks_untouched(chunks):
    g = torch.Generator().manual_seed(0)
    k = len(chunks)
    w, c = torch.randn(k * D, E, generator=g, dtype=torch.float64), torch.randn(k * D, generator=g, dtype=torch.float64)
    a = 1 + 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    e, x = torch.randn(3, E, generator=g, dtype=torch.float64), torch.randn(3, D, generator=g, dtype=torch.float64)
    y, before = _modulate(w, c, e, x, chunks)
    w2, c2 = fold_adaln_rows(w, c, a, b, chunks)
    y2, after = _modulate(w2, c2, e, x, chunks)
    assert (a * y + b - y).abs().max() > 0.1  # the map changes the output
    torch.testing.assert_close(y2, a * y + b, rtol=0, atol=1e-12)
    for name, m0, m1 in zip(chunks, before, after):
        if name not in ("scale", "shift"):
            assert torch.equal(m0, m1), name  # gates and the MLP's modulation are not touched


def test_modulated_norm_identity_in_float64():
    """(a*n + b) * (1 + m_scale) + m_shift, folded into the scale/shift rows, for a norm modulated after it runs."""
    g = torch.Generator().manual_seed(1)
    chunks = ("out_shift", "out_scale", "gate_msa", "shift", "scale", "gate_mlp")
    w = torch.randn(6 * D, E, generator=g, dtype=torch.float64)
    c = torch.randn(6 * D, generator=g, dtype=torch.float64)
    a = 1 + 0.5 * torch.randn(D, generator=g, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    e, x = torch.randn(3, E, generator=g, dtype=torch.float64), torch.randn(3, D, generator=g, dtype=torch.float64)
    n = torch.nn.functional.layer_norm(x, (D,))

    def modulated(w, c, n):
        named = dict(zip(chunks, (e @ w.T + c).chunk(6, dim=-1)))
        return n * (1 + named["scale"]) + named["shift"], named

    ref, before = modulated(w, c, a * n + b)
    assert (ref - modulated(w, c, n)[0]).abs().max() > 0.1
    w2, c2 = fold_modulated_norm_rows(w, c, a, b, chunks)
    out, after = modulated(w2, c2, n)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for name in ("out_shift", "out_scale", "gate_msa", "gate_mlp"):
        assert torch.equal(before[name], after[name]), name
    # folded as if the norm were an AdaLN output (the other formula) it is wrong
    w3, c3 = fold_adaln_rows(w, c, a, b, chunks)
    assert (modulated(w3, c3, n)[0] - ref).abs().max() > 1e-2


def test_bad_chunks_and_shapes_are_refused():
    w, c = torch.randn(12, E), torch.randn(12)
    with pytest.raises(ValueError, match="exactly one"):
        fold_adaln_rows(w, c, torch.ones(D), torch.zeros(D), ("shift", "gate"))
    with pytest.raises(ValueError, match="equal chunks"):
        fold_adaln_rows(w, c, torch.ones(4), torch.zeros(4), ("shift", "scale", "gate", "x", "y"))
    with pytest.raises(ValueError, match="length"):
        fold_adaln_rows(w, c, torch.ones(5), torch.zeros(5), ("shift", "scale"))


def _adaln_modules():
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
        SD35AdaLayerNormZeroX,
    )

    return {"AdaLayerNormZero": (AdaLayerNormZero(D), lambda m, x, e: m(x, emb=e)),
            "AdaLayerNormZeroSingle": (AdaLayerNormZeroSingle(D), lambda m, x, e: m(x, emb=e)),
            "AdaLayerNormContinuous": (AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6),
                                       lambda m, x, e: (m(x, e),)),
            "SD35AdaLayerNormZeroX": (SD35AdaLayerNormZeroX(D), lambda m, x, e: m(x, emb=e))}


@pytest.mark.parametrize("cls", ["AdaLayerNormZero", "AdaLayerNormZeroSingle", "AdaLayerNormContinuous",
                                 "SD35AdaLayerNormZeroX"])
def test_registry_chunk_order_matches_diffusers_against_hooks(cls):
    pytest.importorskip("diffusers")
    from bake.registry.diffusers import load_pipeline_registry
    from lineas.hooks import attach_affine

    torch.manual_seed(0)
    module, call = _adaln_modules()[cls]
    rule = load_pipeline_registry().adaln_rule(module)
    assert rule is not None and rule.module_class == cls
    x, e = torch.randn(2, 4, D), torch.randn(2, D)
    a, b = 1 + 0.5 * torch.randn(D), torch.randn(D)
    with torch.no_grad():
        base = call(module, x, e)
        with attach_affine(torch.nn.ModuleDict({"n": module}), {"n": (a, b)}):
            hooked = call(module, x, e)
        assert (hooked[0] - base[0]).abs().max() > 0.1
        lin = module.linear
        w0, c0 = lin.weight.clone(), lin.bias.clone()
        lin.weight.copy_(fold_adaln_rows(w0, c0, a, b, rule.chunks)[0])
        lin.bias.copy_(fold_adaln_rows(w0, c0, a, b, rule.chunks)[1])
        baked = call(module, x, e)
        torch.testing.assert_close(baked[0], hooked[0], rtol=1e-5, atol=1e-5)
        for h, k in zip(hooked[1:], baked[1:]):  # gates and the rest: as the hooked (= base) module returns them
            torch.testing.assert_close(k, h, rtol=0, atol=0)
        # the other chunk order (AdaLayerNormContinuous is (scale, shift), the Zero norms (shift, scale, ...))
        swapped = tuple({"scale": "shift", "shift": "scale"}.get(n, n) for n in rule.chunks)
        lin.weight.copy_(fold_adaln_rows(w0, c0, a, b, swapped)[0])
        lin.bias.copy_(fold_adaln_rows(w0, c0, a, b, swapped)[1])
        assert (call(module, x, e)[0] - hooked[0]).abs().max() > 1e-2
