"""Linear products by slices of rows (bake.store.sliced_linear): the math against F.linear, and a bounded-memory
model whose offloaded Linears multiply straight from the shards giving the logits of accelerate's reads."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from bake_fixtures import logits
from test_stream import sharded_checkpoint, tight_budget

from bake.store import checkpoint, rawmem
from bake.store import sliced_linear as sliced
from bake.store.sliced_linear import sliced_linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("step", [1, 3, 7, 40])
def test_sliced_linear_is_f_linear_over_consecutive_slices(bias, step):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 12, generator=gen), torch.randn(7, 12, generator=gen)
    b = torch.randn(7, generator=gen) if bias else None
    asked = []

    def rows(s, e):
        asked.append((s, e))
        return w[s:e]

    got = sliced_linear(x, rows, 7, b, step)
    want = F.linear(x, w, b)
    assert got.shape == want.shape == (2, 5, 7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert asked[0][0] == 0 and asked[-1][1] == 7 and all(a[1] == b[0] for a, b in itertools.pairwise(asked))
    assert len(asked) == -(-7 // step)
    with pytest.raises(ValueError, match="slice_rows must be >= 1, got 0"):
        sliced_linear(x, rows, 7, b, 0)


def _spy(monkeypatch):
    """Count the products computed by slices, and what slice_linears changed."""
    calls, changed = [], {}
    real_product, real_slice = sliced.sliced_linear, checkpoint.slice_linears
    monkeypatch.setattr(sliced, "sliced_linear", lambda *a, **k: calls.append(a[2]) or real_product(*a, **k))
    monkeypatch.setattr(checkpoint, "slice_linears", lambda *a, **k: changed.update(real_slice(*a, **k)) or changed)
    return calls, changed


def _accelerate_reads(src, budget, monkeypatch, hook=None):
    """Logits with every weight read by accelerate's offload hooks (the path before slicing)."""
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "slice_linears", lambda *a, **k: {})
        with checkpoint.load_bounded(src, max_memory=budget) as model:
            handle = model.get_submodule(hook[0]).register_forward_hook(hook[1]) if hook else None
            out = logits(model)
            if handle:
                handle.remove()
            del model
    return out


def _double(_module, _args, out):
    return out * 2.0


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "read"])
def test_offloaded_linears_multiply_from_the_shards_with_the_logits_of_accelerates_reads(
        tmp_path, monkeypatch, stored, mapped):
    """bfloat16 (converted slice by slice) and float32 (used in place) checkpoints; slices from the mapped
    file, or read through a buffer where there is no mapping.  Forward hooks on a sliced Linear still fire."""
    if mapped:
        monkeypatch.setattr(rawmem, "HUGE_MIN_BYTES", 1)  # the tiny weights are below the mapping threshold
    monkeypatch.setattr(sliced, "SLICE_BYTES", 256)  # several slices per weight
    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=stored)
    budget = tight_budget(src)
    calls, changed = _spy(monkeypatch)
    with checkpoint.load_bounded(src, max_memory=budget) as model:
        disk = [u for u, d in model.hf_device_map.items() if d == "disk" and ".layers." in u]
        assert disk, "test setup: no decoder layer is offloaded"
        layer = disk[0]
        down = f"{layer}.mlp.down_proj"
        assert changed[down] == "stored" and changed[f"{layer}.self_attn.q_proj"] == "stored"
        params = {n for n, _ in model.named_parameters()}
        assert f"{down}.weight" not in params and f"{layer}.input_layernorm.weight" in params
        assert model.get_submodule(down).weight.device.type == "meta"
        assert tuple(model.get_submodule(down).weight.shape) == (model.config.hidden_size,
                                                                    model.config.intermediate_size)
        base = logits(model)
        assert len(calls) >= 7 * len(disk)
        handle = model.get_submodule(down).register_forward_hook(_double)
        hooked = logits(model)
        handle.remove()
        del model
    assert not torch.allclose(hooked, base)
    torch.testing.assert_close(base, _accelerate_reads(src, budget, monkeypatch), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hooked, _accelerate_reads(src, budget, monkeypatch, (down, _double)),
                               rtol=1e-6, atol=1e-6)


def test_large_resident_linears_multiply_by_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(sliced, "SLICE_BYTES", 256)
    monkeypatch.setattr(sliced, "SLICED_MIN_BYTES", 1)  # every resident Linear counts as large here
    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=torch.bfloat16)
    budget = tight_budget(src)
    calls, changed = _spy(monkeypatch)
    with checkpoint.load_bounded(src, max_memory=budget) as model:
        resident = [n for n, kind in changed.items() if kind == "resident"]
        assert "lm_head" in resident
        assert isinstance(model.lm_head.weight, torch.nn.Parameter) and model.lm_head.weight.device.type == "cpu"
        got = logits(model)
        assert model.config.vocab_size in calls  # the head's product went by slices
        del model
    torch.testing.assert_close(got, _accelerate_reads(src, budget, monkeypatch), rtol=1e-6, atol=1e-6)
