"""One feature-axis rule: hooks, collection (pooling for the loss) and LineasAffine agree, also on
Qwen3's per-head ``q_norm`` output ``[B, L, heads, head_dim]`` when L == head_dim."""

import copy

import pytest
import torch
from tiny import module_output, tiny_model
from torch import nn

from bake.fold.affine_module import LineasAffine
from lineas.axis import feature_axis, pool_features
from lineas.collect import run_to_sites
from lineas.hooks import attach_affine
from lineas.learn.train import learn_maps

QNORM = "model.layers.0.self_attn.q_norm"
HEAD_DIM = 16  # tests/tiny.py qwen3


class _Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("module, ndim, axis", [
    (nn.Linear(4, 4), None, -1), (nn.Linear(4, 4), 4, -1), (nn.LayerNorm(4), 4, -1), (nn.Embedding(4, 4), 3, -1),
    (nn.Conv2d(3, 4, 1), None, 1), (nn.GroupNorm(2, 4), 4, 1), (nn.BatchNorm2d(4), None, 1),
    (_Custom(), None, None), (_Custom(), 4, 1), (_Custom(), 3, -1), (_Custom(), 2, -1),
])
def test_feature_axis_by_type_then_rank(module, ndim, axis):
    assert feature_axis(module, ndim) == axis


def test_qwen3_norm_fixes_the_last_axis():
    model = tiny_model("qwen3")
    q_norm = model.get_submodule(QNORM)
    assert type(q_norm).__name__ == "Qwen3RMSNorm"
    assert feature_axis(q_norm) == -1 and feature_axis(q_norm, 4) == -1  # not the rank rule's 1


def test_pool_features_masks_tokens_and_averages_heads():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 3, 4, generator=g)  # [B, L, H, D]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    got = pool_features(y, -1, mask)
    assert got.shape == (2, 4)
    assert torch.allclose(got[0], y[0, :3].mean(dim=(0, 1)), atol=1e-6)  # padding left out
    assert torch.allclose(got[1], y[1].mean(dim=(0, 1)), atol=1e-6)
    chan = pool_features(y, 1, mask)  # channels first: no token axis, plain spatial mean
    assert chan.shape == (2, 5) and torch.allclose(chan, y.mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(pool_features(y[:, 0, 0], -1, None), y[:, 0, 0])


def _qnorm_output(model, ids):
    return module_output(model, QNORM, ids)


def test_hooks_collection_and_lineas_affine_agree_on_per_head_output():
    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, HEAD_DIM), generator=torch.Generator().manual_seed(1))  # L == head_dim
    g = torch.Generator().manual_seed(2)
    scale, shift = 1 + 0.5 * torch.randn(HEAD_DIM, generator=g), torch.randn(HEAD_DIM, generator=g)
    raw = _qnorm_output(model, ids)
    assert raw.shape == (2, HEAD_DIM, 4, HEAD_DIM)
    expect = raw * scale + shift  # broadcast on the last axis: head_dim
    with attach_affine(model, {QNORM: (scale, shift)}):
        hooked = _qnorm_output(model, ids)
    assert not torch.allclose(hooked, raw)
    assert torch.allclose(hooked, expect, atol=1e-6)

    wrapped = copy.deepcopy(model)
    inner = wrapped.get_submodule(QNORM)
    affine = LineasAffine(inner, HEAD_DIM, axis=feature_axis(inner))
    with torch.no_grad():
        affine.lineas_scale.copy_(scale)
        affine.lineas_shift.copy_(shift)
    wrapped.model.layers[0].self_attn.q_norm = affine
    assert torch.allclose(_qnorm_output(wrapped, ids), expect, atol=1e-6)

    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        pooled = run_to_sites(model, batch, [QNORM], {QNORM: (scale, shift)})[QNORM]
    assert pooled.shape == (2, HEAD_DIM)
    assert torch.allclose(pooled, expect.mean(dim=(1, 2)), atol=1e-5)


def _ground_truth(model, scale, shift):
    target_model = copy.deepcopy(model)
    attach_affine(target_model, {QNORM: (scale, shift)})
    return target_model


@pytest.mark.parametrize("length", [HEAD_DIM, 9])
def test_training_on_q_norm_learns_head_dim_maps(length):
    """Targets come from a known map on head_dim.  Pooling over positions (the old rank rule) would
    learn a map over the L positions instead: with L == head_dim it fit silently, with L != head_dim
    it raised."""
    model = tiny_model("qwen3")
    g = torch.Generator().manual_seed(3)
    true_scale, true_shift = 1 + 0.3 * torch.rand(HEAD_DIM, generator=g), 0.5 * torch.randn(HEAD_DIM, generator=g)
    target_model = _ground_truth(model, true_scale, true_shift)
    prompts = [torch.randint(3, 128, (length,), generator=g).tolist() for _ in range(24)]

    # A q_norm shift needs an affine module at bake time, so the default (foldable) would freeze it;
    # this test is about the feature axis, so it learns the free map.
    act = learn_maps(model, None, prompts, prompts, [QNORM], method="linear-act", progress=False,
                     target_model=target_model, foldable="off")
    m = act.maps[QNORM]
    assert m.scale.shape == (HEAD_DIM,)
    # Pooled means of an affine map on head_dim are that affine map of the pooled means: exact recovery.
    assert torch.allclose(m.scale, true_scale, atol=1e-3) and torch.allclose(m.shift, true_shift, atol=1e-3)

    lineas = learn_maps(model, None, prompts, prompts, [QNORM], steps=100, progress=False, target_model=target_model,
                        foldable="off")
    rep = lineas.report[0]
    assert lineas.maps[QNORM].scale.shape == (HEAD_DIM,)
    assert rep.w2_before > 1e-3 and rep.w2_after < 0.5 * rep.w2_before, rep


def test_exported_remote_code_inlines_the_axis_rule_and_imports_only_torch():
    import ast

    from bake.fold.remote_code import _affine_source

    source = _affine_source()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"torch"}, imported
    namespace: dict = {}
    exec(compile(source, "modeling_lineas.py", "exec"), namespace)  # standalone: no lineas needed
    y = torch.randn(2, 3, 4, 5)
    module = namespace["LineasAffine"](nn.Identity(), 5, axis=-1)
    with torch.no_grad():
        module.lineas_scale.fill_(2.0)
    assert torch.allclose(module(y), 2 * y)
