"""`lineas-bake` end to end on tiny models: dry run, export, affine fallback, failures and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import (
    GEMMA2_SITES,
    LLAMA_SITES,
    assert_close_rel,
    corrupt_bake,
    hooked_and_base,
    load,
    logits,
    setup_model,
    write_maps,
)
from safetensors.torch import save_file

from bake.cli.main import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY, main


@pytest.fixture
def llama(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default --out lands in tmp_path
    return setup_model(tmp_path)


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(("lineas_tmp_", "lineas_old_"))]


def test_help_documents_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("exit codes", "verification failed", "--no-verify", "--trust-remote-code", "dangerous options",
                   "--dry-run", "--dtype"):
        assert needle in text


def test_dry_run_prints_plan_and_writes_nothing(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--strength", "0.5", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    for site in LLAMA_SITES:
        assert site in out
    assert "rmsnorm" in out and "3 sites:" in out  # table and summary
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_end_to_end_llama(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    rc = main(["--model", str(model_dir), "--maps", f"{maps_path}:0.6", "--verify-tokens", "4"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK, out
    folder = tmp_path / f"{model_dir.name}-steered"  # the default --out
    assert folder.is_dir() and "exported float32, reloaded" in out
    hooked, base = hooked_and_base(model_dir, maps_path, 0.6)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert_close_rel(logits(load(folder)), hooked)
    prov = json.loads((folder / "lineas_provenance.json").read_text())
    assert prov["strengths"] == [0.6] and "lineas-bake" in prov["command"] and f"{maps_path}:0.6" in prov["command"]
    assert not leftovers(tmp_path)


def test_two_maps_compose_in_order(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    second = write_maps(tmp_path / "second.safetensors", LLAMA_SITES[:1], seed=3)
    out_dir = tmp_path / "two"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--maps", f"{second}:0.5",
               "--strength", "0.8", "--out", str(out_dir), "--verify-tokens", "2"])
    assert rc == EXIT_OK, capsys.readouterr().err
    from lineas.hooks import attach_maps
    from lineas.maps import SteeringMaps

    model = load(model_dir)
    base = logits(model)
    with attach_maps(model, [(SteeringMaps.load(maps_path), 0.8), (SteeringMaps.load(second), 0.5)]):
        hooked = logits(model)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert_close_rel(logits(load(out_dir)), hooked)
    assert json.loads((out_dir / "lineas_provenance.json").read_text())["strengths"] == [0.8, 0.5]


def test_gemma2_affine_fallback(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    out_dir = tmp_path / "g2"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out_dir), "--verify-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "affine module" in out
    hooked, base = hooked_and_base(model_dir, maps_path, 1.0)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert_close_rel(logits(load(out_dir, trust_remote_code=True)), hooked)


def test_require_standard_refuses_affine_sites(tmp_path, capsys):
    model_dir, maps_path = setup_model(tmp_path, "gemma2", GEMMA2_SITES)
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(tmp_path / "x"),
               "--require-standard"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT and "model.layers.0.post_attention_layernorm" in err
    assert not (tmp_path / "x").exists()


def test_verification_failure_exits_3_and_writes_nothing(llama, tmp_path, capsys, monkeypatch):
    corrupt_bake(monkeypatch, "up_proj", 1.02)
    model_dir, maps_path = llama
    out_dir = tmp_path / "bad"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out_dir), "--verify-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == EXIT_VERIFY
    assert not out_dir.exists() and not leftovers(tmp_path)
    assert "verification failed" in err and "first divergence" in err and "model.layers.1" in err
    assert "Traceback" not in err


def _nan_maps(path):
    meta = {"format": "lineas-maps", "format_version": "1", "sites": json.dumps([LLAMA_SITES[0]])}
    scale = torch.ones(64)
    scale[5] = float("nan")
    save_file({LLAMA_SITES[0] + ".scale": scale, LLAMA_SITES[0] + ".shift": torch.zeros(64)}, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("case", ["wrong-dim", "unknown-site", "nan-maps", "nan-strength", "inf-suffix",
                                  "existing-out", "missing-maps", "unknown-model"])
def test_bad_input_exits_2_naming_the_value(case, llama, tmp_path, capsys):
    model_dir, maps_path = llama
    out_dir = tmp_path / "out"
    args = ["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out_dir)]
    if case == "wrong-dim":
        bad = write_maps(tmp_path / "dim.safetensors", LLAMA_SITES[:1], dim=32)
        args[3], needle = str(bad), "32"
    elif case == "unknown-site":
        bad = write_maps(tmp_path / "site.safetensors", ["model.layers.7.input_layernorm"])
        args[3], needle = str(bad), "model.layers.7.input_layernorm"
    elif case == "nan-maps":
        args[3], needle = str(_nan_maps(tmp_path / "nan.safetensors")), "non-finite"
    elif case == "nan-strength":
        args += ["--strength", "nan"]
        needle = "nan"
    elif case == "inf-suffix":
        args[3], needle = f"{maps_path}:inf", "inf"
    elif case == "existing-out":
        out_dir.mkdir()
        (out_dir / "keep.txt").write_text("mine")
        needle = str(out_dir)
    elif case == "missing-maps":
        args[3], needle = str(tmp_path / "nope.safetensors"), "nope.safetensors"
    else:
        args[1], needle = str(tmp_path / "no-such-model"), "no-such-model"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert needle in err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lineas-bake: error:")]
    assert len(lines) == 1
    if case == "existing-out":
        assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    else:
        assert not out_dir.exists()
    assert not leftovers(tmp_path)


def test_dtype_bfloat16_report_has_top1_and_kl(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    out_dir = tmp_path / "bf16"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out_dir), "--dtype", "bfloat16",
               "--verify-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "exported bfloat16, reloaded" in out
    rep = json.loads((out_dir / "lineas_verification.json").read_text())
    check = next(c for c in rep["checks"] if "bfloat16" in c["label"])
    assert "top1" in check and "mean_kl" in check and check["top1"] > 0.5
    assert load(out_dir).config.tie_word_embeddings is False


def test_no_verify_is_marked_everywhere(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    out_dir = tmp_path / "nv"
    rc = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out_dir), "--no-verify"])
    out = capsys.readouterr().out
    assert rc == EXIT_OK and "SKIPPED" in out
    assert json.loads((out_dir / "lineas_verification.json").read_text())["skipped"] is True
    assert "Verification was skipped" in (out_dir / "README.md").read_text()


def test_tokenizer_copied_only_when_present(tmp_path, capsys):
    with_tok, maps_path = setup_model(tmp_path, tokenizer=True)
    rc = main(["--model", str(with_tok), "--maps", str(maps_path), "--out", str(tmp_path / "t"),
               "--verify-tokens", "2"])
    assert rc == EXIT_OK
    assert (tmp_path / "t" / "tokenizer.json").is_file() and (tmp_path / "t" / "tokenizer_config.json").is_file()
    rep = json.loads((tmp_path / "t" / "lineas_verification.json").read_text())
    assert any(p["kind"] == "prompt" for p in rep["probes"])


@pytest.mark.slow
def test_smollm2_end_to_end(tmp_path, capsys):
    """The embedded real model: fold 20 random sites, verify, export, reload (about 1-2 minutes on CPU)."""
    from lineas.maps import SiteMap, SteeringMaps

    g = torch.Generator().manual_seed(0)
    sites = ([f"model.layers.{i}.post_attention_layernorm" for i in range(0, 30, 3)]
             + [f"model.layers.{i}.mlp.down_proj" for i in range(1, 30, 3)])
    maps = SteeringMaps({s: SiteMap(1 + 0.1 * torch.randn(576, generator=g), 0.1 * torch.randn(576, generator=g))
                         for s in sites}, {"method": "linear-act"})
    maps_path = maps.save(tmp_path / "smol.safetensors")
    out_dir = tmp_path / "smol"
    rc = main(["--model", "smollm2-135m", "--maps", str(maps_path), "--out", str(out_dir), "--verify-tokens", "4"])
    assert rc == EXIT_OK, capsys.readouterr().err
    rep = json.loads((out_dir / "lineas_verification.json").read_text())
    # Out of core, the written export is the one candidate: checked with the exact fp32 rule.
    assert rep["passed"] and [c["tolerance"]["name"] for c in rep["checks"]] == ["reload-float32"]
    assert rep["checks"][0]["gating"] and rep["site_divergence"]["modules"]
    assert (out_dir / "tokenizer.json").is_file()
