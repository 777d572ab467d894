"""Linear-AcT: closed-form per-neuron affine transport."""

import copy

import pytest
import torch
from tiny import random_ids, tiny_model

from lineas.hooks import attach_affine
from lineas.learn.ot import fit_affine_1d, matched_quantiles, quantiles_at, w2, w2_per_neuron
from lineas.learn.train import learn_maps


def test_recovers_known_affine_relation_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 16, dtype=torch.float64)
    a = torch.rand(16, generator=g, dtype=torch.float64) * 2 + 0.1  # positive: rank order is kept
    b = torch.randn(16, generator=g, dtype=torch.float64)
    y = a * x + b
    # Shuffle the target rows: the fit must not rely on sample pairing, only on ranks.
    y = y[torch.randperm(200, generator=g)]
    scale, shift = fit_affine_1d(x, y)
    assert scale.dtype == torch.float64
    assert torch.allclose(scale, a, atol=1e-10) and torch.allclose(shift, b, atol=1e-10)


def test_matches_closed_form_least_squares():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 8, generator=g).exp()  # skewed: sorted pairs are not exactly affine
    y = torch.randn(50, 8, generator=g) * 2 + 1
    scale, shift = fit_affine_1d(x, y)
    xs, ys = x.double().sort(0).values, y.double().sort(0).values
    for j in range(8):
        A = torch.stack([xs[:, j], torch.ones(50, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(A, ys[:, j:j + 1]).solution.squeeze(1)
        assert torch.allclose(scale[j], sol[0], atol=1e-9) and torch.allclose(shift[j], sol[1], atol=1e-9)


def test_different_counts_are_matched_by_quantiles():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 4, generator=g, dtype=torch.float64)
    y = 3 * torch.randn(400, 4, generator=g, dtype=torch.float64) - 2
    scale, shift = fit_affine_1d(x, y)
    assert torch.allclose(scale, torch.full((4,), 3.0, dtype=torch.float64), atol=0.35)
    assert torch.allclose(shift, torch.full((4,), -2.0, dtype=torch.float64), atol=0.35)
    qa, qb = matched_quantiles(x, y)
    assert qa.shape == qb.shape == (1000, 4)


def test_constant_neuron_gets_identity_scale():
    x = torch.ones(10, 2, dtype=torch.float64)
    x[:, 1] = torch.arange(10)
    y = torch.arange(10, dtype=torch.float64).unsqueeze(1).repeat(1, 2) + 5
    scale, shift = fit_affine_1d(x, y)
    assert scale[0] == 1 and torch.isclose(shift[0], torch.tensor(9.5 - 1, dtype=torch.float64))
    assert torch.isclose(scale[1], torch.tensor(1.0, dtype=torch.float64))
    assert torch.isclose(shift[1], torch.tensor(5.0, dtype=torch.float64))


def test_quantiles_and_w2_basics():
    s = torch.arange(4.0).unsqueeze(1)
    assert torch.equal(quantiles_at(s, 4), s)
    assert torch.allclose(quantiles_at(s, 2).squeeze(), torch.tensor([0.5, 2.5]))
    a = torch.randn(30, 3)
    assert w2(a, a[torch.randperm(30)]) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(w2_per_neuron(a, a + 2.0), torch.full((3,), 4.0, dtype=a.dtype), atol=1e-5)


def test_incremental_fit_on_model_reaches_targets():
    """Targets come from the model with a known map at two sites; Linear-AcT fits it incrementally."""
    model = tiny_model("llama")
    prompts = [random_ids(1, 6 + i % 5, seed=i)[0].tolist() for i in range(48)]
    sites = ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm"]
    g = torch.Generator().manual_seed(3)
    true = {s: (1 + 0.4 * torch.randn(64, generator=g), 0.5 * torch.randn(64, generator=g)) for s in sites}
    target_model = copy.deepcopy(model)
    attach_affine(target_model, true)
    r = learn_maps(model, None, prompts, prompts, sites, method="linear-act", progress=False,
                   target_model=target_model, batch_size=16)
    assert r.maps.sites == sites and r.maps.metadata["method"] == "linear-act"
    for rep in r.report:
        assert rep.w2_after < 0.05 * rep.w2_before
    # The first site sees the same inputs in both models, so its map is recovered exactly.
    first = sites[0]
    assert torch.allclose(r.maps[first].scale, true[first][0], atol=1e-3)
    assert torch.allclose(r.maps[first].shift, true[first][1], atol=1e-3)
    assert r.support == 1.0
