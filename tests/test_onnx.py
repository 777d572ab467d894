"""ONNX export: the graph passes onnx.checker, and in ONNX Runtime it reproduces the *hooked* torch model
(logits within the onnx-float32 tolerance, greedy tokens identical, also through the KV cache)."""

from __future__ import annotations

import json

import pytest
import torch
from onnx_extra import require_onnx_extra  # noqa: E402  (skips here, with why, without the extra)

require_onnx_extra()

from bake_fixtures import GEMMA2_SITES, LLAMA_SITES, load, setup_model
from tiny import random_ids

import bake.formats.onnx as ox
import bake.formats.onnx_runtime as ort
from bake import bake
from bake.errors import VerificationError
from bake.verify.tolerances import get_tolerance
from lineas.hooks import steered
from lineas.maps import SteeringMaps

STRENGTH = 0.8
N_TOKENS = 8
GPT2_SITES = ("transformer.h.0.ln_2", "transformer.h.1.mlp.c_proj")
CASES = {  # arch -> (sites, with tokenizer)
    "llama": (LLAMA_SITES, True),
    "gemma2": (GEMMA2_SITES, False),  # maps on post_*_layernorm: the affine fallback is in the graph
    "gpt2": (GPT2_SITES, False),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


@pytest.fixture(scope="module", params=sorted(CASES))
def onnx_export(request, tmp_path_factory):
    """Per architecture: bake the tiny model and export hf,onnx (the exporter's own checks run here)."""
    arch = request.param
    sites, tok = CASES[arch]
    tmp = tmp_path_factory.mktemp(f"onnx-{arch}")
    model_dir, maps_path = setup_model(tmp, arch, sites, tokenizer=tok)
    baked = bake(str(model_dir), str(maps_path), strength=STRENGTH, verify_tokens=N_TOKENS)
    out = baked.save_pretrained(tmp / "out", formats="hf,onnx")
    return arch, model_dir, maps_path, baked, out


@torch.no_grad()
def _hooked_and_base(model_dir, maps_path, ids):
    model = load(model_dir)
    base = model(input_ids=ids).logits
    with steered(model, SteeringMaps.load(maps_path), STRENGTH):
        hooked = model(input_ids=ids).logits
        greedy = model.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=N_TOKENS,
                                min_new_tokens=N_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    return hooked, base, greedy[0, ids.shape[1]:].tolist()


def test_onnx_folder_is_self_contained(onnx_export):
    arch, _, _, _baked, out = onnx_export
    onnx_dir = out / ox.ONNX_SUBDIR
    names = {p.name for p in onnx_dir.iterdir()}
    assert {"model.onnx", "config.json", "generation_config.json", "README.md", "lineas_verification.json",
            "lineas_provenance.json"} <= names
    if CASES[arch][1]:
        assert "tokenizer.json" in names
    cfg = json.loads((onnx_dir / "config.json").read_text())
    assert "auto_map" not in cfg, "the ONNX graph needs no remote code, even with affine modules"
    card = (onnx_dir / "README.md").read_text()
    assert card.startswith("---\n") and "- onnx" in card and "ORTModelForCausalLM" in card
    assert "onnx float32 (CPU)" in card
    # the parent card points at the ONNX folder
    parent_card = (out / "README.md").read_text()
    if arch == "gemma2":  # optimum-onnx sizes its KV cache wrongly: the card loads through bake.load_onnx
        assert 'load_onnx("path/to/this/folder")' in parent_card and "`onnx/` subfolder" in parent_card
    else:
        assert 'subfolder="onnx"' in parent_card


def test_checker_passes(onnx_export):
    *_, out = onnx_export
    ox.check_graph(out / ox.ONNX_SUBDIR / "model.onnx")


@pytest.mark.parametrize("onnx_export", ["gemma2"], indirect=True)
def test_gemma2_graph_contains_the_affine_fallback(onnx_export):
    _arch, _, _, baked, out = onnx_export
    assert baked.plan.affine_sites, "the gemma2 maps must need an affine module for this test to mean anything"
    assert (out / "modeling_lineas.py").exists()  # the HF export needs remote code ...
    import onnx

    graph = onnx.load(str(out / ox.ONNX_SUBDIR / "model.onnx"))
    # The exporter names nodes by module scope: a LineasAffine wrapper shows up as the wrapped module's
    # ops under ".../<site>/inner/..." plus the wrapper's own Mul/Add under ".../<site>/".
    wrappers = {n.name.split("/inner/")[0] for n in graph.graph.node if "/inner/" in n.name}
    assert len(wrappers) == len(baked.plan.affine_sites)
    for scope in wrappers:
        ops = {n.op_type for n in graph.graph.node if n.name.startswith(scope + "/") and "/inner/" not in n.name}
        assert ops & {"Mul", "Add"}, f"no affine ops under {scope}"


def test_ort_logits_and_greedy_match_hooked_torch(onnx_export):
    arch, model_dir, maps_path, _baked, out = onnx_export
    ids = random_ids(2, 16, 128, seed=11)
    hooked, base, hooked_greedy = _hooked_and_base(model_dir, maps_path, ids)
    assert _rel(hooked, base) > 1e-2, "the maps must change the model for this test to mean anything"
    ort_model = ort.load_ort(out / ox.ONNX_SUBDIR)
    ort_logits = ort.ort_runner(ort_model)(ids, torch.ones_like(ids))
    tol = get_tolerance("onnx-float32")
    err = _rel(ort_logits, hooked)
    assert err <= tol.max_rel, f"{arch}: ORT vs hooked max rel {err:.3g} > {tol.max_rel:g}"
    assert _rel(ort_logits, base) > 1e-2  # and it is the steered model, not the base one
    assert ort.greedy_with_cache(ort_model, ids[0], N_TOKENS) == hooked_greedy


def test_verification_report_has_the_onnx_check(onnx_export):
    *_, out = onnx_export
    for folder in (out, out / ox.ONNX_SUBDIR):
        rep = json.loads((folder / "lineas_verification.json").read_text())
        assert rep["passed"]
        onnx_checks = [c for c in rep["checks"] if c["label"].startswith("onnx float32")]
        assert len(onnx_checks) == 1
        c = onnx_checks[0]
        assert c["passed"] and c["tolerance"]["name"] == "onnx-float32" and c["tolerance"]["reason"]
        assert c["max_rel"] <= 1e-4 and c["greedy_matched"] == c["greedy_total"]
        cached = [g for g in c["greedy"] if g.get("path") == "kv-cache"]
        assert cached and all(g["identical"] for g in cached)
    meta = json.loads((out / ox.ONNX_SUBDIR / ox.ONNX_REPORT_FILE).read_text())
    assert meta["task"] == "text-generation-with-past" and meta["external_data"] is False
    assert meta["export_seconds"] > 0


def test_wrong_graph_fails_and_writes_nothing(tmp_path, monkeypatch):
    """A graph of the *unsteered* model must be rejected by the ORT check, leaving no folder behind."""
    model_dir, maps_path = setup_model(tmp_path, "llama", LLAMA_SITES)
    baked = bake(str(model_dir), str(maps_path), strength=STRENGTH, verify_tokens=4)
    unsteered = load(model_dir)
    real_export_graph = ox.export_graph
    monkeypatch.setattr(ox, "export_graph", lambda model, folder, **kw: real_export_graph(unsteered, folder, **kw))
    with pytest.raises(VerificationError, match="onnx float32"):
        baked.save_pretrained(tmp_path / "out", formats="hf,onnx")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_tmp_")]


def test_external_data_path(tmp_path, monkeypatch):
    """The >2 GB path, exercised on a tiny model by lowering the size threshold to 0 bytes."""
    model_dir, maps_path = setup_model(tmp_path, "llama", LLAMA_SITES)
    baked = bake(str(model_dir), str(maps_path), strength=STRENGTH, verify_tokens=4)
    monkeypatch.setattr(ox, "EXTERNAL_DATA_THRESHOLD", 0)
    out = baked.save_pretrained(tmp_path / "out", formats="onnx")
    onnx_dir = out / ox.ONNX_SUBDIR
    data = onnx_dir / "model.onnx_data"
    assert data.is_file() and data.stat().st_size > 0.9 * ox.parameter_bytes(baked.model)
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    big = [t for t in graph.graph.initializer if t.dims and int(torch.tensor(list(t.dims)).prod()) >= 1024]
    assert big and all(uses_external_data(t) for t in big), "the weights must live in model.onnx_data"
    ox.check_graph(onnx_dir / "model.onnx")
    rep = json.loads((onnx_dir / "lineas_verification.json").read_text())
    assert rep["passed"] and json.loads((onnx_dir / ox.ONNX_REPORT_FILE).read_text())["external_data"] is True
    assert "model.onnx_data" in (onnx_dir / "README.md").read_text()


@pytest.mark.slow
def test_smollm2_onnx_end_to_end(tmp_path):
    """The real embedded model: export, checker, ORT vs hooked (about 2-3 minutes on 2 CPU cores)."""
    from bake_fixtures import make_maps

    sites = ("model.layers.5.post_attention_layernorm", "model.layers.12.input_layernorm",
             "model.layers.20.mlp.down_proj")
    make_maps(sites, dim=576, magnitude=0.2).save(tmp_path / "m.safetensors")
    baked = bake("smollm2-135m", str(tmp_path / "m.safetensors"), strength=1.0, verify_tokens=8)
    out = baked.save_pretrained(tmp_path / "out", formats="onnx")
    rep = json.loads((out / ox.ONNX_SUBDIR / "lineas_verification.json").read_text())
    check = next(c for c in rep["checks"] if c["label"].startswith("onnx float32"))
    assert check["passed"] and check["max_rel"] <= 1e-4 and check["greedy_matched"] == check["greedy_total"]
    assert (out / ox.ONNX_SUBDIR / "tokenizer.json").is_file()
    ox.check_graph(out / ox.ONNX_SUBDIR / "model.onnx")


def test_cli_format_hf_onnx(tmp_path, capsys):
    """Acceptance: `lineas-bake --format hf,onnx` writes both exports, each with a passing report."""
    from bake.cli.main import main

    model_dir, maps_path = setup_model(tmp_path, "llama", LLAMA_SITES, tokenizer=True)
    out = tmp_path / "X"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--strength", "1.0", "--format", "hf,onnx",
               "--out", str(out), "--verify-tokens", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "onnx float32 (CPU)" in captured.out
    assert (out / "model.safetensors").is_file() and (out / "onnx" / "model.onnx").is_file()
    for folder in (out, out / "onnx"):
        rep = json.loads((folder / "lineas_verification.json").read_text())
        assert rep["passed"] and any(c["label"].startswith("onnx") for c in rep["checks"])
        assert (folder / "README.md").is_file() and (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("onnx_export", ["gemma2"], indirect=True)
def test_gemma2_kv_cache_shape_is_taken_from_the_graph(onnx_export):
    """optimum-onnx 0.1.0 sizes Gemma2's empty cache from num_attention_heads; the graph says otherwise.
    The export must still verify (through the cache) and the card must tell users the workaround."""
    _arch, model_dir, _, _baked, out = onnx_export
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    assert cfg.num_key_value_heads != cfg.num_attention_heads  # GQA, or this test proves nothing
    raw = ORTModelForCausalLM.from_pretrained(out / ox.ONNX_SUBDIR)
    fix = ort.cache_shape_fix(raw)
    assert fix is not None and fix["graph"][0] == cfg.num_key_value_heads
    meta = json.loads((out / ox.ONNX_SUBDIR / ox.ONNX_REPORT_FILE).read_text())
    assert meta["ort_cache_shape_fix"]["graph"] == list(fix["graph"])
    assert f"model.num_key_value_heads, model.embed_size_per_head = {fix['graph'][0]}" in (
        out / ox.ONNX_SUBDIR / "README.md").read_text()


@pytest.mark.parametrize("onnx_export", ["gemma2"], indirect=True)
def test_load_onnx_generates_gemma2_like_transformers(onnx_export):
    """bake.load_onnx on the export folder: ORT's own generate() gives the hooked model's greedy tokens,
    where a bare ORTModelForCausalLM cannot generate at all; both cards point to load_onnx."""
    _arch, model_dir, maps_path, _baked, out = onnx_export
    from optimum.onnxruntime import ORTModelForCausalLM

    from bake import load_onnx

    ids = random_ids(2, 16, 128, seed=11)
    hooked, base, hooked_greedy = _hooked_and_base(model_dir, maps_path, ids)
    plain_greedy = load(model_dir).generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=N_TOKENS,
                                            min_new_tokens=N_TOKENS, do_sample=False, pad_token_id=0,
                                            eos_token_id=None)[0, ids.shape[1]:].tolist()
    assert plain_greedy != hooked_greedy, "the maps must change the greedy tokens for this test to mean anything"
    kw = dict(attention_mask=torch.ones_like(ids[:1]), max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS,
              do_sample=False, pad_token_id=0, eos_token_id=None)
    for path in (out, out / ox.ONNX_SUBDIR):
        got = load_onnx(path, provider="CPUExecutionProvider").generate(ids[:1], **kw)[0, ids.shape[1]:].tolist()
        assert got == hooked_greedy
    with pytest.raises(Exception, match="past_key_values"):  # what load_onnx spares the user
        ORTModelForCausalLM.from_pretrained(out / ox.ONNX_SUBDIR).generate(ids[:1], **kw)
    for card in (out / "README.md", out / ox.ONNX_SUBDIR / "README.md"):
        assert "from bake import load_onnx" in card.read_text()


def test_load_onnx_refuses_a_folder_without_a_graph(tmp_path):
    from bake import load_onnx

    with pytest.raises(ox.OnnxExportError, match="holds no model.onnx"):
        load_onnx(tmp_path)
