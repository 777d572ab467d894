"""Train what can be baked (``lineas-train --foldable``): the bake planner decides what is trained,
and the maps bake with ``--require-standard`` on every registry architecture."""

from __future__ import annotations

import json

import pytest
import torch
from bake_fixtures import save_tokenizer
from tiny import ARCHS, random_ids, save_tiny, tiny_model

from bake import FoldError, bake
from bake.cli.main import main as bake_main
from bake.plan.foldable import FOLD_PLANNER, METADATA_KEY, plan_foldable
from bake.registry.llm import entry_for, match_template
from lineas.cli import main as train_main
from lineas.evaluate import model_logits
from lineas.hooks import attach_maps
from lineas.learn.ot import fit_affine_1d, matched_quantiles
from lineas.learn.train import learn_maps
from lineas.maps import SteeringMaps

GEMMA2_NORMS = r"model\.layers\.\d+\.(input|post_attention|pre_feedforward|post_feedforward)_layernorm"
TRAIN = dict(steps=12, lr=0.05, batch_size=8, progress=False, planner=FOLD_PLANNER)  # as lineas-train plans


def _prompts(seed: int, hi: int = 128, n: int = 16) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, hi, (10,), generator=g).tolist() for _ in range(n)]


SOURCE, TARGET = _prompts(0), _prompts(1, hi=60)  # different token distributions: the maps must move


def _registry_sites(model) -> list[str]:
    """Every module a registry entry names (norms, producers), plus a decoder layer (nothing folds there)."""
    entry = entry_for(model.config)
    templates = [n.site for n in entry.norms] + [p.site for p in entry.producers]
    names = [n for n, _ in model.named_modules() if n]
    sites = [n for n in names if any(match_template(t, n) is not False for t in templates)]
    # the first decoder layer: model.layers.0, transformer.h.0
    layer = next(n for n in names if n.rsplit(".", 1)[-1] == "0" and n.count(".") <= 2)
    return sites + [layer]


def test_planner_decides_the_gemma2_norms():
    """The planner's facts, read back: post_* and pre_feedforward shifts need affine modules, the
    input_layernorm shift folds into q/k/v biases because attention_bias gets switched on."""
    model = tiny_model("gemma2")
    sites = [f"model.layers.0.{n}" for n in ("input_layernorm", "post_attention_layernorm",
                                             "pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp")]
    fold = plan_foldable(model, dict.fromkeys(sites, 64), "auto")
    assert fold.applied and fold.registry == "gemma2"
    got = {p.site.rsplit(".", 1)[-1]: (p.scale, p.shift) for p in fold.sites}
    assert got == {"input_layernorm": (True, True), "post_attention_layernorm": (True, False),
                   "pre_feedforward_layernorm": (True, False), "post_feedforward_layernorm": (True, False),
                   "mlp": (False, False)}
    assert "residual stream" in fold["model.layers.0.post_attention_layernorm"].shift_reason
    assert "gate_proj" in fold["model.layers.0.pre_feedforward_layernorm"].shift_reason
    assert [p.site for p in fold.excluded] == ["model.layers.0.mlp"]
    assert any(c.startswith("attention_bias=True") for c in fold.config_changes)


@pytest.mark.parametrize("arch", ARCHS)
def test_foldable_maps_bake_with_require_standard(arch):
    model = tiny_model(arch)
    sites = _registry_sites(model)
    result = learn_maps(model, None, SOURCE, TARGET, sites, **TRAIN)
    fold = result.foldable
    assert fold.applied and fold.registry == entry_for(model.config).model_type
    assert sites[-1] in {p.site for p in fold.excluded}  # the decoder layer: nothing folds
    assert result.maps.sites == fold.trained
    recorded = json.loads(result.maps.metadata[METADATA_KEY])
    assert recorded["applied"] and sites[-1] in recorded["excluded"]
    for site, m in result.maps.items():
        parts = fold[site]
        for name, trained, ident in (("scale", parts.scale, torch.ones_like(m.scale)),
                                     ("shift", parts.shift, torch.zeros_like(m.shift))):
            value = getattr(m, name)
            if trained:
                assert not torch.equal(value, ident), f"{site}.{name} was trained but did not move"
            else:
                assert torch.equal(value, ident), f"{site}.{name} must stay exactly at the identity"
    ids = random_ids()
    with attach_maps(model, result.maps, 1.0):
        hooked = model_logits(model, ids)
    assert (hooked - model_logits(model, ids)).abs().max() > 1e-3, "the maps must change the model"
    baked = bake(model, result.maps, require_standard=True, verify_tokens=4)  # verified: baked == hooked
    assert baked.plan.fully_folded and baked.report.passed


def test_free_gemma2_maps_are_refused_by_require_standard():
    """The same sites trained with --foldable off: the check above can fail."""
    model = tiny_model("gemma2")
    free = learn_maps(model, None, SOURCE, TARGET, [GEMMA2_NORMS], foldable="off", **TRAIN)
    assert not free.foldable.applied
    with pytest.raises(FoldError, match="post_attention_layernorm"):
        bake(model, free.maps, require_standard=True, verify=False)


@pytest.mark.parametrize("init", ["linear-act-method", "linear-act-init"])
def test_linear_act_is_projected_onto_the_foldable_set(init):
    model = tiny_model("gemma2")
    kw = {"method": "linear-act"} if init == "linear-act-method" else {"init": "linear-act"}
    result = learn_maps(model, None, SOURCE, TARGET, [GEMMA2_NORMS], **{**TRAIN, **kw})
    post = result.maps["model.layers.0.post_attention_layernorm"]
    assert torch.equal(post.shift, torch.zeros_like(post.shift)) and not torch.equal(post.scale, torch.ones(64))
    pre = result.maps["model.layers.1.input_layernorm"]
    assert pre.shift.abs().max() > 0


def test_constrained_closed_form_is_least_squares():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(40, 3, generator=g, dtype=torch.float64)
    tgt = 2 * src + 1 + 0.3 * torch.randn(40, 3, generator=g, dtype=torch.float64)
    x, y = matched_quantiles(src, tgt)
    scale, shift = fit_affine_1d(src, tgt, fit_shift=False)
    want = torch.stack([torch.linalg.lstsq(x[:, j:j + 1], y[:, j:j + 1]).solution[0, 0] for j in range(3)])
    assert torch.equal(shift, torch.zeros(3, dtype=torch.float64)) and torch.allclose(scale, want)
    scale, shift = fit_affine_1d(src, tgt, fit_scale=False)
    assert torch.equal(scale, torch.ones(3, dtype=torch.float64)) and torch.allclose(shift, (y - x).mean(0))
    free_scale, _ = fit_affine_1d(src, tgt)
    assert not torch.allclose(free_scale, want)  # the constraint changes the fit


def test_auto_needs_a_registry_entry_and_on_does_not():
    import transformers as tf

    cfg = tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()  # GPT-J: no registry entry
    sites = {"transformer.h.0.ln_1": 64, "transformer.h.0.mlp": 64}
    auto = plan_foldable(model, sites, "auto")
    assert not auto.applied and auto.parts() is None and "registry" in auto.note
    on = plan_foldable(model, sites, "on")
    assert on.applied and on.registry is None and [p.site for p in on.excluded] == ["transformer.h.0.mlp"]
    assert on["transformer.h.0.ln_1"].shift  # a LayerNorm's own bias takes the shift


def test_nothing_foldable_is_an_error_naming_the_sites():
    with pytest.raises(ValueError, match="leaves nothing to train") as e:
        learn_maps(tiny_model("llama"), None, SOURCE, TARGET, [r"model\.layers\.\d+\.mlp"], **TRAIN)
    assert "model.layers.0.mlp" in str(e.value) and "--foldable off" in str(e.value)


def test_cli_gemma2_four_norms_bake_standard(tmp_path, capsys):
    """The acceptance case: all four Gemma-2 norms steered; --foldable maps bake with --require-standard
    and 0 affine modules, the free maps are refused."""
    model_dir = tmp_path / "gemma2"
    save_tiny("gemma2", model_dir)
    save_tokenizer(model_dir)
    (tmp_path / "a.txt").write_text("\n".join(f"the {w} was bad and slow" for w in "abcdefgh") + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"a {w} is good , kind and fast" for w in "abcdefgh") + "\n")
    common = ["--model", str(model_dir), "--source", str(tmp_path / "a.txt"), "--target", str(tmp_path / "b.txt"),
              "--sites", GEMMA2_NORMS, "--steps", "10", "--lr", "0.05", "--batch-size", "4", "--quiet"]
    assert train_main([*common, "--foldable", "--out", str(tmp_path / "fold.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "6 shift(s) frozen at 0" in printed and "model.layers.0.post_attention_layernorm: shift frozen" in printed
    assert train_main([*common, "--foldable", "off", "--out", str(tmp_path / "free.safetensors")]) == 0
    meta = json.loads(SteeringMaps.load(tmp_path / "fold.safetensors").metadata[METADATA_KEY])
    assert meta["mode"] == "on" and len(meta["frozen"]) == 6 and meta["registry"] == "gemma2"
    capsys.readouterr()
    rc = bake_main(["--model", str(model_dir), "--maps", str(tmp_path / "fold.safetensors"), "--require-standard",
                    "--out", str(tmp_path / "baked"), "--verify-tokens", "2"])
    assert rc == 0 and "0 affine modules" in capsys.readouterr().out
    rc = bake_main(["--model", str(model_dir), "--maps", str(tmp_path / "free.safetensors"), "--require-standard",
                    "--out", str(tmp_path / "refused")])
    assert rc == 2 and "post_attention_layernorm" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    bad = [*common, "--out", str(tmp_path / "none.safetensors")]
    bad[bad.index(GEMMA2_NORMS)] = r"model\.layers\.\d+\.mlp"
    assert train_main(bad) == 2
    assert "model.layers.1.mlp: left out" in capsys.readouterr().err and not (tmp_path / "none.safetensors").exists()


def _gemma2_with_prompts(tmp_path):
    model_dir = tmp_path / "gemma2"
    save_tiny("gemma2", model_dir)
    save_tokenizer(model_dir)
    (tmp_path / "a.txt").write_text("\n".join(f"the {w} was bad and slow" for w in "abcdefgh") + "\n")
    (tmp_path / "b.txt").write_text("\n".join(f"a {w} is good , kind and fast" for w in "abcdefgh") + "\n")
    return model_dir, ["--model", str(model_dir), "--source", str(tmp_path / "a.txt"), "--target",
                       str(tmp_path / "b.txt"), "--sites", GEMMA2_NORMS, "--steps", "10", "--lr", "0.05",
                       "--batch-size", "4", "--quiet"]


def test_require_runtime_llama_cpp_freezes_shifts_behind_an_unserved_bias_flag(tmp_path, capsys):
    """Gemma-2's input_layernorm shift folds into q/k/v biases (attention_bias), which llama.cpp's Gemma-2 does
    not load: --foldable maps are standard but not servable there; --require-runtime llama.cpp freezes that shift
    too, and the maps then pass lineas-bake --require-runtime llama.cpp (what --format gguf requires)."""
    model_dir, common = _gemma2_with_prompts(tmp_path)
    assert train_main([*common, "--out", str(tmp_path / "std.safetensors")]) == 0
    capsys.readouterr()
    rc = bake_main(["--model", str(model_dir), "--maps", str(tmp_path / "std.safetensors"), "--require-runtime",
                    "llama.cpp", "--out", str(tmp_path / "refused")])
    err = capsys.readouterr().err
    assert rc == 2 and "llama.cpp: no" in err and "attention_bias" in err and not (tmp_path / "refused").exists()
    assert "lineas-train --require-runtime llama.cpp" in err  # the way out

    assert train_main([*common, "--require-runtime", "llamacpp", "--out", str(tmp_path / "gguf.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "for llama.cpp" in printed and "8 shift(s) frozen at 0" in printed
    assert ("model.layers.0.input_layernorm: shift frozen (llama.cpp: its gemma2 does not serve attention_bias"
            in printed)
    maps = SteeringMaps.load(tmp_path / "gguf.safetensors")
    meta = json.loads(maps.metadata[METADATA_KEY])
    assert meta["runtimes"] == ["llama.cpp"] and "model.layers.1.input_layernorm" in meta["frozen"]
    assert all(torch.equal(maps[s].shift, torch.zeros_like(maps[s].shift)) for s in maps.sites)
    assert any(not torch.equal(maps[s].scale, torch.ones_like(maps[s].scale)) for s in maps.sites)  # it learned
    rc = bake_main(["--model", str(model_dir), "--maps", str(tmp_path / "gguf.safetensors"), "--require-standard",
                    "--require-runtime", "llama.cpp", "--out", str(tmp_path / "baked"), "--verify-tokens", "2"])
    assert rc == 0 and "0 affine modules" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needle", [
    (["--require-runtime", "nope"], "--require-runtime got 'nope', not a runtime"),
    (["--require-runtime", "llama.cpp", "--foldable", "off"], "--foldable off does not train"),
])
def test_require_runtime_bad_input_is_refused_before_training(extra, needle, tmp_path, capsys):
    _, common = _gemma2_with_prompts(tmp_path)
    out = tmp_path / "m.safetensors"
    assert train_main([*common, *extra, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and not out.exists()


def test_without_a_planner_auto_trains_every_part_and_says_why():
    """lineas never imports the baker: a Python caller that passes no planner gets foldable auto not applied."""
    model = tiny_model("gemma2")
    kw = {k: v for k, v in TRAIN.items() if k != "planner"}
    result = learn_maps(model, None, SOURCE, TARGET, [GEMMA2_NORMS], **kw)
    fold = result.foldable
    assert not fold.applied and fold.parts() is None and fold.mode.value == "auto"
    assert "no fold planner given" in fold.note and "FOLD_PLANNER" in fold.note
    post = result.maps["model.layers.0.post_attention_layernorm"]
    assert not torch.equal(post.shift, torch.zeros_like(post.shift))  # trained: nothing was frozen
    assert not json.loads(result.maps.metadata[METADATA_KEY])["applied"]


@pytest.mark.parametrize("extra", [{"foldable": "on"}, {"runtimes": ("llama.cpp",)}])
def test_foldable_on_or_runtimes_without_a_planner_is_refused(extra):
    from lineas.learn.config import ConfigError

    kw = {k: v for k, v in TRAIN.items() if k != "planner"}
    with pytest.raises(ConfigError, match="planner is required") as e:
        learn_maps(tiny_model("llama"), None, SOURCE, TARGET, [r"model\.layers\.0\.input_layernorm"], **kw, **extra)
    assert e.value.field == "planner" and "FOLD_PLANNER" in str(e.value)


def test_the_planner_reads_runtime_names_as_the_bake_does():
    """TrainConfig keeps runtimes as plain strings; bake's planner spells them (llamacpp -> llama.cpp)."""
    from bake.plan.foldable import runtime_names
    from lineas.learn.config import ConfigError, TrainConfig

    assert TrainConfig(runtimes=("llamacpp", "llamacpp")).runtimes == ("llamacpp",)
    assert runtime_names(["llamacpp", "gguf", "vllm"]) == ("llama.cpp", "vllm")
    with pytest.raises(ConfigError, match="got 'nope', not a runtime"):
        runtime_names(["nope"])
    fold = plan_foldable(tiny_model("gemma2"), {"model.layers.0.input_layernorm": 64}, "auto", ["llamacpp"])
    assert fold.runtimes == ("llama.cpp",) and not fold["model.layers.0.input_layernorm"].shift


def test_learning_does_not_import_the_baker():
    """Only lineas.cli and lineas.demo compose lineas with bake (pyproject's import-linter contracts)."""
    import subprocess
    import sys

    code = ("import sys, lineas.learn.train, lineas.learn.pipeline_collect, lineas.learn.mlact, lineas.models, "
            "lineas.hub_checkpoint, lineas.evaluate; "
            "print(sorted(m for m in sys.modules if m == 'bake' or m.startswith('bake.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
