"""Gemma's scaled token embedding means one thing on every transformers version (lineas/embedding_scale.py).

transformers 4.x Gemma/Gemma-2 multiply by sqrt(hidden_size) after a plain nn.Embedding; 5.x (and 4.x
Gemma-3) inside a *ScaledWordEmbedding.  The site ``model.embed_tokens`` is the scaled embedding on both:
these tests compute what the first decoder layer must receive from the raw table by hand, so they pass
only if hooks, collection and the fold agree with that definition on the installed version (CI runs them
under transformers 4.57 and 5.x).
"""

import pytest
import torch
from tiny import random_ids, tiny_model

from bake.fold.execute import apply_plan
from bake.plan.planner import Layout, plan
from lineas.collect import run_to_sites
from lineas.embedding_scale import outside_scale, table_scale
from lineas.evaluate import model_logits
from lineas.hooks import attach_maps
from lineas.maps import SiteMap, SteeringMaps, effective_maps

SITE = "model.embed_tokens"
GEMMAS = ["gemma", "gemma2", "gemma3_text"]


def _maps(d: int, seed: int = 1) -> SteeringMaps:
    g = torch.Generator().manual_seed(seed)
    return SteeringMaps({SITE: SiteMap(1 + 0.3 * torch.randn(d, generator=g), 0.5 * torch.randn(d, generator=g))},
                        {"method": "test"})


def _layer0_input(model, ids) -> torch.Tensor:
    got = {}

    def record(module, args, kwargs):
        got["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    h = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got["x"]


@pytest.mark.parametrize("arch", GEMMAS)
def test_the_site_is_the_scaled_embedding_in_hooks_and_collection(arch):
    model = tiny_model(arch)
    ids = random_ids()
    d = model.config.hidden_size
    table = model.model.embed_tokens.weight.detach()
    scaled = table[ids] * torch.tensor(d ** 0.5)  # what layer 0 receives unsteered
    assert torch.allclose(_layer0_input(model, ids), scaled, rtol=1e-6, atol=1e-6)
    maps = _maps(d)
    m = maps[SITE]
    with attach_maps(model, maps, 1.0):
        steered = _layer0_input(model, ids)
    assert not torch.allclose(steered, scaled, atol=1e-3)
    torch.testing.assert_close(steered, m.scale * scaled + m.shift, rtol=1e-5, atol=1e-5)
    # the learners see the same activation: pooled over the (unpadded) sequence
    pooled = run_to_sites(model, {"input_ids": ids}, [SITE], stop_early=True)[SITE]
    torch.testing.assert_close(pooled, scaled.mean(dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", GEMMAS)
def test_the_fold_divides_the_shift_by_the_scale_and_matches_the_hooks(arch):
    model = tiny_model(arch)
    ids = random_ids()
    d = model.config.hidden_size
    maps = _maps(d)
    m = maps[SITE]
    table = model.model.embed_tokens.weight.detach().clone()
    # what bake.fold.execute divides the shift by: c (outside the module, 4.x) times k (inside it, 5.x)
    emb = model.model.embed_tokens
    assert outside_scale(model, emb) * table_scale(emb) == pytest.approx(d ** 0.5)
    base = model_logits(model, ids)
    with attach_maps(model, maps, 1.0):
        hooked = model_logits(model, ids)
    assert not torch.allclose(hooked, base, atol=1e-3)
    eff = effective_maps([(maps, 1.0)])
    p = plan(model, eff, untie=True)  # the tiny Gemmas tie embed_tokens to lm_head
    assert p.fully_folded and p.site(SITE).steps[0].layout is Layout.EMBEDDING, p.summary()
    apply_plan(model, p, eff)
    expected = table.double() * m.scale.double() + (m.shift.double() / d ** 0.5)
    torch.testing.assert_close(model.model.embed_tokens.weight.double(), expected, rtol=1e-6, atol=1e-6)
    baked = model_logits(model, ids)
    assert ((baked - hooked).abs().max() / hooked.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("arch", GEMMAS)
def test_an_affine_module_on_the_tied_embedding_and_a_map_on_top_keep_the_meaning(arch):
    """Tied to lm_head, the embedding keeps its map in an affine module; a second map hooked on that site
    (a rebake) still acts on the scaled embedding."""
    model = tiny_model(arch)
    ids = random_ids()
    d = model.config.hidden_size
    scaled = model.model.embed_tokens.weight.detach()[ids] * torch.tensor(d ** 0.5)
    first, second = _maps(d, seed=1), _maps(d, seed=2)
    eff = effective_maps([(first, 1.0)])
    p = plan(model, eff)
    assert p.affine_sites == (SITE,)
    apply_plan(model, p, eff)
    after_first = _layer0_input(model, ids)
    torch.testing.assert_close(after_first, first[SITE].scale * scaled + first[SITE].shift, rtol=1e-5, atol=1e-5)
    with attach_maps(model, second, 1.0):
        steered = _layer0_input(model, ids)
    torch.testing.assert_close(steered, second[SITE].scale * after_first + second[SITE].shift, rtol=1e-5, atol=1e-5)
