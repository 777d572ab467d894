"""HF export: folder contents, reload with plain transformers, dtype, tokenizer copy, card, provenance, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bake_fixtures import (
    GEMMA2_SITES,
    assert_close_rel,
    hooked_and_base,
    load,
    logits,
    setup_model,
)
from safetensors import safe_open

from bake import EXPORTERS, ExportResult, OutputExistsError, bake, register_exporter
from bake.formats.export import UnknownFormatError, parse_formats
from bake.publish.card import CARD_TAGS
from bake.verify.check import compare
from bake.verify.tolerances import GGUF_ROWS, RELOAD_ROWS, TOLERANCES, Row, get_tolerance, gguf_row, reload_row
from lineas.maps import file_sha256
from lineas.models import TOKENIZER_FILES

STRENGTH = 0.8


@pytest.fixture(scope="module")
def llama_baked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    model_dir, maps_path = setup_model(tmp)
    baked = bake(str(model_dir), str(maps_path), strength=STRENGTH, verify_tokens=4)
    return tmp, model_dir, maps_path, baked


@pytest.fixture(scope="module")
def llama_export(llama_baked):
    tmp, model_dir, maps_path, baked = llama_baked
    out = baked.save_pretrained(tmp / "out", command="lineas-bake --model x --maps y")
    return tmp, model_dir, maps_path, baked, out


def test_export_reloads_with_plain_transformers_and_matches_hooked(llama_export):
    _, model_dir, maps_path, baked, out = llama_export
    hooked, base = hooked_and_base(model_dir, maps_path, STRENGTH)
    assert not torch.allclose(hooked, base, atol=1e-3), "the maps must change the model for this test to mean anything"
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and not (out / "modeling_lineas.py").exists()
    reloaded = load(out)  # no trust_remote_code
    assert_close_rel(logits(reloaded), hooked)
    # the folded config flags survived the round trip
    for change in baked.plan.config_changes:
        assert cfg[change.key] == change.new


def test_export_folder_contents(llama_export):
    *_, out = llama_export
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md",
            "lineas_provenance.json", "lineas_verification.json"} <= names
    assert not names & set(TOKENIZER_FILES), "the tiny model has no tokenizer, so none may be copied"
    assert not [p for p in out.parent.iterdir() if p.name.startswith("lineas_tmp_")], "temp folder left behind"


def test_verification_report_file_has_in_memory_and_reload_checks(llama_export):
    *_, out = llama_export
    rep = json.loads((out / "lineas_verification.json").read_text())
    assert rep["passed"] and not rep["skipped"]
    labels = [c["label"] for c in rep["checks"]]
    assert labels == ["baked float32 (in memory)", "exported float32, reloaded"]
    for c in rep["checks"]:
        assert c["max_rel"] <= 1e-5 and c["top1"] == 1.0 and c["greedy_matched"] == c["greedy_total"]
        assert c["tolerance"]["reason"]
    assert {p["kind"] for p in rep["probes"]} == {"random", "padded"}
    assert "max_rel" in rep["metric_definitions"]


def test_provenance(llama_export):
    _, _, maps_path, baked, out = llama_export
    prov = json.loads((out / "lineas_provenance.json").read_text())
    assert prov["maps"][0]["sha256"] == file_sha256(maps_path)
    assert prov["maps"][0]["strength"] == STRENGTH and prov["strengths"] == [STRENGTH]
    assert prov["command"] == "lineas-bake --model x --maps y"
    assert prov["versions"]["lineas-bake"]
    assert prov["plan"]["summary"] == baked.plan.summary() == prov["plan_summary"]
    assert prov["plan"]["sites"] and prov["verification"]["passed"]
    assert prov["export"]["dtype"] == "float32" and prov["export"]["formats"] == ["hf"]


def test_model_card(llama_export):
    _, _, _, baked, out = llama_export
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = card.split("---\n")[1]
    assert "base_model:" in front and "library_name: transformers" in front
    for tag in CARD_TAGS:
        assert f"- {tag}" in front
    assert "linear-act" in card and "builtin:negative" in card  # method and data
    assert "model.layers.0.post_attention_layernorm" in card  # sites
    assert f"{STRENGTH:g}" in card  # λ
    assert baked.plan.summary() in card
    assert "baked float32 (in memory)" in card  # verification table
    assert "from_pretrained" in card and "trust_remote_code" in card


def test_existing_out_is_refused_unless_overwrite(llama_export):
    _, _, _, baked, out = llama_export
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputExistsError, match=str(out)):
        baked.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == before
    (out / "stale.txt").write_text("old")
    baked.save_pretrained(out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(("lineas_tmp_", "lineas_old_"))]


def test_failing_exporter_leaves_nothing(llama_baked, monkeypatch):
    tmp, _, _, baked = llama_baked

    def boom(b, folder, opts):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("exporter crashed")

    monkeypatch.setitem(EXPORTERS, "boom", boom)
    with pytest.raises(RuntimeError, match="crashed"):
        baked.save_pretrained(tmp / "never", formats="hf,boom")
    assert not (tmp / "never").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith("lineas_tmp_")]


def test_exporters_plug_in_and_add_checks(llama_baked, monkeypatch):
    tmp, _, _, baked = llama_baked
    seen = {}

    def extra(b, folder, opts):
        seen["formats"] = opts.formats
        (folder / "extra.txt").write_text("hello")
        check, _ = compare(b.model, b.reference, "torch-float32", label="extra backend")
        return ExportResult("extra", checks=[check], load_snippets=["Load the extra format with `cat extra.txt`."])

    monkeypatch.setitem(EXPORTERS, "extra", extra)
    assert parse_formats("hf, extra") == ("hf", "extra")
    with pytest.raises(UnknownFormatError, match="'onnx-nope'"):  # named in the message
        parse_formats("hf,onnx-nope")
    out = baked.save_pretrained(tmp / "plug", formats="hf,extra")
    assert seen["formats"] == ("hf", "extra")
    rep = json.loads((out / "lineas_verification.json").read_text())
    assert [c["label"] for c in rep["checks"]][-1] == "extra backend"
    assert "cat extra.txt" in (out / "README.md").read_text()
    assert json.loads((out / "lineas_provenance.json").read_text())["export"]["formats"] == ["hf", "extra"]
    assert register_exporter is not None


def test_bfloat16_export_reports_top1_and_kl(llama_baked):
    tmp, _, _, baked = llama_baked
    out = baked.save_pretrained(tmp / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    assert dtypes == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    rep = json.loads((out / "lineas_verification.json").read_text())
    check = next(c for c in rep["checks"] if c["label"] == "exported bfloat16, reloaded")
    assert 0.0 < check["mean_kl"] < 0.05 and 0.9 <= check["top1"] <= 1.0
    assert check["tolerance"]["name"] == "reload-bfloat16"
    assert baked.model.dtype == torch.float32  # the in-memory bake is untouched


def test_tolerance_rows_are_named_by_the_row_enum():
    """Every built-in row is registered under its :class:`Row`; an export dtype or GGUF type names its row."""
    assert {r.value for r in Row} <= set(TOLERANCES)
    assert all(type(name) is str and type(t.name) is str for name, t in TOLERANCES.items())  # plain names
    assert get_tolerance(Row.RELOAD_BF16) is get_tolerance("reload-bfloat16") and f"{Row.GGUF_Q8_0}" == "gguf-q8_0"
    assert [reload_row(d) for d in RELOAD_ROWS] == [Row.RELOAD_F32, Row.RELOAD_BF16, Row.RELOAD_F16]
    assert [gguf_row(t) for t in GGUF_ROWS] == [Row.GGUF_F32, Row.GGUF_F16, Row.GGUF_BF16, Row.GGUF_Q8_0]
    with pytest.raises(KeyError, match="no reload tolerance row for dtype 'int8'"):
        reload_row("int8")
    with pytest.raises(KeyError, match="no GGUF tolerance row for outtype 'q4_k'"):
        gguf_row("q4_k")


def test_gemma2_affine_fallback_reloads_with_remote_code(tmp_path):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    baked = bake(str(model_dir), str(maps_path), strength=1.0, verify_tokens=4)
    assert baked.plan.affine_sites
    out = baked.save_pretrained(tmp_path / "g2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] and (out / "modeling_lineas.py").is_file()
    hooked, base = hooked_and_base(model_dir, maps_path, 1.0)
    assert not torch.allclose(hooked, base, atol=1e-3)
    reloaded = load(out, trust_remote_code=True)
    assert_close_rel(logits(reloaded), hooked)
    assert "trust_remote_code=True" in (out / "README.md").read_text()
    assert json.loads((out / "lineas_provenance.json").read_text())["export"]["trust_remote_code_needed"]


def test_tokenizer_files_are_copied_verbatim(tmp_path):
    model_dir, maps_path = setup_model(tmp_path, tokenizer=True)
    baked = bake(str(model_dir), str(maps_path), strength=1.0, verify_tokens=2)
    assert baked.tokenizer is not None
    assert any(p["kind"] == "prompt" for p in baked.report.probes)
    out = baked.save_pretrained(tmp_path / "with-tok")
    copied = [n for n in TOKENIZER_FILES if (out / n).exists()]
    assert "tokenizer.json" in copied and "tokenizer_config.json" in copied
    for n in copied:
        assert (out / n).read_bytes() == (Path(model_dir) / n).read_bytes(), n
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("The capital of France is")["input_ids"]


def test_float16_overflow_names_the_site_and_writes_nothing(tmp_path):
    """Scale 1e5 folds into a norm weight that float16 cannot hold: the cast is refused, not written as inf."""
    from bake.errors import NonFiniteCastError
    from lineas.maps import SiteMap, SteeringMaps

    model_dir, _ = setup_model(tmp_path)
    site = "model.layers.0.post_attention_layernorm"
    maps = SteeringMaps({site: SiteMap(torch.full((64,), 1e5), torch.zeros(64))})
    baked = bake(str(model_dir), maps, verify_tokens=2)
    assert baked.verified  # float32 holds it: only the float16 cast overflows
    with pytest.raises(NonFiniteCastError, match=f"{site}.weight .* non-finite .*site\\(s\\) {site}"):
        baked.save_pretrained(tmp_path / "fp16", dtype="float16")
    assert not (tmp_path / "fp16").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_")]
    assert baked.save_pretrained(tmp_path / "bf16", dtype="bfloat16").is_dir()  # bfloat16 has float32's range
