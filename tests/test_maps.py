"""The lineas-maps v1 file format: round trip and every validation error of SteeringMaps.load."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lineas.maps import (
    FORMAT,
    FORMAT_VERSION,
    MapsFormatError,
    SiteMap,
    SteeringMaps,
    effective_maps,
    file_sha256,
)

GOOD_META = {"format": FORMAT, "format_version": FORMAT_VERSION}


def _maps(seed=0, sites=("b.site", "a.site"), dim=5):
    g = torch.Generator().manual_seed(seed)
    return SteeringMaps({s: SiteMap(1 + torch.randn(dim, generator=g), torch.randn(dim, generator=g)) for s in sites},
                        {"method": "lineas", "base_model": "tiny"})


def _write(path, tensors, meta=GOOD_META):
    save_file(tensors, str(path), metadata=dict(meta) if meta is not None else None)
    return path


def test_round_trip_keeps_values_order_and_metadata(tmp_path):
    maps = _maps()
    path = maps.save(tmp_path / "m.safetensors")
    back = SteeringMaps.load(path)
    assert back.sites == ["b.site", "a.site"]  # application order, not sorted
    for s in maps:
        assert torch.equal(back[s].scale, maps[s].scale) and torch.equal(back[s].shift, maps[s].shift)
    assert back.metadata["method"] == "lineas" and back.metadata["base_model"] == "tiny"
    assert back.metadata["format"] == FORMAT and back.metadata["format_version"] == FORMAT_VERSION
    assert len(file_sha256(path)) == 64
    assert not list(tmp_path.glob(".lineas-maps-*"))  # no temp file left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    import lineas.maps as mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(RuntimeError):
        _maps().save(tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_missing_shift_or_scale(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(3)})
    with pytest.raises(MapsFormatError, match=r"lacks 's\.shift'"):
        SteeringMaps.load(p)
    p = _write(tmp_path / "y.safetensors", {"s.shift": torch.ones(3)})
    with pytest.raises(MapsFormatError, match=r"lacks 's\.scale'"):
        SteeringMaps.load(p)


def test_non_1d_tensor(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(1, 3), "s.shift": torch.zeros(1, 3)})
    with pytest.raises(MapsFormatError, match="1-D"):
        SteeringMaps.load(p)


def test_length_mismatch(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(3), "s.shift": torch.zeros(4)})
    with pytest.raises(MapsFormatError, match="lengths differ"):
        SteeringMaps.load(p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(tmp_path, bad):
    scale = torch.ones(3)
    scale[1] = bad
    p = _write(tmp_path / "x.safetensors", {"s.scale": scale, "s.shift": torch.zeros(3)})
    with pytest.raises(MapsFormatError, match="non-finite"):
        SteeringMaps.load(p)


def test_wrong_dtype(tmp_path):
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(3, dtype=torch.float16), "s.shift": torch.zeros(3)})
    with pytest.raises(MapsFormatError, match="dtype"):
        SteeringMaps.load(p)


def test_unexpected_tensor_name(tmp_path):
    tensors = {"s.scale": torch.ones(3), "s.shift": torch.zeros(3), "s.bias": torch.ones(3)}
    p = _write(tmp_path / "x.safetensors", tensors)
    with pytest.raises(MapsFormatError, match="unexpected tensor"):
        SteeringMaps.load(p)


@pytest.mark.parametrize("meta, msg", [
    (None, "'format'"),
    ({"format_version": "1"}, "'format'"),
    ({"format": "ml-act", "format_version": "1"}, "'format'"),
    ({"format": FORMAT}, "format_version"),
    ({"format": FORMAT, "format_version": "2"}, "format_version"),
])
def test_wrong_or_absent_format_tag_and_version(tmp_path, meta, msg):
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(3), "s.shift": torch.zeros(3)}, meta)
    with pytest.raises(MapsFormatError, match=msg):
        SteeringMaps.load(p)


def test_corrupt_and_missing_files(tmp_path):
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(MapsFormatError, match="not a readable safetensors"):
        SteeringMaps.load(p)
    good = _maps().save(tmp_path / "good.safetensors")
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-7])
    with pytest.raises(MapsFormatError):
        SteeringMaps.load(truncated)
    with pytest.raises(MapsFormatError, match="not found"):
        SteeringMaps.load(tmp_path / "absent.safetensors")


def test_sites_metadata_must_match(tmp_path):
    meta = dict(GOOD_META, sites=json.dumps(["s", "other"]))
    p = _write(tmp_path / "x.safetensors", {"s.scale": torch.ones(3), "s.shift": torch.zeros(3)}, meta)
    with pytest.raises(MapsFormatError, match="sites"):
        SteeringMaps.load(p)
    p = _write(tmp_path / "y.safetensors", {"s.scale": torch.ones(3), "s.shift": torch.zeros(3)},
               dict(GOOD_META, sites="not json"))
    with pytest.raises(MapsFormatError, match="JSON"):
        SteeringMaps.load(p)


def test_empty_file(tmp_path):
    p = _write(tmp_path / "x.safetensors", {})
    with pytest.raises(MapsFormatError, match="no sites"):
        SteeringMaps.load(p)


def test_constructor_rejects_bad_objects():
    with pytest.raises(MapsFormatError):
        SiteMap(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(MapsFormatError):
        SteeringMaps({"s": SiteMap(torch.tensor([1.0, float("nan")]), torch.zeros(2))})
    with pytest.raises(MapsFormatError):
        SteeringMaps({})


def test_strength_and_composition_algebra():
    a, b = _maps(1, ("s",)), _maps(2, ("s",))
    y = torch.randn(7, 5)
    s, t = a["s"].at_strength(0.5)
    assert torch.allclose(s * y + t, y + 0.5 * ((a["s"].scale * y + a["s"].shift) - y), atol=1e-6)
    eff = effective_maps([(a, 1.0), (b, 0.3)])["s"]
    ya = a["s"].scale * y + a["s"].shift
    expect = ya + 0.3 * (b["s"].scale * ya + b["s"].shift - ya)
    assert torch.allclose(eff.scale * y + eff.shift, expect, atol=1e-5)
    assert _maps().support() == 1.0
    assert SteeringMaps({"s": SiteMap.identity(4)}).support() == 0.0
