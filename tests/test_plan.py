"""FoldPlan: decisions, rendering, strictness and bad inputs (tiny random models, no network)."""

import dataclasses
import json

import pytest
import torch
from tiny import random_ids, tiny_model

from bake.errors import FoldError
from bake.fold.execute import apply_plan
from bake.plan.planner import FoldOp, Layout, ScaleFold, ShiftFold, SiteKind, SitePlan, plan
from lineas.hooks import attach_affine
from lineas.maps import SiteMap


def _maps(sites, dim=64, seed=0, shift=True):
    g = torch.Generator().manual_seed(seed)
    return {s: SiteMap(1 + 0.3 * torch.randn(dim, generator=g),
                       torch.randn(dim, generator=g) if shift else torch.zeros(dim)) for s in sites}


def _norm_sites(n_layers=2):
    return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in ("input_layernorm", "post_attention_layernorm")]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_llama_norms_fold_completely():
    """Acceptance: tiny llama, maps on every input/post-attention norm -> all folded, no affine module."""
    model = tiny_model("llama")
    p = plan(model, _maps(_norm_sites()))
    assert p.affine_sites == () and p.fully_folded
    assert all(s.scale is ScaleFold.FOLDED and s.shift is ShiftFold.CONSUMERS for s in p.sites)
    steps = p.site("model.layers.0.input_layernorm").steps
    assert [(st.op, st.layout, st.module) for st in steps] == [
        (FoldOp.NORM_SCALE, Layout.NORM, "model.layers.0.input_layernorm"),
        *[(FoldOp.INPUT_SHIFT, Layout.LINEAR, f"model.layers.0.self_attn.{x}_proj") for x in "qkv"]]
    assert {c.key: c.new for c in p.config_changes} == {"attention_bias": True, "mlp_bias": True}
    attn = next(c for c in p.config_changes if c.key == "attention_bias")
    assert len(attn.adds_bias_to) == 8  # q/k/v/o of both layers, so the checkpoint reloads with the flag
    assert p.summary() == ("4 sites: 4 scales folded, 2 shifts folded into gate/up biases, 2 into q/k/v biases, "
                           "0 affine modules; config: attention_bias=True, mlp_bias=True")
    assert p.untied == ()


def test_plan_accepts_a_maps_object_at_strength_one():
    from lineas.maps import SteeringMaps, effective_maps

    model = tiny_model("llama")
    maps = SteeringMaps(_maps(_norm_sites()))
    assert plan(model, maps).maps_digest == plan(model, effective_maps([(maps, 1.0)])).maps_digest


def test_plan_does_not_touch_the_model():
    model = tiny_model("llama")
    before = _state(model)
    plan(model, _maps(_norm_sites()))
    assert model.config.attention_bias is False
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_table_and_dict():
    model = tiny_model("gemma2")
    sites = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]
    p = plan(model, _maps(sites))
    table = p.to_table()
    for s in sites:
        assert s in table
    assert "-> q/k/v bias" in table
    assert "shift-only affine module: output is added to the residual stream" in table
    assert "config: attention_bias: False -> True" in table
    assert table.splitlines()[-1] == p.summary()
    d = json.loads(json.dumps(p.to_dict()))
    assert d["affine_sites"] == ["model.layers.0.post_attention_layernorm"]
    # states are written as their plain string values
    assert [(s["kind"], s["scale"], s["shift"]) for s in d["sites"]] == [
        ("rmsnorm_1p", "folded", "consumers"), ("rmsnorm_1p", "folded", "affine")]
    assert d["sites"][0]["steps"][0]["op"] == "norm_scale_1p" and d["sites"][0]["steps"][1]["layout"] == "linear"
    assert d["plan_version"] == 2 and d["notes"] == []
    assert d["sites"][1]["affine"] == {"site": sites[1], "dim": 64, "axis": -1, "scale": False, "shift": True}
    assert p.affine_sites == (sites[1],)


def test_plan_is_frozen():
    p = plan(tiny_model("llama"), _maps(_norm_sites()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sites = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.sites[0].scale = ScaleFold.AFFINE


def test_require_standard_names_every_unfoldable_site():
    model = tiny_model("mistral")  # no bias flags at all
    sites = _norm_sites()
    with pytest.raises(FoldError) as err:
        plan(model, _maps(sites), require_standard=True)
    for s in sites:
        assert s in str(err.value)
    assert "no config flag" in str(err.value)
    assert "--require-standard (Python: require_standard=True)" in str(err.value)  # names the CLI flag too
    # scale-only maps fold everywhere, so the same sites pass
    p = plan(model, _maps(sites, shift=False), require_standard=True)
    assert p.fully_folded and p.config_changes == ()


def test_scale_only_maps_switch_no_flag():
    p = plan(tiny_model("llama"), _maps(_norm_sites(), shift=False))
    assert p.config_changes == () and all(s.shift is ShiftFold.ZERO for s in p.sites)


def test_identity_map_is_a_no_op():
    model = tiny_model("llama")
    p = plan(model, {"model.norm": SiteMap.identity(64)})
    assert p.sites[0].steps == () and p.sites[0].affine is None
    before = _state(model)
    apply_plan(model, p, {"model.norm": SiteMap.identity(64)})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unknown_site():
    with pytest.raises(FoldError, match=r"unknown site 'model\.layers\.0\.input_layernorn'.*similar names"):
        plan(tiny_model("llama"), _maps(["model.layers.0.input_layernorn"]))


def test_wrong_dimension():
    with pytest.raises(FoldError, match=r"'model\.norm': map has length 32 but LlamaRMSNorm outputs 64"):
        plan(tiny_model("llama"), _maps(["model.norm"], dim=32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_maps(bad):
    m = _maps(["model.norm"])["model.norm"]
    shift = m.shift.clone()
    shift[3] = bad
    with pytest.raises(FoldError, match=r"'model\.norm': shift has 1 non-finite value\(s\) \(first at index 3\)"):
        plan(tiny_model("llama"), {"model.norm": SiteMap(m.scale, shift)})


def test_empty_maps():
    with pytest.raises(FoldError, match="empty"):
        plan(tiny_model("llama"), {})


def test_apply_refuses_other_maps():
    model = tiny_model("llama")
    p = plan(model, _maps(_norm_sites(), seed=0))
    with pytest.raises(FoldError, match="digest"):
        apply_plan(model, p, _maps(_norm_sites(), seed=1))


def test_overflow_leaves_model_unchanged():
    """fp16 overflow is caught before anything is written (config included)."""
    model = tiny_model("llama").half()
    maps = _maps(_norm_sites())
    site = "model.layers.1.post_attention_layernorm"
    maps[site] = SiteMap(torch.full((64,), 1e6), maps[site].shift)
    p = plan(model, maps)
    before = _state(model)
    with pytest.raises(FoldError, match=rf"{site}\.weight .*non-finite .*nothing was changed"):
        apply_plan(model, p, maps)
    assert model.config.attention_bias is False and model.config.mlp_bias is False
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_tied_output_embedding_is_never_written_unless_untied():
    model = tiny_model("llama_tied")
    maps = _maps(["lm_head"], dim=128)
    p = plan(model, maps)
    assert p.affine_sites == ("lm_head",) and p.untied == ()
    assert "tied to model.embed_tokens.weight" in p.sites[0].reason
    assert "pass --untie-embeddings (Python: untie=True)" in p.sites[0].reason
    p2 = plan(model, maps, untie=True)
    # the scale folds into the untied copy; lm_head has no bias (nor a flag), so the shift stays affine
    assert p2.sites[0].scale is ScaleFold.FOLDED and p2.affine_specs[0].shift and not p2.affine_specs[0].scale
    assert plan(model, _maps(["lm_head"], dim=128, shift=False), untie=True).fully_folded
    assert [u.parameter for u in p2.untied] == ["lm_head.weight"]
    assert ("tie_word_embeddings", True, False) in [(c.key, c.old, c.new) for c in p2.config_changes]


def test_unknown_arch_plans_by_module_type():
    import transformers as tf

    cfg = tf.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                              tie_word_embeddings=False)
    model = tf.GPTBigCodeForCausalLM(cfg).eval()  # no registry entry
    # the output head: a bias-free linear
    head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
    sites = ["transformer.h.0.ln_1", "transformer.h.0.mlp.c_proj", "transformer.h.1", head]
    dims = {head: 128}
    g = torch.Generator().manual_seed(0)
    maps = {s: SiteMap(1 + 0.3 * torch.randn(dims.get(s, 64), generator=g), torch.randn(dims.get(s, 64), generator=g))
            for s in sites}
    p = plan(model, maps)
    assert p.registry is None
    by = {s.site: s for s in p.sites}
    assert by[sites[0]].kind is SiteKind.LAYERNORM and by[sites[0]].fully_folded
    assert by[sites[0]].source == "module type"
    assert by[sites[1]].kind is SiteKind.LINEAR and by[sites[1]].fully_folded
    assert by[sites[2]].affine is not None and by[sites[2]].affine.scale and by[sites[2]].affine.shift
    # the head has no bias and no flag: scale folds into rows, shift needs an affine module
    assert by[head].scale is ScaleFold.FOLDED and by[head].affine.shift and not by[head].affine.scale
    ids = random_ids()
    with torch.no_grad():
        base = model(ids).logits
        with attach_affine(model, {s: (m.scale, m.shift) for s, m in maps.items()}):
            hooked = model(ids).logits
    assert not torch.allclose(hooked, base, atol=1e-3)  # the maps change the output
    apply_plan(model, p, maps)
    with torch.no_grad():
        baked = model(ids).logits
    assert float((baked - hooked).abs().max() / hooked.abs().max()) <= 1e-5  # and the bake reproduces it


def test_own_bias_and_states_are_enums():
    """gpt2's LayerNorm has a bias: scale and shift fold into the norm itself; states are enum members."""
    p = plan(tiny_model("gpt2"), _maps(["transformer.h.0.ln_1"]))
    (sp,) = p.sites
    assert (sp.kind, sp.scale, sp.shift) == (SiteKind.LAYERNORM, ScaleFold.FOLDED, ShiftFold.OWN_BIAS)
    assert [st.op for st in sp.steps] == [FoldOp.NORM_SCALE, FoldOp.NORM_BIAS]
    assert "-> own bias" in p.to_table() and "1 shift folded into own bias" in p.summary()
    assert json.loads(json.dumps(p.to_dict()))["sites"][0]["shift"] == "own_bias"


def test_a_misspelt_state_is_refused_at_construction():
    with pytest.raises(ValueError, match="'folded ' is not a valid ScaleFold"):
        SitePlan(site="x", module_class="Linear", kind=SiteKind.LINEAR, source="module type", scale="folded ",
                 shift=ShiftFold.ZERO)
