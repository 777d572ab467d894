"""LinEAS: joint training against a known ground-truth map, sparsity, stop-early, determinism."""

import copy
import json

import pytest
import torch
from tiny import random_ids, tiny_model

from lineas.collect import (
    SiteMatchError,
    forward_order,
    match_sites,
    run_to_sites,
    tokenize,
)
from lineas.hooks import attach_affine, count_forward_hooks
from lineas.learn.ot import sparse_group_prox
from lineas.learn.train import TrainConfig, learn_maps

SITES = ["model.layers.0.post_attention_layernorm", "model.layers.1.input_layernorm"]


def _prompts(n=64, seed=0):
    return [random_ids(1, 6 + i % 6, seed=seed + i)[0].tolist() for i in range(n)]


def _ground_truth(model, sites, seed=3):
    """A copy of ``model`` with a known random map installed: its activations are the targets."""
    g = torch.Generator().manual_seed(seed)
    true = {s: (1 + 0.4 * torch.randn(64, generator=g), 0.5 * torch.randn(64, generator=g)) for s in sites}
    target_model = copy.deepcopy(model)
    attach_affine(target_model, true)
    return target_model, true


@pytest.fixture(scope="module")
def trained():
    model = tiny_model("llama")
    target_model, true = _ground_truth(model, SITES)
    prompts = _prompts(64)
    result = learn_maps(model, None, prompts, prompts, SITES, steps=60, lr=0.1, optimizer="adam", batch_size=32,
                        holdout=0.25, seed=0, progress=False, target_model=target_model)
    return model, result, true


def test_lineas_cuts_w2_by_90_percent_and_beats_identity_on_holdout(trained):
    _, r, _ = trained
    assert r.losses[-1] < 0.1 * r.losses[0]
    for rep in r.report:
        assert rep.w2_before > 0.01  # the ground-truth map really moved the targets
        assert rep.w2_after <= 0.1 * rep.w2_before, rep
        assert rep.w2_after_holdout < rep.w2_before_holdout, rep  # identity is the baseline
    assert "W2 before" in r.table() and "held before" in r.table()


def test_lineas_result_metadata_and_model_untouched(trained):
    model, r, _ = trained
    meta = r.maps.metadata
    assert meta["method"] == "lineas" and json.loads(meta["sites"]) == SITES and meta["pooling"] == "mean"
    assert meta["model_type"] == "llama" and len(meta["config_sha256"]) == 64
    hp = json.loads(meta["hyperparameters"])
    assert hp["steps"] == 60 and hp["optimizer"] == "adam" and hp["holdout"] == 0.25
    assert len(meta["source_sha256"]) == 64 and len(meta["target_sha256"]) == 64
    assert count_forward_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())  # freeze was undone
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were ever formed


def test_only_map_parameters_get_gradients_and_forward_stops_after_last_site():
    model = tiny_model("llama")
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    model.model.layers[1].mlp.register_forward_hook(lambda *a: calls.append("late"))
    tok = tokenize(None, _prompts(4), None)
    sites = ["model.layers.0.mlp", "model.layers.1.input_layernorm"]
    params = {s: (torch.nn.Parameter(torch.ones(64)), torch.nn.Parameter(torch.zeros(64))) for s in sites}
    model.requires_grad_(False)
    pooled = run_to_sites(model, tok.batch(range(4)), sites, params)
    sum(v.sum() for v in pooled.values()).backward()
    assert calls == []  # neither later layers nor the LM head ran
    assert all(p.grad is not None for pair in params.values() for p in pair)
    assert all(p.grad is None for p in model.parameters())
    assert pooled[sites[0]].shape == (4, 64)


def test_padding_does_not_change_pooled_activations():
    model = tiny_model("llama")
    prompts = [random_ids(1, 5, seed=1)[0].tolist(), random_ids(1, 11, seed=2)[0].tolist()]
    tok = tokenize(None, prompts, None)
    with torch.no_grad():
        together = run_to_sites(model, tok.batch([0, 1]), SITES)
        alone = run_to_sites(model, tok.batch([0]), SITES)
    for s in SITES:
        assert torch.allclose(together[s][0], alone[s][0], atol=1e-5)


def test_sites_are_put_in_execution_order():
    model = tiny_model("llama")
    defined = match_sites(model, [r"model\.layers\.0\.(mlp|input_layernorm|self_attn)"])
    assert defined == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0.input_layernorm"]
    tok = tokenize(None, _prompts(2), None)
    assert forward_order(model, tok.batch([0, 1]), defined) == [
        "model.layers.0.input_layernorm", "model.layers.0.self_attn", "model.layers.0.mlp"]


def test_match_sites_errors_list_similar_names():
    model = tiny_model("llama")
    with pytest.raises(SiteMatchError, match="similar names: .*post_attention_layernorm"):
        match_sites(model, [r"model\.layers\.0\.post_attn_layernorm"])
    with pytest.raises(SiteMatchError, match="not a valid regular expression"):
        match_sites(model, ["model.layers.(0"])
    # Full match: a prefix is not enough.
    with pytest.raises(SiteMatchError):
        match_sites(model, [r"model\.layers\.0"[:-1]])


def test_deterministic_on_cpu():
    model = tiny_model("llama")
    target_model, _ = _ground_truth(model, SITES[:1])
    prompts = _prompts(24)
    kw = {"steps": 8, "lr": 0.1, "batch_size": 8, "progress": False, "target_model": target_model, "seed": 5}
    a = learn_maps(model, None, prompts, prompts, SITES[:1], **kw)
    b = learn_maps(model, None, prompts, prompts, SITES[:1], **kw)
    assert a.losses == b.losses
    assert torch.equal(a.maps[SITES[0]].scale, b.maps[SITES[0]].scale)
    c = learn_maps(model, None, prompts, prompts, SITES[:1], **{**kw, "seed": 6})
    assert a.losses != c.losses


def test_sparsity_large_lambda_shrinks_support_and_zero_lambda_keeps_all():
    model = tiny_model("llama")
    target_model, _ = _ground_truth(model, SITES)
    prompts = _prompts(32)
    kw = {"steps": 20, "lr": 0.05, "optimizer": "adam", "batch_size": 16, "progress": False,
          "target_model": target_model}
    dense = learn_maps(model, None, prompts, prompts, SITES, **kw)
    assert dense.support == 1.0
    sparse = learn_maps(model, None, prompts, prompts, SITES, sparsity_l1=1.0, sparsity_group=0.05, **kw)
    assert sparse.support < 1.0
    assert float(sparse.maps.metadata["support"]) == pytest.approx(sparse.support, abs=1e-6)
    huge = learn_maps(model, None, prompts, prompts, SITES, sparsity_group=100.0, **kw)
    assert huge.support == 0.0  # every site pulled back to identity


def test_proximal_operator():
    scale = torch.tensor([1.0, 1.5, 0.7, 1.05])
    shift = torch.tensor([0.0, -0.3, 0.02, 2.0])
    s, t = sparse_group_prox(scale, shift, lr=0.1, l1=1.0, group=0.0)  # threshold 0.1
    assert torch.allclose(s, torch.tensor([1.0, 1.4, 0.8, 1.0]))
    assert torch.allclose(t, torch.tensor([0.0, -0.2, 0.0, 1.9]))
    s, t = sparse_group_prox(scale, shift, lr=1.0, l1=0.0, group=10.0)
    assert torch.equal(s, torch.ones(4)) and torch.equal(t, torch.zeros(4))
    u = torch.tensor([3.0, 4.0])
    s, _ = sparse_group_prox(u + 1, torch.zeros(2), lr=1.0, l1=0.0, group=1.0 / 2 ** 0.5)  # thr 1, |u| 5
    assert torch.allclose(s - 1, u * 0.8)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="act")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize(None, ["hello"], 8)


@pytest.mark.slow
def test_smollm2_lineas_reduces_w2():
    from lineas.models import load_model

    lm = load_model("smollm2-135m")
    things = ("movie", "meal", "book", "song", "trip", "game", "show", "car")
    neg = [f"I hate this {w}, it is awful." for w in things]
    pos = [f"I love this {w}, it is wonderful." for w in things]
    sites = [r"model\.layers\.(10|20)\.post_attention_layernorm"]
    r = learn_maps(lm.model, lm.tokenizer, neg, pos, sites, steps=30, lr=0.01, optimizer="adam", batch_size=8,
                   max_length=16, progress=False)
    assert r.w2_after < 0.5 * r.w2_before


# -- defaults that learn (issue 8) ---------------------------------------------------------------
NORM_SITES = [r"model\.layers\.\d+\.(input|post_attention)_layernorm"]


def _two_prompt_sets():
    """24 + 24 unrelated random prompts: no ground truth, the target is just another distribution."""
    return _prompts(24, seed=0), _prompts(24, seed=1000)


def test_defaults_learn_halve_w2_in_100_steps():
    """Only ``steps`` is given: the optimiser settings are the defaults (the old SGD lr 0.1 gave -24%)."""
    src, tgt = _two_prompt_sets()
    r = learn_maps(tiny_model("llama"), None, src, tgt, NORM_SITES, steps=100, progress=False)
    assert r.config.optimizer == TrainConfig().optimizer and r.config.lr == TrainConfig().lr
    assert r.w2_before > 1e-3
    assert r.w2_after <= 0.5 * r.w2_before, (r.w2_before, r.w2_after)


def test_init_linear_act_is_never_worse_than_linear_act():
    src, tgt = _two_prompt_sets()
    act = learn_maps(tiny_model("llama"), None, src, tgt, NORM_SITES, method="linear-act", progress=False)
    both = learn_maps(tiny_model("llama"), None, src, tgt, NORM_SITES, steps=50, init="linear-act", progress=False)
    assert not both.fell_back_to_linear_act and "init_fallback" not in both.maps.metadata
    assert both.w2_after <= act.w2_after
    assert any(not torch.equal(both.maps[s].scale, act.maps[s].scale) for s in act.maps.sites)  # it trained on


def test_init_linear_act_falls_back_when_lineas_ends_worse():
    """A learning rate far too large walks away from the closed-form start: the Linear-AcT maps come back."""
    src, tgt = _two_prompt_sets()
    act = learn_maps(tiny_model("llama"), None, src, tgt, NORM_SITES, method="linear-act", progress=False)
    r = learn_maps(tiny_model("llama"), None, src, tgt, NORM_SITES, steps=3, lr=0.5, schedule="constant",
                   init="linear-act", progress=False)
    assert r.fell_back_to_linear_act
    fallback = json.loads(r.maps.metadata["init_fallback"])
    assert fallback["lineas_w2"] > fallback["linear_act_w2"]
    assert r.w2_after == pytest.approx(act.w2_after, rel=1e-6)
    for s in act.maps.sites:
        assert torch.allclose(r.maps[s].scale, act.maps[s].scale) and torch.allclose(r.maps[s].shift, act.maps[s].shift)
