"""An export with affine modules is a model type of its own: it loads only with ``trust_remote_code=True``.

Before, such an export kept the base ``model_type`` and ``architectures`` and carried its code only in
``auto_map``: loaded without ``trust_remote_code`` (the default) it became the plain base class, the affine
parameters were dropped and the logits were wrong, silently.  Now ``config.json`` says
``model_type: "lineas_<base>"`` and ``architectures: ["LineasSteered<Base>"]``, and transformers refuses to
load it without the flag (its own error names ``trust_remote_code=True``); with the flag it is the exact
baked model.  Checked on every registry architecture, in transformers 4.57 (``.venv``) and 5.x
(``.venv-tf5/bin/python -m pytest tests/test_remote_code_type.py``).
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from bake_fixtures import GEMMA2_SITES, setup_model, write_maps
from tiny import random_ids, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from bake import bake_folder
from bake.cli.main import main
from bake.fold.execute import apply_plan
from bake.fold.remote_code import MODELING_FILE, lineas_model_type, write_remote_code
from bake.plan.planner import plan
from bake.registry.llm import load_registry
from lineas.evaluate import model_logits
from lineas.hooks import attach_maps
from lineas.maps import SiteMap, SteeringMaps, effective_maps

# registry model_type -> (tiny architecture, a site whose shift nothing in the model can take)
AFFINE_CASES = {
    "llama": ("llama", "model.norm"), "mistral": ("mistral", "model.norm"), "qwen2": ("qwen2", "model.norm"),
    "qwen3": ("qwen3", "model.norm"), "gemma": ("gemma", "model.norm"), "gemma2": ("gemma2", "model.norm"),
    "gemma3_text": ("gemma3_text", "model.norm"), "phi3": ("phi3", "model.norm"), "gpt2": ("gpt2", "lm_head"),
    "gpt_neox": ("gpt_neox", "gpt_neox.layers.1"), "olmo2": ("olmo2", "model.norm"),
    "granite": ("granite", "model.norm"), "phi": ("phi", "model.layers.1"),
    "gpt_oss": ("gpt_oss", "model.norm"), "mixtral": ("mixtral", "model.norm"),
    "qwen3_moe": ("qwen3_moe", "model.norm"), "starcoder2": ("starcoder2", "lm_head"),
    "smollm3": ("smollm3", "model.norm"), "stablelm": ("stablelm", "lm_head"), "cohere": ("cohere", "model.norm"),
    "qwen2_moe": ("qwen2_moe", "model.norm"), "olmoe": ("olmoe", "model.norm"),
    "granitemoe": ("granitemoe", "model.norm"), "deepseek_v3": ("deepseek_v3", "model.norm"),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch):
    """transformers asks on a terminal whether to run custom code; here nobody answers (as in CI or a pipe)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))


def _baked_export(arch: str, site: str, out):
    """A tiny model with an affine module at ``site``, baked in memory and exported (save_pretrained +
    write_remote_code). Returns (model type, base, hooked, baked logits, the baked model)."""
    model = tiny_model(arch)
    dim = model.config.vocab_size if site == "lm_head" else model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    maps = SteeringMaps({site: SiteMap(1 + 0.3 * torch.randn(dim, generator=g), 0.5 * torch.randn(dim, generator=g))},
                        {"method": "test"})
    ids = random_ids()
    base = model_logits(model, ids)
    with attach_maps(model, maps, 1.0):
        hooked = model_logits(model, ids)
    eff = effective_maps([(maps, 1.0)])
    p = plan(model, eff)
    assert p.affine_sites == (site,), f"{arch}: {site} must need an affine module for this test to mean anything"
    apply_plan(model, p, eff)
    baked = model_logits(model, ids)
    model.save_pretrained(out)
    assert write_remote_code(model, out) == out / MODELING_FILE
    return model.config.model_type, base, hooked, baked, model


def test_every_registry_architecture_is_covered():
    assert set(AFFINE_CASES) == set(load_registry()), "add the new registry architecture to AFFINE_CASES"


@pytest.mark.parametrize("model_type", sorted(AFFINE_CASES))
def test_affine_export_refuses_to_load_without_remote_code_and_is_exact_with_it(model_type, tmp_path):
    arch, site = AFFINE_CASES[model_type]
    out = tmp_path / "export"
    base_type, base, hooked, baked, model = _baked_export(arch, site, out)
    assert base_type == model_type
    assert _rel(hooked, base) > 1e-2, "the maps must change the output, or the test proves nothing"
    assert _rel(baked, hooked) < 1e-5

    cfg = json.loads((out / "config.json").read_text())
    cls = "LineasSteered" + type(model).__name__
    assert cfg["model_type"] == f"lineas_{model_type}" and cfg["architectures"] == [cls]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == f"modeling_lineas.{cls}"
    assert cfg["auto_map"]["AutoConfig"].startswith("modeling_lineas.Lineas")
    assert model.config.model_type == model_type, "the model in memory keeps its type; only the export changes"

    for kwargs in ({}, {"trust_remote_code": False}):  # the default, and saying no
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(out, **kwargs)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoConfig.from_pretrained(out, **kwargs)

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    assert type(reloaded).__name__ == cls and reloaded.config.model_type == f"lineas_{model_type}"
    assert isinstance(reloaded.config, type(model.config)), "the shipped config subclasses the base config"
    assert torch.equal(model_logits(reloaded, random_ids()), baked)


def test_a_reloaded_export_saved_again_keeps_its_own_type(tmp_path):
    """A user's ``save_pretrained`` (or ``push_to_hub``) of a reloaded export must not bring back the base type."""
    _baked_export("qwen3", "model.norm", tmp_path / "a")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True, dtype=torch.float32,
                                                    attn_implementation="eager").eval()
    reloaded.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model_type"] == "lineas_qwen3" and "AutoConfig" in cfg["auto_map"]
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert torch.equal(model_logits(again, random_ids()), model_logits(reloaded, random_ids()))


def test_lineas_model_type_is_not_prefixed_twice():
    assert lineas_model_type("gemma2") == "lineas_gemma2"
    assert lineas_model_type("lineas_gemma2") == "lineas_gemma2"


def test_streamed_export_gets_the_same_type_as_the_in_memory_one(tmp_path):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    streamed = bake_folder(str(model_dir), str(maps_path), verify_tokens=2)
    assert streamed.plan.affine_sites
    out = streamed.save_pretrained(tmp_path / "streamed")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "lineas_gemma2" and cfg["architectures"] == ["LineasSteeredGemma2ForCausalLM"]
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)


def test_rebake_of_an_affine_export_needs_the_flag_and_keeps_the_type(tmp_path, capsys):
    """Re-baking an export with affine modules: refused (exit 2, no traceback) without --trust-remote-code, as
    loading it is; with the flag the new export keeps the earlier affine modules and the lineas model type."""
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    first = tmp_path / "first"
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(first), "--verify-tokens", "2"]) == 0
    assert json.loads((first / "config.json").read_text())["model_type"] == "lineas_gemma2"
    more = write_maps(tmp_path / "more.safetensors", ("model.layers.0.input_layernorm",), seed=3)
    capsys.readouterr()
    refused = tmp_path / "refused"
    assert main(["--model", str(first), "--maps", str(more), "--out", str(refused), "--verify-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "custom code" in err and "Traceback" not in err and not refused.exists()
    second = tmp_path / "second"
    assert main(["--model", str(first), "--maps", str(more), "--out", str(second), "--verify-tokens", "2",
                 "--trust-remote-code"]) == 0
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["model_type"] == "lineas_gemma2" and cfg["architectures"] == ["LineasSteeredGemma2ForCausalLM"]
    assert {s["site"] for s in cfg["lineas_affine_sites"]} >= {"model.layers.0.post_attention_layernorm"}
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(second)


def test_rebake_of_an_affine_export_plans_with_its_base_registry_entry(tmp_path):
    """The export's type is ``lineas_gemma2``, but its modules are Gemma-2's: a re-bake plans with the gemma2
    registry entry (the shift of an input norm folds into q/k/v biases; no new affine module) and accepts maps
    whose metadata names the base model type."""
    from bake_fixtures import make_maps

    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    first = tmp_path / "first"
    assert main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(first), "--verify-tokens", "2"]) == 0
    sites_first = json.loads((first / "config.json").read_text())["lineas_affine_sites"]
    more = make_maps(("model.layers.0.input_layernorm",), seed=3)
    more = SteeringMaps(more.maps, dict(more.metadata, model_type="gemma2"))
    more.save(tmp_path / "more.safetensors")
    second = tmp_path / "second"
    assert main(["--model", str(first), "--maps", str(tmp_path / "more.safetensors"), "--out", str(second),
                 "--verify-tokens", "2", "--trust-remote-code"]) == 0
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["lineas_affine_sites"] == sites_first and cfg["attention_bias"] is True
