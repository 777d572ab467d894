"""Mixture-of-experts architectures in the registry (gpt_oss, mixtral, qwen3_moe, qwen2_moe, olmoe, granitemoe,
deepseek_v3): the router reads the post_attention_layernorm output beside every expert (and Qwen2-MoE's shared expert
and its gate, DeepSeek-V3's shared experts).  A norm scale folds into the norm, reaching router and experts exactly; a
norm shift folds only where router and experts have biases (GPT-OSS: ``router.bias``, and per expert
``gate_up_proj_bias[e] += t @ gate_up_proj[e]``), else ``--require-standard`` refuses it naming the sites.
Tiny random fp32 models with randomised norms; run under transformers 4.57 and 5."""

from __future__ import annotations

import pytest
import torch
from test_bake_archs import _rel
from tiny import MOE_ARCHS, random_ids, tiny_model

from bake import bake
from bake.core.fold_math import fold_experts_input_shift
from bake.errors import FoldError, VerificationError
from bake.plan.foldable import plan_foldable
from bake.plan.planner import FoldOp, ScaleFold, ShiftFold, plan
from bake.plan.runtimes import Serves
from bake.registry.llm import Runtime, entry_for, expand
from lineas.evaluate import model_logits
from lineas.hooks import attach_maps, module_feature_dim
from lineas.maps import SiteMap, SteeringMaps, effective_maps

POST = "model.layers.{layer}.post_attention_layernorm"


def _norm_sites(model) -> dict[str, str]:
    """Every norm the entry names -> its template."""
    entry = entry_for(model.config)
    assert entry is not None and entry.describes(model)
    out = {}
    for t in (n.site for n in entry.norms):
        for layer in range(model.config.num_hidden_layers) if "{layer}" in t else [None]:
            out[expand(t, None if layer is None else str(layer))] = t
    return out


def _maps(model, sites, *, shift: bool, seed: int = 0) -> SteeringMaps:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for s in sites:
        d = module_feature_dim(modules[s]) or model.config.hidden_size
        out[s] = SiteMap(1 + 0.2 * torch.randn(d, generator=g),
                         0.2 * torch.randn(d, generator=g) if shift else torch.zeros(d))
    return SteeringMaps(out, {"method": "test"})


def _hooked(model, maps, ids):
    base = model_logits(model, ids)
    with attach_maps(model, maps, 1.0):
        hooked = model_logits(model, ids)
    assert _rel(hooked, base) > 1e-2, "the maps must change the output, or the test proves nothing"
    return hooked


def _check_exact(model, maps, **kw):
    ids = random_ids()
    hooked = _hooked(model, maps, ids)
    baked = bake(model, maps, 1.0, verify_tokens=4, **kw)
    assert baked.verified, baked.report.failures
    assert _rel(model_logits(baked.model, ids), hooked) <= 1e-5
    return baked, hooked


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_scale_only_maps_are_standard_and_reload_with_plain_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model(arch)
    maps = _maps(model, _norm_sites(model), shift=False)
    baked, hooked = _check_exact(model, maps, require_standard=True)
    assert baked.plan.fully_folded and not baked.plan.config_changes
    assert all(s.scale is ScaleFold.FOLDED for s in baked.plan.sites)
    out = baked.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__  # a standard class: no remote code
    assert _rel(model_logits(reloaded, random_ids()), hooked) <= 1e-5


def test_gpt_oss_shift_folds_into_router_and_expert_biases_leaving_expert_weights_untouched():
    model = tiny_model("gpt_oss")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    maps = _maps(model, _norm_sites(model), shift=True)
    p = plan(model, effective_maps([(maps, 1.0)]))
    post = p.site("model.layers.0.post_attention_layernorm")
    assert post.shift is ShiftFold.CONSUMERS
    assert post.shift_targets == ("model.layers.0.mlp.router", "model.layers.0.mlp.experts")
    assert [s.op for s in post.steps] == [FoldOp.NORM_SCALE, FoldOp.TENSOR_INPUT_SHIFT, FoldOp.TENSOR_INPUT_SHIFT]
    assert p.site("model.layers.0.input_layernorm").shift is ShiftFold.CONSUMERS  # q/k/v biases (attention_bias)
    # model.norm feeds the bias-free lm_head: the one site without a bias to take a shift
    assert p.affine_sites == ("model.norm",)
    maps = SteeringMaps({s: m for s, m in maps.maps.items() if s != "model.norm"}, {"method": "test"})
    baked, _ = _check_exact(model, maps, require_standard=True)
    after = dict(baked.model.named_parameters())
    for layer in range(model.config.num_hidden_layers):
        pre = f"model.layers.{layer}.mlp."
        for name in ("experts.gate_up_proj", "experts.down_proj", "experts.down_proj_bias", "router.weight"):
            assert torch.equal(after[pre + name], before[pre + name]), name  # byte-identical: only read
        for name in ("router.bias", "experts.gate_up_proj_bias"):
            assert not torch.equal(after[pre + name], before[pre + name]), name
    v = {x.runtime: x for x in baked.plan.runtimes}
    assert all(v[r].serves is Serves.YES for r in (Runtime.TRANSFORMERS, Runtime.LLAMA_CPP, Runtime.VLLM, Runtime.MLX))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "granitemoe", "deepseek_v3"])
def test_router_and_expert_shift_is_refused_by_require_standard_naming_the_sites(arch):
    model = tiny_model(arch)
    sites = [s for s, t in _norm_sites(model).items() if t == POST]
    maps = _maps(model, sites, shift=True)
    with pytest.raises(FoldError) as e:
        plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
    assert all(s in str(e.value) for s in sites) and "router" in str(e.value)
    baked, _ = _check_exact(tiny_model(arch), maps)  # with shift-only affine modules: still exact
    assert sorted(baked.plan.affine_sites) == sorted(sites)
    assert all(not baked.plan.site(s).affine.scale for s in sites)  # the scale folded into the norm


# Norms whose shift no bias takes (every other norm of the entry folds its shift into q/k/v biases)
SHIFT_REFUSED = {
    "qwen2_moe": {POST, "model.norm"},  # q/k/v biases always exist (qkv_bias, on); bias-free lm_head
    "olmoe": {POST, "model.norm", "model.layers.{layer}.self_attn.q_norm", "model.layers.{layer}.self_attn.k_norm"},
    "granitemoe": {POST, "model.norm"},
    # MLA: q_a_layernorm / kv_a_layernorm feed q_b_proj / kv_b_proj, which never have a bias
    "deepseek_v3": {POST, "model.norm", "model.layers.{layer}.self_attn.q_a_layernorm",
                    "model.layers.{layer}.self_attn.kv_a_layernorm"},
}


@pytest.mark.parametrize("arch", sorted(SHIFT_REFUSED))
def test_norm_shifts_fold_where_biases_allow_else_require_standard_names_them(arch):
    model = tiny_model(arch)
    sites = _norm_sites(model)
    maps = _maps(model, sites, shift=True)
    refused = sorted(s for s, t in sites.items() if t in SHIFT_REFUSED[arch])
    assert sorted(plan(model, effective_maps([(maps, 1.0)])).affine_sites) == refused
    with pytest.raises(FoldError) as e:
        plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
    assert all(s in str(e.value) for s in refused)
    standard = SteeringMaps({s: maps[s] for s in sites if s not in refused}, {"method": "test"})
    baked, _ = _check_exact(tiny_model(arch), standard, require_standard=True)
    assert {c.key for c in baked.plan.config_changes} == (set() if arch == "qwen2_moe" else {"attention_bias"})
    _check_exact(tiny_model(arch), maps)  # with shift-only affine modules for the rest: still exact


def test_qwen2_moe_scale_reaches_the_shared_expert_and_its_gate():
    """The post-attention norm feeds router, experts, shared expert and shared_expert_gate: its scale folds into the
    norm, which they all read; none of their weights is written."""
    model = tiny_model("qwen2_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    maps = _maps(model, [expand(POST, "0"), expand(POST, "1")], shift=False)
    baked, _ = _check_exact(model, maps, require_standard=True)
    after = dict(baked.model.named_parameters())
    assert before and all(torch.equal(after[n], p) for n, p in before.items())
    assert any(".shared_expert_gate." in n for n in before)


def test_deepseek_v3_entry_names_real_modules():
    """Each template of the entry names modules of the tiny DeepSeek-V3 (with and without q_lora_rank) of the class it
    says; the consumers are linears.  Some exist only in one kind of layer or attention: q_a_* and q_b_proj with
    q_lora_rank, q_proj without; the dense mlp.*_proj in the first_k_dense_replace layers, shared experts after."""
    from bake.plan.module_kinds import producer_layout
    from bake.registry.llm import match_template

    entry, seen = None, set()
    for arch in ("deepseek_v3", "deepseek_v3_no_q_lora"):
        model = tiny_model(arch)
        entry, modules = entry_for(model.config), dict(model.named_modules())
        for name, module in modules.items():
            for norm in entry.norms:
                if (layer := match_template(norm.site, name)) is not False:
                    seen.add(norm.site)
                    assert type(module).__name__ == norm.module_class, name
                    consumers = [modules[c] for c in (expand(c, layer) for c in norm.consumers) if c in modules]
                    assert all(producer_layout(c) is not None for c in consumers), name
            for prod in entry.producers:
                if match_template(prod.site, name) is not False:
                    seen.add(prod.site)
                    assert producer_layout(module) is prod.layout, name
        assert hasattr(model.config, "attention_bias")
    assert seen == {n.site for n in entry.norms} | {p.site for p in entry.producers}


def test_deepseek_v3_scale_reaches_router_experts_and_shared_experts_leaving_them_untouched(tmp_path):
    """DeepSeek-V3: every norm of the entry (MLA's q_a_layernorm and kv_a_layernorm too) takes a scale in its own
    weight; the dense MLP of layer 0, the router (and its e_score_correction_bias), the routed and shared experts and
    the MLA up-projections are never written, and the export reloads with plain transformers."""
    model = tiny_model("deepseek_v3")
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
              if "norm" not in n}
    assert any(n.endswith("mlp.gate.e_score_correction_bias") for n in before)
    assert any(".mlp.shared_experts." in n for n in before) and any("layers.0.mlp.gate_proj" in n for n in before)
    baked, _ = _check_exact(model, _maps(model, _norm_sites(model), shift=False), require_standard=True)
    after = dict([*baked.model.named_parameters(), *baked.model.named_buffers()])
    assert all(torch.equal(after[n], t) for n, t in before.items())


def test_deepseek_v3_input_norm_shift_switches_attention_bias_on_for_the_mla_down_projections(tmp_path):
    """input_layernorm feeds q_a_proj and kv_a_proj_with_mqa, which attention_bias gives a bias (o_proj too); the
    export reloads with plain transformers, the flag on.  q_a_layernorm / kv_a_layernorm feed q_b_proj / kv_b_proj,
    which never have a bias: refused by --require-standard, naming both."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("deepseek_v3")
    site = "model.layers.1.input_layernorm"
    maps = _maps(model, [site], shift=True)
    p = plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
    assert p.site(site).shift_targets == ("model.layers.1.self_attn.q_a_proj",
                                          "model.layers.1.self_attn.kv_a_proj_with_mqa")
    assert [c.key for c in p.config_changes] == ["attention_bias"]
    baked, hooked = _check_exact(model, maps, require_standard=True)
    reloaded = AutoModelForCausalLM.from_pretrained(baked.save_pretrained(tmp_path / "out"), dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    assert reloaded.config.attention_bias and reloaded.model.layers[1].self_attn.q_a_proj.bias is not None
    assert _rel(model_logits(reloaded, random_ids()), hooked) <= 1e-5
    inner = ["model.layers.0.self_attn.q_a_layernorm", "model.layers.1.self_attn.kv_a_layernorm"]
    with pytest.raises(FoldError) as e:
        plan(model, effective_maps([(_maps(model, inner, shift=True), 1.0)]), require_standard=True)
    assert all(s in str(e.value) for s in inner)
    assert "q_b_proj has no bias" in str(e.value) and "kv_b_proj has no bias" in str(e.value)


def test_deepseek_v3_without_q_lora_scales_fold_and_the_input_norm_shift_is_refused():
    """q_lora_rank None (e.g. Moonlight): input_layernorm feeds q_proj, which never has a bias, and
    kv_a_proj_with_mqa: its shift needs an affine module; every scale still folds."""
    model = tiny_model("deepseek_v3_no_q_lora")
    assert not hasattr(model.model.layers[0].self_attn, "q_a_proj") or model.model.layers[0].self_attn.q_a_proj is None
    modules = dict(model.named_modules())
    sites = [s for s in _norm_sites(model) if s in modules]  # no q_a_layernorm
    _check_exact(model, _maps(model, sites, shift=False), require_standard=True)
    site = "model.layers.0.input_layernorm"
    maps = _maps(model, [site], shift=True)
    with pytest.raises(FoldError, match=site):
        plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
    baked, _ = _check_exact(tiny_model("deepseek_v3_no_q_lora"), maps)
    assert baked.plan.affine_sites == (site,) and not baked.plan.site(site).affine.scale


def test_input_layernorm_shift_folds_where_a_flag_gives_q_k_v_biases():
    qwen = tiny_model("qwen3_moe")
    site = "model.layers.0.input_layernorm"
    p = plan(qwen, effective_maps([(_maps(qwen, [site], shift=True), 1.0)]), require_standard=True)
    assert [c.key for c in p.config_changes] == ["attention_bias"]
    mixtral = tiny_model("mixtral")
    assert plan(mixtral, effective_maps([(_maps(mixtral, [site], shift=True), 1.0)])).affine_sites == (site,)


def test_a_skipped_router_bias_fails_verification(monkeypatch):
    """Drop the router's share of the shift: the experts' biases alone do not reproduce the hooked model."""
    import bake.plan.planner as planner

    real = planner.tensor_consumer_route

    def without_router(consumers, params, write_access):
        why, steps, needs = real(consumers, params, write_access)
        return why, tuple(s for s in steps if not s.module.endswith(".router")), needs

    monkeypatch.setattr(planner, "tensor_consumer_route", without_router)
    model = tiny_model("gpt_oss")
    maps = _maps(model, [expand(POST, "0"), expand(POST, "1")], shift=True)
    with pytest.raises(VerificationError):
        bake(model, maps, 1.0, verify_tokens=4)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_foldable_training_freezes_exactly_the_shifts_no_bias_takes(arch):
    model = tiny_model(arch)
    sites = [expand(POST, "0"), expand("model.layers.{layer}.input_layernorm", "0")]
    parts = {p.site: p for p in plan_foldable(model, {s: model.config.hidden_size for s in sites}).sites}
    assert all(p.scale for p in parts.values())
    assert parts[sites[0]].shift is (arch == "gpt_oss")
    assert parts[sites[1]].shift is (arch != "mixtral")  # Mixtral has no attention bias flag
    if arch != "gpt_oss":
        assert "router" in parts[sites[0]].shift_reason


@pytest.mark.parametrize("layout", ["experts_in_out", "experts_out_in"])
def test_experts_input_shift_is_each_experts_linear_of_the_shift(layout):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 7, generator=g)
    n_in, n_out = (5, 7) if layout == "experts_in_out" else (7, 5)
    b, t = torch.randn(3, n_out, generator=g), torch.randn(n_in, generator=g)
    got = fold_experts_input_shift(w, b, t, layout=layout)
    for e in range(3):
        x = torch.randn(4, n_in, generator=g, dtype=torch.float64)
        we = w[e].double() if layout == "experts_in_out" else w[e].double().T
        assert torch.allclose((x + t.double()) @ we + b[e].double(), x @ we + got[e].double(), atol=1e-5)
    with pytest.raises(ValueError):
        fold_experts_input_shift(w, b[:, :2], t, layout=layout)


@pytest.mark.parametrize("arch", ["gpt_oss", "mixtral"])
def test_out_of_core_bake_streams_stored_experts_and_refuses_fused_ones_by_name(arch, tmp_path, capsys):
    """The CLI reads and writes stored tensors.  GPT-OSS stores its fused experts as transformers loads them (both
    majors): its shift folds into the stored router and expert biases.  transformers 5 fuses Mixtral's per-expert
    tensors at load (a WeightConverter): the out-of-core bake refuses them by name; bake() takes them in memory."""
    import transformers
    from bake_fixtures import assert_close_rel, hooked_and_base, load, logits

    from bake.cli.main import main

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "src")
    sites = [expand(POST, "0"), "model.layers.1.input_layernorm"]
    maps = _maps(model, sites, shift=arch == "gpt_oss")
    maps.save(tmp_path / "m.safetensors")
    rc = main(["--model", str(tmp_path / "src"), "--maps", str(tmp_path / "m.safetensors"), "--out",
               str(tmp_path / "out"), "--require-standard", "--verify-tokens", "3"])
    if arch == "mixtral" and int(transformers.__version__.split(".")[0]) >= 5:
        assert rc == 2 and "WeightConverter" in capsys.readouterr().err
        return
    assert rc == 0, capsys.readouterr().err
    hooked, _ = hooked_and_base(tmp_path / "src", tmp_path / "m.safetensors", 1.0)
    assert_close_rel(logits(load(tmp_path / "out")), hooked)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(layout="conv1d"), "is not one of"),
    (lambda c: c.update(bias="model.layers.{layer}.mlp.gate_up_proj_bias"), "must belong to one module"),
    (lambda c: c.update(scale="x"), "unknown key"),
])
def test_tensor_consumers_are_validated(mutate, message):
    import copy
    import json
    from importlib import resources

    from bake.registry.llm import RegistryError, parse_entry

    data = json.loads(resources.files("bake.registry").joinpath("archs/gpt_oss.json").read_text())
    data = copy.deepcopy(data)
    mutate(data["norms"][1]["tensor_consumers"][1])
    with pytest.raises(RegistryError, match=message):
        parse_entry(data, "test")
