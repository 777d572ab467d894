"""Verification: probes, metrics, tolerance table, per-site report, and the bake API's verify step."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from bake_fixtures import (
    LLAMA_SITES,
    assert_close_rel,
    corrupt_bake,
    logits,
    make_maps,
    save_tokenizer,
    setup_model,
)
from tiny import tiny_model

from bake import VerificationError, bake
from bake.verify.check import (
    VerificationReport,
    compare,
    greedy_tokens,
    probe_stats,
    record_reference,
    site_divergence,
    torch_runner,
    watch_modules,
)
from bake.verify.noise_floor import SAMPLES
from bake.verify.probes import build_greedy_prompts, build_probes
from bake.verify.tolerances import TOLERANCES, Tolerance, get_tolerance, register_tolerance
from lineas.hooks import count_forward_hooks, steered
from lineas.maps import SiteMap, SteeringMaps, effective_maps


def affines(maps, strength=1.0):
    return {s: (m.scale, m.shift) for s, m in effective_maps([(maps, strength)]).items()}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def maps():
    return make_maps(LLAMA_SITES)


# ----------------------------------------------------------------------------- probes
def test_probes_without_tokenizer_are_random_ids_with_a_padded_batch(llama):
    probes = build_probes(llama, None)
    kinds = {p.kind for p in probes}
    assert kinds == {"random", "padded"}
    assert len({p.input_ids.shape[1] for p in probes if p.kind == "random"}) >= 3  # several lengths
    for p in probes:
        assert int(p.input_ids.max()) < 128 and int(p.input_ids.min()) >= 0
    padded = next(p for p in probes if p.kind == "padded")
    assert padded.input_ids.shape[0] > 1 and (padded.attention_mask == 0).any()
    # right padding: every row starts with real tokens
    assert bool(padded.attention_mask[:, 0].all())
    assert build_probes(llama, None)[0].input_ids.equal(probes[0].input_ids)  # deterministic
    assert all(p.numel() > 0 for p in build_greedy_prompts(llama, None))


def test_probes_with_tokenizer_include_prompts(llama, tmp_path):
    tok = save_tokenizer(tmp_path)
    probes = build_probes(llama, tok)
    from bake.verify.probes import PROMPTS

    (prompts,) = [p for p in probes if p.kind == "prompt"]
    assert prompts.input_ids.shape[0] == len(PROMPTS)  # one right-padded batch
    assert bool(prompts.attention_mask[:, 0].all()) and (prompts.attention_mask == 0).any()
    greedy = build_greedy_prompts(llama, tok)
    assert greedy.shape[0] == 3 and greedy.shape[1] >= 2  # one unpadded batch
    assert any(p.kind == "random" for p in probes)


# ----------------------------------------------------------------------------- metrics
def test_max_rel_is_max_abs_error_over_max_abs_reference():
    ref = torch.tensor([[[1.0, -4.0, 2.0], [0.5, 0.0, 0.0]]])
    cand = ref.clone()
    cand[0, 1, 2] += 0.02  # error at a position whose own logits are tiny
    mask = torch.ones(1, 2, dtype=torch.int64)
    stats, _ = probe_stats("p", ref, cand, mask)
    assert stats.max_abs == pytest.approx(0.02)
    assert stats.max_rel == pytest.approx(0.02 / 4.0)
    assert stats.top1 == 1.0
    # a padded position is ignored entirely
    mask[0, 1] = 0
    stats, _ = probe_stats("p", ref, cand, mask)
    assert stats.max_abs == 0.0 and stats.positions == 1


def test_kl_and_top1_detect_a_flipped_argmax():
    ref = torch.tensor([[[3.0, 1.0, 0.0]]])
    cand = torch.tensor([[[1.0, 3.0, 0.0]]])
    stats, _ = probe_stats("p", ref, cand, torch.ones(1, 1, dtype=torch.int64))
    assert stats.top1 == 0.0 and stats.mean_kl > 0.1


def test_nan_candidate_fails(llama, maps):
    ref = record_reference(llama, affines(maps), n_tokens=2)
    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    check, _ = compare(broken, ref, "torch-float32", label="nan")
    assert not check.passed
    assert not math.isfinite(check.max_abs)
    assert VerificationReport(checks=[check]).to_json()  # still valid JSON


# ----------------------------------------------------------------------------- tolerance table
def test_every_tolerance_row_has_a_reason_and_fp32_is_strict():
    for tol in TOLERANCES.values():
        assert len(tol.reason) > 40, tol.name
    fp32 = get_tolerance("torch-float32")
    assert fp32.greedy_identical and fp32.min_top1 == 1.0 and fp32.gating and fp32.noise_multiple
    assert not get_tolerance("reload-bfloat16").gating
    with pytest.raises(KeyError, match="no tolerance row"):
        get_tolerance("onnx-int4")


def test_max_rel_limit_is_a_multiple_of_the_noise_floor_between_bounds():
    tol = Tolerance(name="t", max_rel=1e-6, max_mean_kl=None, min_top1=None, greedy_identical=False, gating=True,
                    reason="test", noise_multiple=4.0, max_rel_ceiling=1e-4)
    assert tol.max_rel_limit(None) == 1e-6  # not measured: the fixed bound
    assert tol.max_rel_limit(1e-8) == 1e-6  # a floor of ~0 cannot make the limit vanish
    assert tol.max_rel_limit(5e-6) == pytest.approx(2e-5)
    assert tol.max_rel_limit(1.0) == 1e-4  # a model too noisy to verify in fp32 does not pass everything
    assert tol.max_rel_limit(float("nan")) == 1e-6
    fixed = Tolerance(name="f", max_rel=1e-4, max_mean_kl=None, min_top1=None, greedy_identical=False,
                      gating=True, reason="test")
    assert fixed.max_rel_limit(1.0) == 1e-4


def test_table_is_extensible():
    row = register_tolerance(Tolerance("test-backend-float32", 1e-4, None, None, False, True, "a test row " * 5))
    try:
        assert get_tolerance("test-backend-float32") is row
    finally:
        TOLERANCES.pop("test-backend-float32")


# ----------------------------------------------------------------------------- reference and comparison
def test_reference_is_hooked_and_leaves_no_hooks(llama, maps):
    before = count_forward_hooks(llama)
    ref = record_reference(llama, affines(maps), n_tokens=3)
    assert count_forward_hooks(llama) == before
    probe = ref.probes[0]
    with torch.no_grad():
        base = llama(input_ids=probe.input_ids).logits
    assert not torch.allclose(base, ref.logits[0], atol=1e-3)  # the maps do something
    with steered(llama, maps, 1.0), torch.no_grad():
        hooked = llama(input_ids=probe.input_ids).logits
    torch.testing.assert_close(hooked, ref.logits[0])
    assert all(len(g) == 3 for g in ref.greedy)
    assert set(LLAMA_SITES) <= set(ref.activations)


def test_hooked_model_passes_and_perturbed_copy_fails_with_site_report(llama, maps):
    aff = affines(maps)
    ref = record_reference(llama, aff, n_tokens=4)
    with steered(llama, maps, 1.0):
        same, _ = compare(llama, ref, "torch-float32", label="same")
    # Not bitwise: the reference's passes carry other rows (greedy steps, noise-floor units) than the
    # candidate's, and a different batch composition rounds differently in float32.
    assert same.passed and same.max_rel < 1e-6 and same.greedy_matched == same.greedy_total

    broken = copy.deepcopy(llama)
    with torch.no_grad():
        broken.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
    with steered(broken, maps, 1.0):
        check, acts = compare(broken, ref, "torch-float32", label="perturbed")
    assert not check.passed and check.max_rel > 1e-5
    assert any("max relative" in f for f in check.failures)
    report = VerificationReport.for_reference(ref)
    report.add(check)
    report.sites = site_divergence(ref, acts, aff)
    assert not report.passed
    by_name = {s.module: s for s in report.sites}
    # everything before layer 1's o_proj is untouched; the first watched module after it diverges
    assert by_name["model.layers.0"].max_rel == 0.0
    assert by_name["model.layers.1.input_layernorm"].max_rel == 0.0
    assert by_name["model.layers.1"].max_rel > 1e-5
    table = report.site_table()
    first = next(line for line in table.splitlines() if "first divergence" in line)
    assert first.split()[0] == "model.layers.1.mlp.down_proj"
    assert "FAIL" in report.to_table()


def test_watch_modules_lists_sites_and_layers_in_model_order(llama):
    names = watch_modules(llama, ["model.layers.1.input_layernorm"])
    assert names == ["model.layers.0", "model.layers.1", "model.layers.1.input_layernorm"]


# ----------------------------------------------------------------------------- the API's verify step
def test_bake_api_verifies_and_leaves_the_input_module_untouched(llama, maps):
    original = {k: v.clone() for k, v in llama.state_dict().items()}
    baked = bake(llama, maps, strength=0.7, verify_tokens=4)
    assert baked.verified and baked.report.checks[0].max_rel <= 1e-5
    for k, v in llama.state_dict().items():
        assert torch.equal(v, original[k]), k
    with steered(llama, maps, 0.7):
        hooked = logits(llama)
    base = logits(llama)
    assert not torch.allclose(hooked, base, atol=1e-3)
    assert count_forward_hooks(baked.model) == 0
    assert_close_rel(logits(baked.model), hooked)


def test_bake_api_raises_verification_error_with_report(llama, maps, monkeypatch):
    corrupt_bake(monkeypatch, "gate_proj", 1.05)
    with pytest.raises(VerificationError) as e:
        bake(llama, maps, strength=1.0, verify_tokens=2)
    report = e.value.report
    assert not report.passed and report.failures
    assert "model.layers.1" in report.site_table()


def test_no_verify_marks_the_report_skipped(llama, maps):
    baked = bake(llama, maps, verify=False)
    assert baked.report.skipped and not baked.verified and baked.reference is None
    assert "SKIPPED" in baked.report.to_table()


# ----------------------------------------------------------------------------- noise floor and bad references
def test_reference_measures_a_noise_floor_and_the_check_uses_it(llama, maps):
    baked = bake(llama, maps, strength=1.0, verify_tokens=2)
    floor = baked.reference.noise_floor
    assert 0 < floor.max_rel < 1e-5
    assert len(floor.samples) == SAMPLES and floor.max_rel == max(floor.samples) and len(set(floor.samples)) > 1
    check = baked.report.checks[0]
    assert check.max_rel_limit == get_tolerance("torch-float32").max_rel_limit(floor.max_rel)
    data = baked.report.to_dict()
    assert data["noise_floor"]["max_rel"] == floor.max_rel
    assert data["checks"][0]["max_rel_limit"] == check.max_rel_limit
    assert "noise floor" in baked.report.to_table()


def test_non_finite_hooked_reference_is_bad_input_naming_where(llama):
    from bake import FoldError
    from bake.verify.check import NonFiniteReferenceError

    site = "model.layers.0.input_layernorm"
    huge = SteeringMaps({site: SiteMap(torch.full((64,), 1e30), torch.zeros(64))}, {"method": "test"})
    with torch.no_grad():  # the hooked model really is non-finite: not a fold problem
        ids = build_probes(llama, None)[0].input_ids
        with steered(llama, huge, 1.0):
            assert not torch.isfinite(llama(input_ids=ids).logits).all()
    with pytest.raises(NonFiniteReferenceError) as e:
        bake(llama, huge, strength=1.0, verify_tokens=2)
    assert isinstance(e.value, FoldError)
    msg = str(e.value)
    assert "hooked model" in msg and "itself not finite" in msg and "first at module 'model.layers.0." in msg
    assert repr(site) in msg and "1e+30" in msg


def test_cli_non_finite_reference_exits_2_and_writes_nothing(tmp_path, capsys):
    from bake.cli.main import EXIT_BAD_INPUT, main

    model_dir, _ = setup_model(tmp_path)
    site = "model.layers.0.input_layernorm"
    maps_path = tmp_path / "huge.safetensors"
    SteeringMaps({site: SiteMap(torch.full((64,), 1e30), torch.zeros(64))}, {"method": "test"}).save(maps_path)
    out = tmp_path / "out"
    code = main(["--model", str(model_dir), "--maps", str(maps_path), "--out", str(out), "--verify-tokens", "2"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert "itself not finite" in err and "does not reproduce" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("lineas_")]


def test_rounding_perturbation_moves_every_entry_by_exactly_one_ulp():
    from bake.verify.noise_floor import rounding_perturbed

    g = torch.Generator().manual_seed(0)
    s, t = 1 + 0.2 * torch.randn(256, generator=g), 0.2 * torch.randn(256, generator=g)
    (ps, pt), = rounding_perturbed({"site": (s, t)}, seed=0).values()
    for x, y in ((s, ps), (t, pt)):
        assert (x != y).all() and torch.equal(torch.nextafter(y, x), x)  # one representable step, no more
        assert (y > x).any() and (y < x).any()  # random direction
    (qs, _), = rounding_perturbed({"site": (s, t)}, seed=1).values()
    assert not torch.equal(ps, qs)


def test_teacher_forced_greedy_finds_the_candidates_own_first_divergence(llama, maps):
    """Candidates are not decoded token by token: they are teacher-forced on the reference's greedy
    tokens.  The first divergence found that way must be where the candidate's own greedy decoding
    first differs."""
    aff = affines(maps)
    ref = record_reference(llama, aff, n_tokens=6)
    broken = copy.deepcopy(llama)
    chosen = ref.greedy[0][2]
    other = 7 if chosen != 7 else 8
    with torch.no_grad():  # another token takes twice the logit of the one chosen at step 2: decoding changes
        broken.lm_head.weight[other] = broken.lm_head.weight[chosen] * 2
    with steered(broken, maps, 1.0):
        check, _ = compare(broken, ref, "torch-float32", label="broken")
        own = greedy_tokens(torch_runner(broken), ref.greedy_prompts, ref.n_tokens)
    firsts = [next((i for i, (a, b) in enumerate(zip(w, o)) if a != b), None) for w, o in zip(ref.greedy, own)]
    assert any(f is not None for f in firsts)  # the corruption changed decoding: the check below can fail
    assert [d["first_mismatch"] for d in check.greedy_detail] == firsts
    for d, o, f in zip(check.greedy_detail, own, firsts):
        assert d["candidate"] == (o if f is None else o[:f + 1])


def test_passes_split_by_the_logits_budget_give_the_same_reference(llama, maps, monkeypatch):
    """A large vocabulary splits the probes over several passes: same logits, same recorded activations."""
    import bake.verify.passes as passes

    aff = affines(maps)
    whole = record_reference(llama, aff, n_tokens=3, noise_floor=False)
    real = llama.forward
    calls = []
    monkeypatch.setattr(llama, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(passes, "LOGITS_BUDGET", 4 * 128 * 40)  # 40 positions of the tiny vocabulary per pass
    split = record_reference(llama, aff, n_tokens=3, noise_floor=False)
    assert len(calls) > 3  # the widest probes do not fit beside the greedy steps: passes of their own
    for a, b in zip(whole.logits, split.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert whole.greedy == split.greedy
    assert sorted(whole.activations) == sorted(split.activations)
    for k in whole.activations:
        torch.testing.assert_close(whole.activations[k], split.activations[k], rtol=1e-5, atol=1e-5)
