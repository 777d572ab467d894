"""The weight reads of an out-of-core bake (bake.store.rawmem): fresh memory, mapped blocks, conversions in the
calling thread.  The tiny checkpoints of the other tests are below the size these paths start at, so the
threshold is lowered here to run them."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

import bake.store.rawmem as rawmem
from bake.store.shards import ShardFolder, converted_blocks, read_as


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


def test_buffer_pool_hands_out_a_buffer_again_only_once_nothing_holds_it():
    pool = rawmem.BufferPool()
    a = pool.take((4, 3), torch.float32)
    a.fill_(1.0)
    param = torch.nn.Parameter(a)  # what accelerate makes of a weight it read: same storage
    del a
    b = pool.take((4, 3), torch.float32)
    assert b.data_ptr() != param.data_ptr()  # still held by the parameter: a new buffer
    b.fill_(2.0)
    assert bool((param == 1.0).all())
    del param  # the block ran, accelerate dropped its weights
    c = pool.take((4, 3), torch.float32)
    assert c.shape == (4, 3) and c.dtype == torch.float32
    assert pool.nbytes() == 2 * 4 * 3 * 4  # the first buffer is reused, not a third one allocated
    view = c[1:]  # a view of the buffer still holds it
    del b, c
    d = pool.take((4, 3), torch.float32)
    assert d.data_ptr() + 3 * 4 != view.data_ptr()  # the second buffer, the one nothing holds
    assert pool.nbytes() == 2 * 4 * 3 * 4
    assert pool.take((3, 4), torch.float32).shape == (3, 4)  # another shape: a buffer of its own
    assert pool.take((4, 3), torch.bfloat16).dtype == torch.bfloat16


def test_offloaded_passes_read_into_reused_buffers_with_the_same_result(tmp_path, small_threshold, monkeypatch):
    """An offloaded bfloat16 checkpoint read into float32: a pass allocates one buffer per weight shape
    (the next read of that shape reuses it), the pool is emptied before the output head, and the logits
    are those of the model loaded whole.  Linear weights are read by slices instead
    (tests/test_sliced_linear.py); here every weight goes through accelerate's reads, as a GPT-2 Conv1D's
    or a GPU run's do."""
    from bake_fixtures import logits
    from test_stream import sharded_checkpoint, tight_budget

    import bake.store.checkpoint
    from bake.store.checkpoint import ShardTensors, load_bounded

    monkeypatch.setattr(bake.store.checkpoint, "slice_linears", lambda *a, **k: {})

    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=torch.bfloat16)
    with load_bounded(src) as whole:
        want = logits(whole)
        del whole
    reads, fresh, pools = [], [], []
    real_read, real_empty, real_init = ShardTensors.read, rawmem.empty, ShardTensors.__init__
    monkeypatch.setattr(ShardTensors, "read", lambda self, name, **k: reads.append(name) or real_read(self, name, **k))
    monkeypatch.setattr(rawmem, "empty", lambda shape, dtype: fresh.append(tuple(shape)) or real_empty(shape, dtype))
    monkeypatch.setattr(ShardTensors, "__init__",
                        lambda self, *a, **k: real_init(self, *a, **k) or pools.append(self.pool))
    with load_bounded(src, max_memory=tight_budget(src)) as m:
        offloaded = {k for k, v in m.hf_device_map.items() if v == "disk" and ".layers." in k}
        assert len(offloaded) >= 2  # layers of one shape read one after the other
        reads.clear(), fresh.clear()
        first = logits(m)
        assert pools[0].nbytes() == 0  # released once the decoder stack ran
        # accelerate loads each leaf module's weight before it runs and drops it after: one buffer per shape.
        assert len(reads) >= 2 * 9 and len(fresh) == len(set(fresh)) < len(reads) // 2
        second = logits(m)
        del m
    assert torch.equal(first, want) and torch.equal(second, want)


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) << 10 for line in fh if line.startswith("RssAnon:"))


@pytest.mark.skipif(rawmem.heap_free_bytes() is None, reason="glibc >= 2.33 (mallinfo2) only")
def test_trim_heap_hands_back_free_heap_pages_only_beyond_its_slack():
    """Free heap chunks between live ones stay resident until trimmed; a slack above them keeps them."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, n = 64 << 10, 1024  # below glibc's mmap threshold: heap chunks, 64 MiB in all
    chunks = [libc.malloc(size) for _ in range(n)]
    try:
        for c in chunks:
            ctypes.memset(c, 1, size)  # resident
        for c in chunks[::2]:  # every other one: free holes that live chunks keep from coalescing into the top
            libc.free(c)
        holes = (n // 2) * size
        assert rawmem.heap_free_bytes() >= holes
        before = _rss_anon()
        rawmem.trim_heap(slack=1 << 40)  # more slack than free heap: nothing handed back
        assert _rss_anon() > before - holes // 4
        rawmem.trim_heap(slack=holes // 2)
        assert _rss_anon() < before - holes // 2
    finally:
        for c in chunks[1::2]:
            libc.free(c)


def test_an_offloaded_pass_trims_the_heap_after_every_block(tmp_path, monkeypatch):
    """Every block of an offloaded model hands back the heap beyond the slack when it has run."""
    from bake_fixtures import logits
    from test_stream import sharded_checkpoint, tight_budget

    import bake.store.checkpoint as checkpoint

    _, src, _ = sharded_checkpoint(tmp_path, "llama", ("model.norm",), dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(checkpoint, "trim_heap", lambda slack=0: calls.append(slack))
    with checkpoint.load_bounded(src, max_memory=tight_budget(src)) as m:
        blocks = set(m.hf_device_map)
        assert "disk" in m.hf_device_map.values()
        logits(m)
        del m
    assert calls.count(rawmem.HEAP_SLACK_BYTES) >= len(blocks)  # and once more, in full, when the model is freed
