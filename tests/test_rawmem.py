"""The weight reads of an out-of-core bake (bake.rawmem): fresh memory, mapped blocks, conversions in the
calling thread.  The tiny checkpoints of the other tests are below the size these paths start at, so the
threshold is lowered here to run them."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import bake.rawmem as rawmem
from bake.shards import ShardFolder, converted_blocks, read_as


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(rawmem, "HUGE_MIN_BYTES", 1)


def every_16bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal, NaN where NaN (float16 NaN payloads may differ between converters)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convert_into_is_torchs_widening_for_every_bit_pattern(dtype):
    src = every_16bit_pattern(dtype)
    out = torch.empty(src.numel())
    rawmem.convert_into(out, src.view(torch.uint8), dtype)
    assert same_values(out, src.float())
    if dtype == torch.bfloat16:  # a shift: bit for bit, NaN payloads included
        assert torch.equal(out.view(torch.int32), src.float().view(torch.int32))


def test_convert_into_other_pairs_and_size_mismatch():
    src = torch.randn(100, dtype=torch.float64)
    out = torch.empty(100)
    rawmem.convert_into(out, src.view(torch.uint8), torch.float64)
    assert torch.equal(out, src.float())
    with pytest.raises(ValueError, match="50 values into 100"):
        rawmem.convert_into(out, src[:50].view(torch.uint8), torch.float64)


def write(tmp_path, tensors):
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return ShardFolder(tmp_path)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_read_as_through_every_path(tmp_path, small_threshold, stored):
    w = torch.randn(64, 48).to(stored)
    shards = write(tmp_path, {"w": w, "other": torch.randn(3)})
    for block in (64, 4 << 20):  # many partial blocks, and one
        got = read_as(shards.info("w"), torch.float32, block=block)
        assert got.dtype == torch.float32 and got.shape == (64, 48)
        assert torch.equal(got, w.float())


def test_a_mapped_tensor_is_private_and_unmapped_with_it(tmp_path, small_threshold):
    """Same dtype: the bytes are mapped, not read; writing the tensor never reaches the checkpoint."""
    w = torch.randn(32, 16)
    shards = write(tmp_path, {"a": torch.ones(5), "w": w})
    path = tmp_path / "model.safetensors"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    got = read_as(shards.info("w"), torch.float32)
    assert torch.equal(got, w)
    got.add_(1.0)  # copy-on-write: this process's pages only
    assert torch.equal(got, w + 1)
    assert torch.equal(read_as(shards.info("w"), torch.float32), w)
    del got
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_mapped_falls_back_when_the_file_is_short(tmp_path, small_threshold):
    assert rawmem.mapped(tmp_path / "missing", 0, 64, torch.float32, (16,)) is None
    (tmp_path / "short").write_bytes(b"\0" * 8)
    assert rawmem.mapped(tmp_path / "short", 0, 64, torch.float32, (16,)) is None


def test_empty_gives_a_writable_tensor_of_the_shape(small_threshold):
    t = rawmem.empty((3, 5), torch.float32)
    t.fill_(2.0)
    assert t.shape == (3, 5) and t.dtype == torch.float32 and float(t.sum()) == 30.0
    assert rawmem.empty((0, 4), torch.float32).shape == (0, 4)


def test_converted_blocks_write_path_matches_torch(tmp_path):
    w = torch.randn(40, 30).to(torch.bfloat16)
    shards = write(tmp_path, {"w": w})
    blocks = [b.clone() for b in converted_blocks(shards.info("w"), torch.float32, block=256)]
    assert len(blocks) > 1
    assert torch.equal(torch.cat(blocks).view(40, 30), w.float())
