"""Steering hooks: the steered output is exactly ``y + lam * (T(y) - y)`` at every site."""

import pytest
import torch
from tiny import module_output, random_ids, tiny_model
from torch import nn

from lineas.hooks import (
    SteeringError,
    attach_affine,
    attach_maps,
    count_forward_hooks,
    steered,
)
from lineas.maps import SiteMap, SteeringMaps

SITE = "model.layers.0.post_attention_layernorm"
SITE2 = "model.layers.1.input_layernorm"


def _random_maps(sites, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringMaps({s: SiteMap(1 + 0.5 * torch.randn(dim, generator=g), torch.randn(dim, generator=g))
                         for s in sites})


def _capture(model, site, ids):
    """Output of ``site`` (after any hooks registered before this one) and the logits."""
    got = {}
    module = dict(model.named_modules())[site]
    h = module.register_forward_hook(
        lambda m, i, o: got.__setitem__("y", (o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        h.remove()
    return got["y"], logits


def _raw_output(model, site, ids):
    """The module's own output, before steering."""
    return module_output(model, site, ids, before_hooks=True)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_hook_matches_formula(lam):
    model = tiny_model("llama")
    ids = random_ids(2, 9)
    maps = _random_maps([SITE])
    with steered(model, maps, lam):
        raw = _raw_output(model, SITE, ids)
        out, logits = _capture(model, SITE, ids)
    m = maps[SITE]
    expect = raw + lam * ((m.scale * raw + m.shift) - raw)
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    base_logits = model(ids).logits.detach()
    if lam == 0.0:
        assert torch.allclose(logits, base_logits, atol=1e-6)
    else:
        assert not torch.allclose(logits, base_logits, atol=1e-3)  # the steering does reach the output


def test_composition_of_two_files_at_different_strengths(tmp_path):
    model = tiny_model("llama")
    ids = random_ids(2, 7, seed=3)
    a = _random_maps([SITE, SITE2], seed=1)
    b = _random_maps([SITE2], seed=2)
    pa, pb = a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    a2, b2 = SteeringMaps.load(pa), SteeringMaps.load(pb)
    la, lb = 0.7, -0.4
    with steered(model, [(a2, la), (b2, lb)]):
        raw = _raw_output(model, SITE2, ids)
        out, _ = _capture(model, SITE2, ids)
    ta = raw + la * ((a[SITE2].scale * raw + a[SITE2].shift) - raw)
    expect = ta + lb * ((b[SITE2].scale * ta + b[SITE2].shift) - ta)
    assert torch.allclose(out, expect, atol=1e-5, rtol=1e-5)
    # Attaching the two files as two separate hook sets gives the same model output.
    h1 = attach_maps(model, a2, la)
    h2 = attach_maps(model, b2, lb)
    with torch.no_grad():
        separate = model(ids).logits
    h1.remove()
    h2.remove()
    with steered(model, [(a2, la), (b2, lb)]), torch.no_grad():
        composed = model(ids).logits
    assert torch.allclose(separate, composed, atol=1e-5)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(2, 6)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


@pytest.mark.parametrize("site", ["conv", "norm"])
def test_4d_outputs_use_channel_axis(site):
    torch.manual_seed(0)
    net = _ConvNet().eval()
    x = torch.randn(2, 3, 5, 4)
    g = torch.Generator().manual_seed(5)
    scale, shift = 1 + torch.randn(6, generator=g), torch.randn(6, generator=g)
    raw = {}
    getattr(net, site).register_forward_hook(lambda m, i, o: raw.__setitem__("y", o.clone()), prepend=True)
    with torch.no_grad():
        base = net(x)
    with attach_affine(net, {site: (scale, shift)}):
        out = {}
        hh = getattr(net, site).register_forward_hook(lambda m, i, o: out.__setitem__("y", o.clone()))
        with torch.no_grad():
            steered_out = net(x)
        hh.remove()
    expect = raw["y"] * scale.view(1, 6, 1, 1) + shift.view(1, 6, 1, 1)
    assert torch.allclose(out["y"], expect, atol=1e-6)
    assert not torch.allclose(steered_out, base)


class _TupleModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x)
        return y, y.sum()


class _TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TupleModule()

    def forward(self, x):
        y, aux = self.block(x)
        return y, aux


def test_tuple_outputs_steer_element_zero_only():
    torch.manual_seed(0)
    net = _TupleNet()
    x = torch.randn(3, 4)
    with torch.no_grad():
        y0, aux0 = net(x)
    scale, shift = torch.tensor([2.0, 1.0, 0.5, -1.0]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    with attach_affine(net, {"block": (scale, shift)}), torch.no_grad():
        y1, aux1 = net(x)
    assert torch.allclose(y1, y0 * scale + shift)
    assert torch.equal(aux1, aux0)  # other tuple elements untouched


def test_removal_restores_base_output_exactly():
    model = tiny_model("qwen2")
    ids = random_ids(2, 8)
    with torch.no_grad():
        base = model(ids).logits.clone()
    n0 = count_forward_hooks(model)
    handle = attach_maps(model, _random_maps(["model.layers.0.input_layernorm", "model.layers.1.mlp"]), 1.0)
    assert count_forward_hooks(model) == n0 + 2
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base)
    handle.remove()
    assert count_forward_hooks(model) == n0 and not handle.active
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    # Context manager removes hooks even when the body raises.
    with pytest.raises(RuntimeError), steered(model, _random_maps([SITE]), 1.0):
        raise RuntimeError("boom")
    assert count_forward_hooks(model) == n0


def test_unknown_site_lists_similar_names():
    model = tiny_model("llama")
    with pytest.raises(SteeringError, match="unknown site.*similar names: .*post_attention_layernorm"):
        attach_maps(model, _random_maps(["model.layers.0.post_attention_layernorn"]), 1.0)


def test_dimension_mismatch_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(SteeringError, match="length 32"):
        attach_maps(model, _random_maps([SITE], dim=32), 1.0)
    # A module whose width the type does not tell is caught at forward time.
    net = _TupleNet()
    with attach_affine(net, {"block": (torch.ones(3), torch.zeros(3))}), \
            pytest.raises(SteeringError, match="feature axis has size 4"):
        net(torch.randn(2, 4))


def test_bf16_model_is_steered_in_fp32_and_cast_once():
    model = tiny_model("llama").to(torch.bfloat16)
    ids = random_ids(1, 6)
    maps = _random_maps([SITE])
    with steered(model, maps, 1.0):
        raw = _raw_output(model, SITE, ids)
        out, _ = _capture(model, SITE, ids)
    expect = (raw.float() * maps[SITE].scale + maps[SITE].shift).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expect)
