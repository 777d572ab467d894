"""The dense architectures added to the registry (gpt_neox, olmo2, granite, phi, starcoder2, smollm3, stablelm,
cohere), and checkpoint keys renamed by transformers' own conversion mapping in the out-of-core bake (GPT-NeoX
stores ``embed_out``, which transformers 5 loads into ``lm_head``).  Tiny random fp32 models with randomised norms;
run under transformers 4.57 and 5."""

from __future__ import annotations

import pytest
import torch
from bake_fixtures import assert_close_rel, hooked_and_base, load, logits, make_maps
from test_bake_archs import _rel
from tiny import random_ids, tiny_model

from bake import bake
from bake.api import bake_folder
from bake.cli.main import main
from bake.errors import FoldError
from bake.plan.planner import ScaleFold, plan
from bake.registry.llm import entry_for, expand
from bake.store.key_names import ConvertedCheckpointError, SavedNames, loaded_names
from bake.store.shards import ShardFolder
from lineas.evaluate import model_logits
from lineas.hooks import attach_maps, module_feature_dim
from lineas.maps import SiteMap, SteeringMaps, effective_maps

NEW = ("gpt_neox", "olmo2", "granite", "phi", "starcoder2", "smollm3", "stablelm", "cohere")
# Sites whose shift no bias can take (the rest fold into own, consumer or flag-enabled biases).
SHIFT_REFUSED = {
    "gpt_neox": set(),
    "phi": set(),
    "granite": {"model.norm", "lm_head"},
    "olmo2": {"model.layers.{layer}.self_attn.q_norm", "model.layers.{layer}.self_attn.k_norm",
              "model.layers.{layer}.post_attention_layernorm", "model.layers.{layer}.post_feedforward_layernorm",
              "model.layers.{layer}.mlp.gate_proj", "model.layers.{layer}.mlp.up_proj",
              "model.layers.{layer}.mlp.down_proj", "model.norm", "lm_head"},
    "starcoder2": {"lm_head"},  # LayerNorms with biases; use_bias (on) gives every other linear a bias
    "smollm3": {"model.norm", "lm_head"},
    "stablelm": {"model.layers.{layer}.self_attn.o_proj", "model.layers.{layer}.mlp.gate_proj",
                 "model.layers.{layer}.mlp.up_proj", "model.layers.{layer}.mlp.down_proj", "lm_head"},
    # input_layernorm feeds q/k/v (attention_bias) and gate/up (never a bias): its shift has no bias in gate/up
    "cohere": {"model.layers.{layer}.input_layernorm", "model.layers.{layer}.mlp.gate_proj",
               "model.layers.{layer}.mlp.up_proj", "model.layers.{layer}.mlp.down_proj", "model.norm", "lm_head"},
}


def _registry_sites(model) -> dict[str, str]:
    """Every module an entry names (norms and producers) -> its template."""
    entry = entry_for(model.config)
    layers = [str(i) for i in range(model.config.num_hidden_layers)]
    out = {}
    for t in [n.site for n in entry.norms] + [p.site for p in entry.producers]:
        for layer in layers if "{layer}" in t else [None]:
            out[expand(t, layer)] = t
    return out


def _maps(model, sites, *, shift: bool, seed: int = 0) -> SteeringMaps:
    g = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    out = {}
    for s in sites:
        d = module_feature_dim(modules[s]) or model.config.hidden_size
        scale = 1 + 0.2 * torch.randn(d, generator=g)
        out[s] = SiteMap(scale, 0.2 * torch.randn(d, generator=g) if shift else torch.zeros(d))
    return SteeringMaps(out, {"method": "test"})


def _check_exact(model, maps, **kw):
    ids = random_ids()
    base = model_logits(model, ids)
    with attach_maps(model, maps, 1.0):
        hooked = model_logits(model, ids)
    assert _rel(hooked, base) > 1e-2, "the maps must change the output, or the test proves nothing"
    baked = bake(model, maps, 1.0, verify_tokens=4, **kw)
    assert baked.verified, baked.report.failures
    assert _rel(model_logits(baked.model, ids), hooked) <= 1e-5
    return baked


@pytest.mark.parametrize("arch", NEW)
def test_scale_only_maps_fold_into_standard_weights(arch):
    model = tiny_model(arch)
    sites = _registry_sites(model)
    baked = _check_exact(model, _maps(model, sites, shift=False), require_standard=True)
    assert baked.plan.fully_folded and not baked.plan.affine_sites and not baked.plan.config_changes
    assert all(s.scale is ScaleFold.FOLDED for s in baked.plan.sites)


@pytest.mark.parametrize("arch", NEW)
def test_shifts_fold_where_biases_allow_else_require_standard_names_them(arch):
    model = tiny_model(arch)
    sites = _registry_sites(model)
    maps = _maps(model, sites, shift=True)
    refused = sorted(s for s, t in sites.items() if t in SHIFT_REFUSED[arch])
    p = plan(model, effective_maps([(maps, 1.0)]))
    assert sorted(p.affine_sites) == refused
    if refused:
        with pytest.raises(FoldError) as e:
            plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
        assert all(s in str(e.value) for s in refused)
        standard = {s: maps[s] for s in sites if s not in refused}
        _check_exact(tiny_model(arch), SteeringMaps(standard, {"method": "test"}), require_standard=True)
    _check_exact(model, maps)  # with affine modules for the rest: still exact


# the producers whose shift switches each flag on (every flag of the entry)
FLAG_SITES = {
    "granite": (("q_proj", "o_proj", "down_proj"), {"attention_bias", "mlp_bias"}),
    "olmo2": (("q_proj", "o_proj"), {"attention_bias"}),
    "smollm3": (("q_proj", "o_proj", "down_proj"), {"attention_bias", "mlp_bias"}),
    "stablelm": (("q_proj", "k_proj", "v_proj"), {"use_qkv_bias"}),
    "cohere": (("q_proj", "o_proj"), {"attention_bias"}),
}


@pytest.mark.parametrize("arch", sorted(FLAG_SITES))
def test_shifts_switch_the_bias_flags_on(arch):
    suffixes, flags = FLAG_SITES[arch]
    model = tiny_model(arch)
    sites = [s for s in _registry_sites(model) if s.endswith(suffixes)]
    maps = _maps(model, sites, shift=True)
    p = plan(model, effective_maps([(maps, 1.0)]), require_standard=True)
    assert {c.key for c in p.config_changes} == flags, arch
    _check_exact(model, maps, require_standard=True)


def test_starcoder2_use_bias_off_is_switched_back_on_by_a_shift():
    """StarCoder2 checkpoints have use_bias on; one without: a producer shift switches it on for every linear."""
    import transformers as tf
    from tiny import COMMON
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tf.Starcoder2Config(**COMMON, use_bias=False, tie_word_embeddings=False, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    maps = _maps(model, ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.c_proj"], shift=True)
    baked = _check_exact(model, maps, require_standard=True)
    assert [c.key for c in baked.plan.config_changes] == ["use_bias"]
    assert baked.model.model.layers[1].mlp.c_fc.bias is not None


# -- checkpoint keys through transformers' conversion mapping ---------------------------------------------------
def test_gpt_neox_streamed_bake_keeps_embed_out_and_reloads_with_plain_transformers(tmp_path, capsys):
    """transformers 5 loads GPT-NeoX's stored embed_out.weight into lm_head.weight (its conversion mapping) and
    saves it back as embed_out.weight; 4.x names the module embed_out.  The out-of-core bake reads and writes the
    checkpoint's keys the same way, under both majors."""
    model = tiny_model("gpt_neox")
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="12KB")
    assert "embed_out.weight" in ShardFolder(src) and "lm_head.weight" not in ShardFolder(src)
    sites = ("gpt_neox.layers.0.input_layernorm", "gpt_neox.layers.1.post_attention_layernorm",
             "gpt_neox.layers.1.attention.dense")
    maps_path = make_maps(sites, magnitude=0.2).save(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    assert main(["--model", str(src), "--maps", str(maps_path), "--out", str(out), "--require-standard",
                 "--verify-tokens", "4"]) == 0, capsys.readouterr().err
    written = ShardFolder(out)
    assert sorted(written.keys()) == sorted(ShardFolder(src).keys())  # the names save_pretrained writes
    hooked, base = hooked_and_base(src, maps_path, 1.0)
    assert (hooked - base).abs().max() > 1e-2
    assert_close_rel(logits(load(out)), hooked)


def test_gpt_neox_affine_output_head_streams_and_reloads(tmp_path):
    """An affine module at the output head: its wrapped weight is saved under the name transformers writes."""
    model = tiny_model("gpt_neox")
    src = tmp_path / "src"
    model.save_pretrained(src)
    head = "lm_head" if hasattr(model, "lm_head") else "embed_out"
    g = torch.Generator().manual_seed(0)
    d = model.config.vocab_size
    maps = SteeringMaps({head: SiteMap(1 + 0.3 * torch.randn(d, generator=g), 0.3 * torch.randn(d, generator=g)),
                         "gpt_neox.layers.0.input_layernorm": SiteMap(1 + 0.3 * torch.randn(64, generator=g),
                                                                      0.3 * torch.randn(64, generator=g))},
                        {"method": "test"})
    maps_path = maps.save(tmp_path / "m.safetensors")
    baked = bake_folder(src, maps_path)
    assert baked.plan.affine_sites == (head,)
    out = baked.save_pretrained(tmp_path / "out")
    assert baked.export_report.passed
    assert "embed_out.inner.weight" in ShardFolder(out)
    hooked, _ = hooked_and_base(src, maps_path, 1.0)
    assert_close_rel(logits(load(out, trust_remote_code=True)), hooked)


def test_key_names_follow_transformers_both_ways():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    model = tiny_model("gpt_neox")
    keys = list(model.state_dict())
    names = loaded_names(model, ["embed_out.weight", *[k for k in keys if k.startswith("gpt_neox.")]])
    head = "lm_head" if hasattr(model, "lm_head") else "embed_out"
    assert names["embed_out.weight"] == f"{head}.weight"
    assert SavedNames(model)(f"{head}.weight") == "embed_out.weight"
    # a checkpoint of the bare base model (no base_model_prefix): transformers adds the prefix at load
    bare = loaded_names(model, ["embed_in.weight", "final_layer_norm.weight"])
    assert bare == {"embed_in.weight": "gpt_neox.embed_in.weight",
                    "final_layer_norm.weight": "gpt_neox.final_layer_norm.weight"}
    with init_empty_weights():
        llama = AutoModelForCausalLM.from_config(tiny_model("llama").config)
    assert loaded_names(llama, ["model.norm.weight"]) == {"model.norm.weight": "model.norm.weight"}


def test_checkpoint_keys_transformers_fuses_at_load_are_refused_by_name():
    """transformers 5 fuses per-expert MoE tensors into one parameter at load: no stored tensor to fold."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x loads MoE experts as they are stored")
    cfg = transformers.Qwen2MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=2,
                                      moe_intermediate_size=32, shared_expert_intermediate_size=32)
    with init_empty_weights():
        moe = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConvertedCheckpointError, match=r"model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        loaded_names(moe, ["model.norm.weight", "model.layers.0.mlp.experts.0.gate_proj.weight"])
