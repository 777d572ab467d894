"""The hooked reference in few forward passes (bake/verify/schedule.py, bake.verify.passes.pack_passes) and
the per-row steering hook it relies on (lineas.hooks.attach_row_affines)."""

from __future__ import annotations

import pytest
import torch
from bake_fixtures import LLAMA_SITES, make_maps
from tiny import tiny_model
from torch import nn

import bake.verify.passes as passes
import bake.verify.schedule as reference_schedule
from bake.verify.check import _diag_index, record_outputs, record_reference, watch_modules
from bake.verify.noise_floor import SAMPLES, NoiseFloor, rounding_perturbed
from bake.verify.passes import (
    greedy_tokens,
    pack_passes,
    position_cap,
    run_grouped,
    torch_runner,
)
from bake.verify.probes import Probe, build_greedy_prompts, build_probes, model_vocab_size
from bake.verify.schedule import ReferenceSchedule
from bake.verify.stats import logit_stats
from lineas.config_compat import transformers_major
from lineas.embedding_scale import outside_scale
from lineas.hooks import SteeringError, attach_affine, attach_row_affines
from lineas.maps import effective_maps


def affines(maps):
    return {s: (m.scale, m.shift) for s, m in effective_maps([(maps, 1.0)]).items()}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def aff():
    return affines(make_maps(LLAMA_SITES))


def counted(model, monkeypatch) -> list:
    """Calls of ``model.forward`` from now on (one per forward pass)."""
    real, calls = model.forward, []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def old_reference(model, aff, n_tokens, perturbed=rounding_perturbed):
    """The reference as recorded before the schedule: the probes and the first greedy step under the
    hooked maps in one grouped run, the other greedy steps alone, then the probes under each perturbation."""
    probes, prompts = build_probes(model), build_greedy_prompts(model)
    run, vocab = torch_runner(model), model_vocab_size(model)
    batches = [(p.input_ids, p.attention_mask) for p in probes]
    watch = watch_modules(model, aff)
    with attach_affine(model, aff):
        outs, acts = run_grouped(run, batches + [(prompts, torch.ones_like(prompts))], vocab,
                                 first=_diag_index(probes), record=lambda rows: record_outputs(model, watch, rows))
        first = outs.pop()[:, -1].argmax(-1, keepdim=True)
        rest = greedy_tokens(run, torch.cat([prompts, first], 1), n_tokens - 1)
    samples = []
    for seed in range(SAMPLES):
        with attach_affine(model, perturbed(aff, seed=seed)):
            cand, _ = run_grouped(run, batches, vocab)
        samples.append(logit_stats(probes, outs, cand))
    greedy = [[f, *r] for f, r in zip(first[:, 0].tolist(), rest)]
    return outs, greedy, acts, samples


def assert_same_reference(ref, old_logits, old_greedy, old_acts):
    assert ref.greedy == old_greedy
    for new, old in zip(ref.logits, old_logits, strict=True):
        assert new.shape == old.shape
        torch.testing.assert_close(new, old, rtol=0, atol=1e-5 * float(old.abs().max()))
    assert list(ref.activations) == list(old_acts)  # execution order, the diagnostic probe's rows only
    for k, old in old_acts.items():
        assert ref.activations[k].shape == old.shape
        torch.testing.assert_close(ref.activations[k], old, rtol=0, atol=1e-5 * float(old.abs().max()))


# ----------------------------------------------------------------------------- passes
def test_reference_takes_n_tokens_passes_and_equals_the_old_way(llama, aff, monkeypatch):
    n_tokens = 5
    calls = counted(llama, monkeypatch)
    old_logits, old_greedy, old_acts, old_samples = old_reference(llama, aff, n_tokens)
    old_passes = len(calls)
    calls.clear()
    ref = record_reference(llama, aff, n_tokens=n_tokens)
    assert len(calls) == n_tokens < old_passes
    assert_same_reference(ref, old_logits, old_greedy, old_acts)
    old_floor = NoiseFloor.worst_of(old_samples)
    assert len(ref.noise_floor.samples) == SAMPLES and ref.noise_floor.max_rel == max(ref.noise_floor.samples)
    # Another batch composition rounds differently: the same size of noise, not the same bits.
    assert old_floor.max_rel / 10 < ref.noise_floor.max_rel < old_floor.max_rel * 10
    assert 0 < ref.noise_floor.mean_kl < old_floor.mean_kl * 100


def test_one_token_and_a_small_budget_add_passes_only_as_needed(llama, aff, monkeypatch):
    calls = counted(llama, monkeypatch)
    record_reference(llama, aff, n_tokens=1)
    assert len(calls) == 1  # the tiny vocabulary: everything fits beside the one greedy step
    monkeypatch.setattr(passes, "LOGITS_BUDGET", 4 * 128 * 70)  # 70 positions per pass
    calls.clear()
    record_reference(llama, aff, n_tokens=1)
    probes, prompts = build_probes(llama), build_greedy_prompts(llama)
    # every probe hooked, under each noise-floor sample and unsteered (the base, for bake.verify.guard)
    positions = sum(p.input_ids.numel() for p in probes) * (2 + SAMPLES) + prompts.numel()
    assert 1 < len(calls) <= positions // 70 + 2  # a pass of its own for what does not fit, close to the bound


@pytest.mark.parametrize("budget", [None, 40])
def test_every_row_group_gets_its_own_maps(llama, aff, monkeypatch, budget):
    """Perturbations far from one ulp (a different scale per sample): a unit steered by another
    unit's maps would show in the hooked logits, the greedy tokens or the per-probe floor statistics."""
    def far(affines, *, seed):
        return {s: (t * (1.5 + seed), b - 1.0 - seed) for s, (t, b) in affines.items()}

    if budget is not None:  # passes of their own and perturbed units before their hooked one
        monkeypatch.setattr(passes, "LOGITS_BUDGET", 4 * 128 * budget)
    monkeypatch.setattr(reference_schedule, "rounding_perturbed", far)
    old_logits, old_greedy, old_acts, old_samples = old_reference(llama, aff, 4, perturbed=far)
    for seed in range(SAMPLES):  # the variants' greedy tokens differ: misplaced greedy rows would show
        with attach_affine(llama, far(aff, seed=seed)):
            assert greedy_tokens(torch_runner(llama), build_greedy_prompts(llama), 4) != old_greedy
    ref = record_reference(llama, aff, n_tokens=4)
    assert_same_reference(ref, old_logits, old_greedy, old_acts)
    assert ref.noise_floor.samples == pytest.approx(tuple(s.max_rel for s in old_samples), rel=1e-4)
    assert ref.noise_floor.samples[0] != pytest.approx(ref.noise_floor.samples[1], rel=1e-2)
    assert ref.noise_floor.mean_kl == pytest.approx(max(old_samples, key=lambda s: s.max_rel).mean_kl, rel=1e-4)


# ----------------------------------------------------------------------------- packing
def shaped_probes(shapes):
    return [Probe(f"p{i}", "random", torch.zeros(r, w, dtype=torch.int64), torch.ones(r, w, dtype=torch.int64))
            for i, (r, w) in enumerate(shapes)]


GEMMA_PROBES = [(2, 1), (2, 7), (2, 33), (3, 19)]  # the random probes of a 256k-vocabulary model, no tokenizer
GEMMA_PROMPTS = torch.zeros(3, 6, dtype=torch.int64)
GEMMA_VOCAB = 256000


@pytest.mark.parametrize("n_tokens,before", [(8, 13), (3, 8), (1, 6)])
def test_schedule_of_a_large_vocabulary_fits_the_budget_in_fewer_passes(n_tokens, before):
    """``before``: the passes of the unscheduled reference (probes and first greedy step in 2, the other
    greedy steps alone, 2 per noise-floor sample)."""
    probes = shaped_probes(GEMMA_PROBES)
    sched = ReferenceSchedule.build(probes, GEMMA_PROMPTS, n_tokens, samples=SAMPLES, vocab=GEMMA_VOCAB)
    cap = position_cap(GEMMA_VOCAB)
    assert sorted(i for m in sched.passes for i in m) == list(range(len(probes) * (1 + SAMPLES)))
    assert n_tokens <= len(sched.passes) < before
    for k, members in enumerate(sched.passes):
        shapes = [tuple(probes[sched.units[i].probe].input_ids.shape) for i in members]
        shapes += [(3, 6 + k)] if k < n_tokens else []
        assert sum(r for r, _ in shapes) * max(w for _, w in shapes) <= cap
    if n_tokens == 8:
        assert len(sched.passes) == 8
        # Before: 231 + 30 (probes and first step) + 3 x (7..13) (greedy) + 2 x (231 + 2) (noise floor).
        assert sched.padded_positions(probes, GEMMA_PROMPTS) < 231 + 30 + 3 * sum(range(7, 14)) + 2 * 233


def test_pack_passes_prefers_a_pass_not_before_the_one_named():
    # Two fixed passes; unit 1 would add least to pass 0 but should not run before unit 0 (in pass 1).
    members = pack_passes([(1, 10), (1, 3)], cap=100, fixed=[(1, 3), (1, 10)], not_before=[None, 0])
    assert members == [[], [0, 1]]
    assert pack_passes([(1, 10), (1, 3)], cap=100, fixed=[(1, 3), (1, 10)]) == [[1], [0]]
    assert pack_passes([(5, 10), (1, 3)], cap=20) == [[0], [1]]  # larger than the cap: a pass of its own


# ----------------------------------------------------------------------------- per-row hook
class Holder(nn.Module):
    def __init__(self, site: nn.Module):
        super().__init__()
        self.site = site


def per_row_and_alone(model, site_name, site, x, groups):
    """The site's output with ``groups`` steered in one batch, and each group hooked alone on its rows."""
    with attach_row_affines(model, groups):
        together = site(x)
    alone, start = [], 0
    for rows, maps in groups:
        with attach_affine(model, maps):
            alone.append(site(x[start:start + rows]))
        start += rows
    return together, alone


CASES = {
    "layernorm-bf16": lambda: (Holder(nn.LayerNorm(8, dtype=torch.bfloat16)), "site", torch.randn(5, 3, 8).bfloat16()),
    "groupnorm-channels-first": lambda: (Holder(nn.GroupNorm(2, 8)), "site", torch.randn(5, 8, 3, 2)),
    "gemma-embedding-outside-factor": lambda: (tiny_model("gemma"), "model.embed_tokens",
                                               torch.randint(0, 128, (5, 4))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_row_hook_is_bitwise_each_group_hooked_alone(case):
    torch.manual_seed(0)
    model, name, x = CASES[case]()
    site = dict(model.named_modules())[name]
    with torch.no_grad():
        site.weight.add_(0.1 * torch.randn_like(site.weight))
    assert torch.equal(site(x)[:2], site(x[:2]))  # the module itself is row by row: the hook is what is compared

    def maps(seed):
        g = torch.Generator().manual_seed(seed)
        return {name: (1 + 0.3 * torch.randn(8 if case != "gemma-embedding-outside-factor" else 64, generator=g),
                       torch.randn(8 if case != "gemma-embedding-outside-factor" else 64, generator=g))}

    if case.startswith("gemma"):
        if transformers_major() < 5:
            assert outside_scale(model, site) != 1.0  # the shift is divided by the factor outside the module
        else:  # transformers 5 scales Gemma's embedding inside the module: no outside factor is left
            assert outside_scale(model, site) == 1.0
    groups = [(2, maps(1)), (1, maps(2)), (2, maps(3))]
    with torch.no_grad():
        together, alone = per_row_and_alone(model, name, site, x, groups)
        assert not torch.equal(alone[0], site(x[:2]))  # the maps do steer
        assert torch.equal(together, torch.cat(alone))
        swapped, _ = per_row_and_alone(model, name, site, x, [(2, maps(3)), (1, maps(2)), (2, maps(1))])
    assert not torch.equal(swapped[:2], alone[0]) and not torch.equal(swapped[3:], alone[2])


def test_row_groups_must_cover_the_batch_and_map_the_same_sites():
    model = Holder(nn.LayerNorm(4))
    one = {"site": (torch.ones(4), torch.zeros(4))}
    with attach_row_affines(model, [(2, one)]), pytest.raises(SteeringError, match="2 per-row maps for a batch of 3"):
        model.site(torch.randn(3, 4))
    with pytest.raises(SteeringError, match="different sites"):
        attach_row_affines(model, [(1, one), (1, {})])
    with pytest.raises(SteeringError, match="no row groups"):
        attach_row_affines(model, [])


# ----------------------------------------------------------------------------- the output head on kept positions
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # gemma2: logit soft-capping after the head
def test_head_runs_on_kept_positions_only_and_gives_their_logits(arch):
    model = tiny_model(arch).eval()
    ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[0, 2:5] = keep[2, -1] = True
    head_rows = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: head_rows.append(args[0].shape[:-1].numel()))
    try:
        full = passes.torch_runner(model)(ids, mask)
        narrow = passes.run_batches(passes.torch_runner(model), [(ids, mask)], [keep])[0]
    finally:
        handle.remove()
    assert head_rows == [27, 4]  # the whole pass, then the four kept positions
    assert narrow.shape == full.shape
    assert bool(full[~keep].abs().sum() > 0) and bool((narrow[~keep] == 0).all())
    torch.testing.assert_close(narrow[keep], full[keep], rtol=0, atol=1e-5 * float(full.abs().max()))


def test_head_keeps_its_rows_when_hooks_read_it(llama):
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(2))
    keep = passes.last_position(ids)
    head = next(n for n, m in llama.named_modules() if m is llama.get_output_embeddings())
    seen = []
    handle = llama.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    try:
        passes.run_batches(passes.torch_runner(llama, keep_layout=[head]), [(ids, torch.ones_like(ids))], [keep])
        passes.run_batches(passes.torch_runner(llama), [(ids, torch.ones_like(ids))], [keep])
    finally:
        handle.remove()
    assert seen[0][:2] == (2, 5) and seen[1][:2] == (1, 2)


def test_runner_that_is_not_torch_gets_the_other_positions_zeroed():
    logits = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) + 1
    ids = torch.zeros(2, 3, dtype=torch.int64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = passes.run_batches(lambda i, m: logits.clone(), [(ids, mask)])[0]
    assert bool((out[0, 2] == 0).all()) and torch.equal(out[mask.bool()], logits[mask.bool()])
