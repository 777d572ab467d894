"""Never steer twice by accident (issue 8, section 3): the ``lineas_baked`` record, rebake refusal,
bakes on top of bakes, and maps learned on another model."""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import (
    LLAMA_SITES,
    assert_close_rel,
    load,
    logits,
    setup_model,
    write_maps,
)
from tiny import tiny_model

from bake import bake
from bake.cli.main import main
from bake.plan.history import BAKED_KEY, ModelMismatchError, RebakeError
from lineas.hooks import attach_maps
from lineas.maps import SiteMap, SteeringMaps, file_sha256
from lineas.provenance import config_fingerprint, model_provenance


@pytest.fixture
def llama(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return setup_model(tmp_path)


def _bake_cli(model, maps: list[str], out, *extra) -> int:
    args = ["--model", str(model), "--out", str(out), "--verify-tokens", "2", *extra]
    for m in maps:
        args += ["--maps", m]
    return main(args)


def test_apply_plan_twice_is_refused_and_leaves_weights_alone():
    from bake.fold.execute import apply_plan
    from bake.plan.planner import plan

    model = tiny_model("llama")
    maps = SteeringMaps({LLAMA_SITES[0]: SiteMap(torch.full((64,), 1.5), torch.zeros(64))})
    eff = dict(maps.items())
    p = plan(model, eff)
    weight = model.get_submodule(LLAMA_SITES[0]).weight
    before = weight.detach().clone()
    apply_plan(model, p, eff)
    once = weight.detach().clone()
    assert torch.allclose(once, 1.5 * before)
    assert [e["effective_digest"] for e in model.config.lineas_baked] == [p.maps_digest]
    with pytest.raises(RebakeError, match="already baked"):
        apply_plan(model, p, eff)
    assert torch.equal(weight, once), "a refused second fold must not touch the weights"
    apply_plan(model, p, eff, allow_rebake=True)  # asked for: the steering doubles, and both are recorded
    assert torch.allclose(weight, 2.25 * before) and len(model.config.lineas_baked) == 2


def test_export_records_the_bake_in_config(llama, tmp_path):
    model_dir, maps_path = llama
    assert _bake_cli(model_dir, [f"{maps_path}:0.7"], tmp_path / "once") == 0
    cfg = json.loads((tmp_path / "once" / "config.json").read_text())
    (entry,) = cfg[BAKED_KEY]
    assert entry["maps"][0]["sha256"] == file_sha256(maps_path) and entry["maps"][0]["strength"] == 0.7
    assert entry["sites"] == len(LLAMA_SITES) and len(entry["effective_digest"]) == 64 and entry["version"]
    assert entry["base_config_sha256"] == config_fingerprint(load(model_dir).config)
    prov = json.loads((tmp_path / "once" / "lineas_provenance.json").read_text())
    assert prov["bakes"] == cfg[BAKED_KEY]


@pytest.mark.parametrize("strength", ["0.7", "0.3"])  # same file at another strength: same sha256
def test_same_maps_again_is_refused(llama, tmp_path, capsys, strength):
    model_dir, maps_path = llama
    assert _bake_cli(model_dir, [f"{maps_path}:0.7"], tmp_path / "once") == 0
    capsys.readouterr()
    rc = _bake_cli(tmp_path / "once", [f"{maps_path}:{strength}"], tmp_path / "twice")
    err = capsys.readouterr().err
    assert rc == 2
    assert maps_path.name in err and "already baked" in err and f"config.json {BAKED_KEY}[0]" in err
    assert "--allow-rebake" in err and not (tmp_path / "twice").exists()


def test_allow_rebake_doubles_on_purpose(llama, tmp_path):
    model_dir, maps_path = llama
    assert _bake_cli(model_dir, [str(maps_path)], tmp_path / "once") == 0
    assert _bake_cli(tmp_path / "once", [str(maps_path)], tmp_path / "twice", "--allow-rebake") == 0
    bakes = json.loads((tmp_path / "twice" / "config.json").read_text())[BAKED_KEY]
    assert len(bakes) == 2 and bakes[0]["effective_digest"] == bakes[1]["effective_digest"]


def test_export_without_config_record_is_recognised_by_its_provenance(llama, tmp_path, capsys):
    model_dir, maps_path = llama
    assert _bake_cli(model_dir, [str(maps_path)], tmp_path / "old") == 0
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg[BAKED_KEY]  # as written before the config record existed
    cfg_path.write_text(json.dumps(cfg))
    capsys.readouterr()
    assert _bake_cli(tmp_path / "old", [str(maps_path)], tmp_path / "again") == 2
    assert "lineas_provenance.json" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_different_maps_on_top_list_both_and_match_both_hooks(llama, tmp_path):
    model_dir, maps_path = llama
    # Disjoint sites: at a shared site the second maps act on the baked module output, which no longer holds
    # a shift the first bake moved into consumer biases, so hooks-on-base would not be the right reference.
    second = write_maps(tmp_path / "second.safetensors", ["model.layers.0.input_layernorm"], seed=5)
    assert _bake_cli(model_dir, [f"{maps_path}:0.6"], tmp_path / "first") == 0
    assert _bake_cli(tmp_path / "first", [f"{second}:0.5"], tmp_path / "both") == 0
    base = load(model_dir)
    plain = logits(base)
    with attach_maps(base, [(SteeringMaps.load(maps_path), 0.6), (SteeringMaps.load(second), 0.5)]):
        hooked_both = logits(base)
    assert not torch.allclose(hooked_both, plain, atol=1e-3)
    assert_close_rel(logits(load(tmp_path / "both")), hooked_both, rel=1e-4)
    bakes = json.loads((tmp_path / "both" / "config.json").read_text())[BAKED_KEY]
    assert [b["maps"][0]["sha256"] for b in bakes] == [file_sha256(maps_path), file_sha256(second)]
    assert json.loads((tmp_path / "both" / "lineas_provenance.json").read_text())["bakes"] == bakes
    card = (tmp_path / "both" / "README.md").read_text()
    assert "## Bakes in this model" in card
    assert file_sha256(maps_path)[:12] in card and file_sha256(second)[:12] in card


def _maps_learned_on(model, path, seed: int):
    g = torch.Generator().manual_seed(seed)
    meta = {"method": "linear-act", **model_provenance(model)}
    maps = SteeringMaps({LLAMA_SITES[1]: SiteMap(1 + 0.2 * torch.randn(64, generator=g),
                                                 0.2 * torch.randn(64, generator=g))}, meta)
    return maps.save(path)


def test_model_fingerprint_of_a_baked_model(llama, tmp_path, caplog):
    """Maps learned on the base, or on the baked export, both fit the baked export; others do not."""
    model_dir, maps_path = llama
    on_base = _maps_learned_on(load(model_dir), tmp_path / "on-base.safetensors", seed=1)
    assert _bake_cli(model_dir, [str(maps_path)], tmp_path / "first") == 0
    baked = load(tmp_path / "first")
    assert config_fingerprint(baked.config) != config_fingerprint(load(model_dir).config)
    on_baked = _maps_learned_on(baked, tmp_path / "on-baked.safetensors", seed=2)
    assert bake(str(tmp_path / "first"), str(on_base), verify_tokens=2).verified
    assert bake(str(tmp_path / "first"), str(on_baked), verify_tokens=2).verified
    with pytest.raises(ModelMismatchError, match="config_sha256"):  # learned on the baked one, used on the base
        bake(str(model_dir), str(on_baked), verify_tokens=2)
    with caplog.at_level("WARNING"):
        assert bake(str(model_dir), str(on_baked), verify_tokens=2, ignore_model_mismatch=True).verified
    assert "MODEL MISMATCH" in caplog.text


def test_model_type_mismatch_dry_run_refuses_too(llama, tmp_path, capsys):
    model_dir, _ = llama
    other = _maps_learned_on(load(model_dir), tmp_path / "x.safetensors", seed=3)
    meta = dict(SteeringMaps.load(other).metadata, model_type="qwen2")
    SteeringMaps(dict(SteeringMaps.load(other).items()), meta).save(other)
    rc = main(["--model", str(model_dir), "--maps", str(other), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "'qwen2'" in err and "'llama'" in err and "--ignore-model-mismatch" in err
    assert main(["--model", str(model_dir), "--maps", str(other), "--dry-run", "--ignore-model-mismatch"]) == 0


def test_stacking_on_a_site_whose_shift_moved_to_consumers_warns(llama, tmp_path, caplog):
    model_dir, maps_path = llama
    assert _bake_cli(model_dir, [str(maps_path)], tmp_path / "first") == 0
    entry = json.loads((tmp_path / "first" / "config.json").read_text())[BAKED_KEY][0]
    assert LLAMA_SITES[0] in entry["shift_in_consumers"]  # its shift went into gate/up biases
    second = write_maps(tmp_path / "second.safetensors", LLAMA_SITES[:1], seed=5)
    with caplog.at_level("WARNING"):
        assert bake(str(tmp_path / "first"), str(second), verify_tokens=2).verified
    assert f"site(s) {LLAMA_SITES[0]} were steered by an earlier bake" in caplog.text
