"""The fold-sites registry: strict validation, and every entry checked against real (tiny) models."""

import copy
import json
from importlib import resources

import pytest
import torch
from tiny import ARCHS, tiny_model

from bake.plan.planner import ScaleFold, ShiftFold, SiteKind, plan, producer_layout
from bake.registry.llm import RegistryError, entry_for, load_registry, match_template, parse_entry
from lineas.maps import SiteMap

BIAS_FLAGS = ("attention_bias", "mlp_bias")


def _raw(model_type):
    return json.loads(resources.files("bake.registry").joinpath("archs", f"{model_type}.json").read_text())


def _layers(model):
    return [str(i) for i in range(model.config.num_hidden_layers)]


def test_every_tiny_arch_has_an_entry():
    reg = load_registry()
    for arch in ARCHS:
        assert entry_for(tiny_model(arch).config) is not None, arch
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2", "phi3"} <= set(reg)


@pytest.mark.parametrize("arch", ARCHS)
def test_entry_matches_the_model(arch):
    """Every template names real modules of the right class; consumers are linears; flags exist."""
    model = tiny_model(arch)
    entry = entry_for(model.config)
    modules = dict(model.named_modules())
    assert type(model).__name__ in entry.architectures
    for norm in entry.norms:
        for layer in _layers(model) if "{layer}" in norm.site else [None]:
            name = norm.site if layer is None else norm.site.replace("{layer}", layer)
            assert name in modules, name
            assert type(modules[name]).__name__ == norm.module_class, name
            for c in norm.consumers:
                c = c if layer is None else c.replace("{layer}", layer)
                assert producer_layout(modules[c]) in ("linear", "conv1d"), c
    for prod in entry.producers:
        name = prod.site.replace("{layer}", "0")
        assert producer_layout(modules[name]) == prod.layout, name
    for flag, templates in entry.bias_flags.items():
        assert hasattr(model.config, flag), flag
        assert templates
    # Flags the registry does not list must really be absent from the config (transformers 4.57),
    # otherwise we would miss a fold.
    for flag in BIAS_FLAGS:
        if flag not in entry.bias_flags:
            assert not hasattr(model.config, flag), f"{arch}: config has {flag} but the registry ignores it"


def test_registry_bias_flag_really_adds_biases():
    """llama's attention_bias/mlp_bias switch on exactly the linears the registry says."""
    import transformers as tf
    from tiny import COMMON

    cfg = tf.LlamaConfig(**COMMON, attention_bias=True, mlp_bias=True)
    model = tf.LlamaForCausalLM(cfg)
    entry = entry_for(cfg)
    biased = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    flagged = {n for n, _ in model.named_modules()
               if any(match_template(t, n) is not False for ts in entry.bias_flags.values() for t in ts)}
    assert biased == flagged


def test_match_template():
    assert match_template("model.layers.{layer}.mlp", "model.layers.12.mlp") == "12"
    assert match_template("model.layers.{layer}.mlp", "model.layers.x.mlp") is False
    assert match_template("model.layers.{layer}.mlp", "model.layers.1.mlp.up") is False
    assert match_template("model.norm", "model.norm") is None
    assert match_template("model.norm", "model.norm2") is False


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(bogus=1), "unknown key"),
    (lambda d: d["norms"][0].update(kind="batchnorm"), "kind 'batchnorm'"),
    (lambda d: d["norms"][0].update(colour="red"), "unknown key"),
    (lambda d: d["norms"][0].pop("consumers"), "missing key"),
    (lambda d: d["norms"][0].update(site="model.layers.{layr}.x"), "unknown placeholder"),
    (lambda d: d["norms"][0]["consumers"].append("model.layers.{layer}.nowhere"), "not listed under 'producers'"),
    (lambda d: d["producers"][0].update(layout="conv3d"), "layout 'conv3d'"),
    (lambda d: d.update(bias_flags={"attention_bias": "q_proj"}), "expected a list"),
    (lambda d: d.update(tied=[["lm_head.weight", "model.embed_tokens.weight"]]), r"unknown key\(s\) \['tied'\]"),
    (lambda d: d.update(always_biased=[]), r"unknown key\(s\) \['always_biased'\]"),
    (lambda d: d["norms"][0].pop("module_class"), r"missing key\(s\) \['module_class'\]"),
    (lambda d: d["norms"][0].update(module_class=""), "'module_class' must name"),
    (lambda d: d.update(architectures=[]), "'architectures' must be a non-empty list"),
    (lambda d: d.update(norms={}), "'norms' must be list"),
    (lambda d: d.update(notes="free text"), r"unknown key\(s\) \['notes'\]"),  # remarks live in the docs
    (lambda d: d["norms"][0].update(note="read by q/k/v"), "'note' .* only with an empty 'consumers'"),
])
def test_validator_rejects(mutate, message):
    data = copy.deepcopy(_raw("llama"))
    mutate(data)
    with pytest.raises(RegistryError, match=message):
        parse_entry(data, "test")


def test_validator_accepts_shipped_files():
    for model_type in load_registry():
        assert parse_entry(_raw(model_type)).model_type == model_type


def test_a_norm_note_is_the_reason_for_a_shift_nothing_reads():
    """``note`` (only on a norm no linear reads) is what the plan says about the shift it cannot fold."""
    entry = load_registry()["gemma2"]
    norm, _ = entry.match_norm("model.layers.0.post_attention_layernorm")
    assert norm.consumers == () and "residual stream" in norm.note
    assert all(n.note == "" for e in load_registry().values() for n in e.norms if n.consumers)


# -- the registry drives the planner: where entry and model disagree, the plan says so --------------------
def _maps(sites, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s: SiteMap(1 + 0.2 * torch.randn(dim, generator=g), 0.2 * torch.randn(dim, generator=g)) for s in sites}


class OddNorm(torch.nn.Module):
    """A norm of a class no rule knows: the registry's convention must not be assumed for it."""

    def __init__(self, dim):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()


def _swap(model, name, new):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
    return model


def _conv1d(n_in, n_out):
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(n_out, n_in)
    torch.nn.init.normal_(c.weight, std=0.1)
    return c


L0 = "model.layers.0"
# (what is swapped in, site steered, expected site kind, scale, shift, words the affine reason must hold, plan note)
MISMATCHES = [
    pytest.param("model.norm", lambda: torch.nn.RMSNorm(64), "model.norm", SiteKind.RMSNORM, ScaleFold.FOLDED,
                 ShiftFold.AFFINE, "registry 'llama' expects a LlamaRMSNorm at model.norm, the model has a RMSNorm",
                 "registry 'llama' expects a LlamaRMSNorm at model.norm, the model has a RMSNorm: "
                 "planned by module type",
                 id="norm-class-known-by-type"),
    pytest.param("model.norm", lambda: OddNorm(64), "model.norm", SiteKind.MODULE, ScaleFold.AFFINE, ShiftFold.AFFINE,
                 "the model has a OddNorm; no exact fold is known for a OddNorm output",
                 "registry 'llama' expects a LlamaRMSNorm at model.norm, the model has a OddNorm: "
                 "planned by module type",
                 id="norm-class-unknown"),
    pytest.param(f"{L0}.self_attn.o_proj", lambda: _conv1d(64, 64), f"{L0}.self_attn.o_proj", SiteKind.CONV1D,
                 ScaleFold.FOLDED, ShiftFold.OWN_BIAS, None,
                 f"registry 'llama' lists {L0}.self_attn.o_proj as a linear layer, the model has a Conv1D: "
                 "planned by module type", id="producer-layout"),
    pytest.param(f"{L0}.self_attn.q_proj", lambda: _conv1d(64, 64), f"{L0}.input_layernorm", SiteKind.RMSNORM,
                 ScaleFold.FOLDED, ShiftFold.AFFINE,
                 f"consumer {L0}.self_attn.q_proj: registry 'llama' lists {L0}.self_attn.q_proj as a linear layer, "
                 "the model has a Conv1D",
                 f"registry 'llama' lists {L0}.self_attn.q_proj as a linear layer, the model has a Conv1D: "
                 "shift not folded into it", id="consumer-layout"),
]


@pytest.mark.parametrize("swap, make, site, kind, scale, shift, reason, note", MISMATCHES)
def test_registry_mismatch_is_named_and_the_bake_stays_exact(swap, make, site, kind, scale, shift, reason, note):
    from bake.api import bake
    from lineas.maps import SteeringMaps

    model = _swap(tiny_model("llama"), swap, make())
    maps = _maps([site])
    p = plan(model, maps)
    (sp,) = p.sites
    assert (sp.kind, sp.scale, sp.shift) == (kind, scale, shift)
    assert p.registry == "llama" and p.notes == (note,)
    assert f"note: {note}" in p.to_table()
    if reason is None:
        assert sp.fully_folded
    else:
        assert reason in sp.reason
    baked = bake(model, SteeringMaps(maps), verify_tokens=2)
    assert baked.verified


def test_unmatched_registry_entry_is_still_used_where_it_agrees():
    """Control for the table above: the same sites on the unmodified model follow the registry."""
    model = tiny_model("llama")
    p = plan(model, _maps(["model.norm", f"{L0}.self_attn.o_proj", f"{L0}.input_layernorm"]))
    assert p.notes == ()
    assert [s.source for s in p.sites] == ["registry:llama"] * 3
    assert p.site(f"{L0}.input_layernorm").shift is ShiftFold.CONSUMERS


def test_architecture_not_listed_means_entry_not_used():
    import transformers as tf
    from tiny import COMMON

    model = tf.LlamaForSequenceClassification(tf.LlamaConfig(**COMMON, num_labels=2)).eval()
    site = f"{L0}.input_layernorm"
    p = plan(model, _maps([site]))
    assert p.registry is None and p.model_type == "llama"
    assert p.notes == ("registry entry 'llama' describes LlamaForCausalLM, not LlamaForSequenceClassification: "
                       "every site is planned by module type",)
    assert p.sites[0].kind is SiteKind.MODULE and p.sites[0].source == "module type"
    # the class the entry lists follows it
    assert plan(tiny_model("llama"), _maps([site])).registry == "llama"
