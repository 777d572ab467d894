"""The plan refuses what the bake would refuse, so ``--dry-run`` and the real run agree.

Table-driven over bad sites (root module, wrong length on non-leaf modules, non-tensor
outputs), each through ``plan()``, ``bake()`` and ``lineas-bake --dry-run``; good maps on
the same non-leaf sites must still plan, bake and reproduce the hooked model.
"""

from __future__ import annotations

import re

import pytest
import torch
from bake_fixtures import logits
from tiny import save_tiny, tiny_model

from bake.api import bake
from bake.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from bake.errors import FoldError
from bake.plan.planner import ScaleFold, ShiftFold, plan
from lineas.hooks import SteeringError, attach_affine, steered
from lineas.maps import SiteMap, SteeringMaps


def _map(dim: int, seed: int = 0) -> SiteMap:
    g = torch.Generator().manual_seed(seed)
    return SiteMap(1 + 0.2 * torch.randn(dim, generator=g), 0.2 * torch.randn(dim, generator=g))


# site, map length, message the plan must give (a regex)
BAD = [
    pytest.param("", 64, r"site '' is the root module \(the whole LlamaForCausalLM\)", id="root"),
    pytest.param("model.layers.0", 32,
                 r"site 'model\.layers\.0': map has length 32 but the output feature axis has size 64", id="layer"),
    pytest.param("model.layers.1.self_attn", 48,
                 r"site 'model\.layers\.1\.self_attn': map has length 48 but the output feature axis has size 64",
                 id="attention-tuple-output"),
    pytest.param("model.layers.0.mlp", 96,
                 r"site 'model\.layers\.0\.mlp': map has length 96 but the output feature axis has size 64",
                 id="mlp"),
    pytest.param("model", 64, r"site 'model': the LlamaModel there outputs a BaseModelOutputWithPast, not a tensor",
                 id="model-output-object"),
]

GOOD = ["model.layers.0", "model.layers.1.self_attn", "model.layers.0.mlp"]


@pytest.mark.parametrize("site, dim, message", BAD)
def test_plan_refuses(site, dim, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FoldError, match=message):
        plan(model, {site: _map(dim)})
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the check pass left no hook behind


@pytest.mark.parametrize("site, dim, message", BAD)
def test_bake_refuses_the_same(site, dim, message):
    with pytest.raises(FoldError, match=message):
        bake(tiny_model("llama"), SteeringMaps({site: _map(dim)}), verify_tokens=2)


def test_every_non_leaf_site_is_checked_in_one_pass():
    """Several sites: the pass runs until the last of them, and every bad one is named."""
    maps = {"model.layers.0": _map(64), "model.layers.1.mlp": _map(96), "model.layers.1": _map(32)}
    with pytest.raises(FoldError) as err:
        plan(tiny_model("llama"), maps)
    lines = str(err.value).splitlines()
    assert [line.split("'")[1] for line in lines] == ["model.layers.1.mlp", "model.layers.1"]


def test_root_site_is_refused_by_the_hooks_too():
    model = tiny_model("llama")
    m = _map(64)
    with pytest.raises(SteeringError, match=r"site '' is the root module"):
        attach_affine(model, {"": (m.scale, m.shift)})
    assert sum(len(mod._forward_hooks) for mod in model.modules()) == 0


@pytest.mark.parametrize("site", GOOD)
def test_right_length_on_a_non_leaf_site_plans_and_bakes(site):
    """The same non-leaf sites with the right length: an affine module that reproduces the hooked model."""
    model = tiny_model("llama")
    maps = {site: _map(64)}
    p = plan(model, maps)
    (sp,) = p.sites
    assert sp.scale is ScaleFold.AFFINE and sp.shift is ShiftFold.AFFINE and p.affine_sites == (site,)
    base = logits(model)
    with steered(model, SteeringMaps(maps), 1.0):
        hooked = logits(model)
    assert not torch.allclose(hooked, base, atol=1e-3)
    baked = bake(model, SteeringMaps(maps), verify_tokens=2)
    assert baked.verified
    torch.testing.assert_close(logits(baked.model), hooked, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    save_tiny("llama", d)
    return d


@pytest.mark.parametrize("site, dim, message", BAD)
def test_dry_run_exits_2_like_the_real_run(site, dim, message, llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    maps_path = tmp_path / "bad.safetensors"
    SteeringMaps({site: _map(dim)}).save(maps_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for extra in (["--dry-run"], ["--out", str(tmp_path / "out")]):
        rc = main(["--model", str(llama_dir), "--maps", str(maps_path), *extra])
        err = capsys.readouterr().err
        assert rc == EXIT_BAD_INPUT, (extra, err)
        assert "Traceback" not in err
        assert any(line for line in err.splitlines() if re.search(message, line)), err
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temp folder


def test_dry_run_accepts_a_right_length_non_leaf_site(llama_dir, tmp_path, capsys):
    maps_path = tmp_path / "good.safetensors"
    SteeringMaps({"model.layers.0": _map(64)}).save(maps_path)
    assert main(["--model", str(llama_dir), "--maps", str(maps_path), "--dry-run"]) == EXIT_OK
    assert "model.layers.0" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny") / "tiny-llama-tied"
    save_tiny("llama_tied", d)
    return d


# site, map length, extra flags, exit code, where the text shows, text naming the CLI flag and the Python argument
FLAG_MESSAGES = [
    pytest.param("model.norm", 64, ["--require-standard"], EXIT_BAD_INPUT, "err",
                 "--require-standard (Python: require_standard=True)", id="require-standard"),
    pytest.param("lm_head", 128, [], EXIT_OK, "out", "pass --untie-embeddings (Python: untie=True)", id="tied"),
]


@pytest.mark.parametrize("site, dim, flags, code, stream, text", FLAG_MESSAGES)
def test_messages_name_the_cli_flag(site, dim, flags, code, stream, text, tied_llama_dir, tmp_path, capsys):
    maps_path = tmp_path / "m.safetensors"
    SteeringMaps({site: _map(dim)}).save(maps_path)
    rc = main(["--model", str(tied_llama_dir), "--maps", str(maps_path), "--dry-run", *flags])
    captured = capsys.readouterr()
    assert rc == code
    assert text in getattr(captured, stream)


def test_a_model_without_weights_plans_and_says_the_length_is_unchecked(caplog):
    """On the meta device no pass can run (and nothing can be baked): plan, but say what was not checked."""
    import transformers as tf
    from tiny import COMMON

    with torch.device("meta"):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON))
    with caplog.at_level("WARNING", logger="bake.plan.check"):
        p = plan(model, {"model.layers.0": _map(32)})
    assert p.affine_sites == ("model.layers.0",)
    assert "meta device" in caplog.text and "model.layers.0 is checked only when the steering hooks run" in caplog.text
