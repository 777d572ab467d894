"""Fresh tensors and dtype conversions for the weight reads of an out-of-core bake.

An offloaded block is read from its shard every time it runs, into new memory: for a Gemma-2-2B
verification that was ~8 GB of float32 per forward pass, converted from bfloat16.  (Its Linear weights,
nearly all of those bytes, are now multiplied straight from the shard by slices instead:
:mod:`bake.store.sliced_linear`.  What follows reads the other weights: the rest of a block, and every
weight of a model that runs on a GPU or whose layers are not ``nn.Linear``, such as GPT-2's ``Conv1D``.)
Two costs dominated those reads, both measured on this project's 2-core CPU box (throwaway scripts,
0.87 GiB of bfloat16 layers read into float32):

* **Page faults.**  A new multi-megabyte tensor is fresh anonymous memory: one fault per 4 KiB page,
  each zeroed in the kernel (373k faults, ~1.0 s of system time).  :func:`empty` asks for transparent
  huge pages instead (``MADV_HUGEPAGE``; this machine's THP mode is ``madvise``): ~15k faults, 0.5 s
  wall instead of 1.2 s.  The memory is the same; it is unmapped when the tensor is freed.
* **Copies.**  A block stored in the dtype it runs in (the float32 export the candidate check reads) needs
  no conversion: :func:`mapped` maps its bytes (copy-on-write) instead of reading them into fresh memory,
  so the page cache's pages are used as they are (0.24 s instead of 0.56 s for 1.74 GiB).  The memory
  counted is the same (mapped pages are resident in this process), and it is unmapped with the tensor.
* **Reuse.**  Even in huge pages, fresh memory is zeroed by the kernel before the conversion writes it.
  :class:`BufferPool` keeps the buffers of a pass: one is handed out again only once nothing else holds
  its storage (accelerate loads each offloaded module's weights before it runs and drops them after), so
  the pool holds one buffer per weight shape, the memory a fresh read needs anyway;
  :func:`bake.store.checkpoint.load_bounded` releases it when the decoder stack is done, before the output head
  (a 256k-vocabulary head and its logits are a pass's largest memory).  A pooled read converts straight
  from the file's mapped pages (:func:`mapped`), with no copy of the stored bytes.
* **Threads.**  torch's ``copy_`` splits a large bfloat16 -> float32 conversion over its intra-op
  threads; while another thread of the bake (the shard writer, the other model) or another process holds
  a core, every such split waits for a thread that is not running: 0.35 GB/s instead of 7 GB/s
  single-threaded.  :func:`convert_into` converts in the calling thread only (numpy: bfloat16 is a 16-bit
  shift, float16 a cast; both exact).  torch's conversion in pieces below its grain size also stays in
  the calling thread and is 1.5x faster alone (1.2 s against 1.6 s per pass below), but it is one call
  (and one hand-over of the GIL) per 128 KB: beside the shard writer, in-process timers of a whole bake
  measured the reference's reads at 37.5 s that way against 15.9 s with numpy, the writer at 50 s
  against 35 s.

Together, measured on the Gemma-2-2B shape (throwaway scripts, warm page cache, a pass's 7.5 GiB of
float32 layers from 3.7 GiB of bfloat16): 2.3 to 2.7 s per pass read into fresh huge pages, 1.6 s into
pooled buffers from the mapped pages; the reference alone (``benchmarks/reference_offloaded.py``) is
in the README.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import numpy as np
import torch

HUGE_MIN_BYTES = 4 << 20  # below this a tensor is a few pages: plain torch.empty
_MAP_FLAGS = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_HUGE_OK = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and bool(_MAP_FLAGS)


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; from a private anonymous mapping advised for huge pages when large
    (the tensor owns the mapping: it is unmapped when the last view of the tensor is freed)."""
    n = 1
    for d in shape:
        n *= int(d)
    nbytes = n * dtype.itemsize
    if not _HUGE_OK or nbytes < HUGE_MIN_BYTES:
        return torch.empty(tuple(shape), dtype=dtype)
    try:
        region = mmap.mmap(-1, nbytes, flags=_MAP_FLAGS)  # private: Python's default (shared) gets no THP
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no THP support, or no room for the mapping: the plain allocator
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(region, dtype=dtype).view(tuple(shape))


def mapped(path, begin: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor | None:
    """The ``nbytes`` at ``begin`` of file ``path`` as a tensor, mapped copy-on-write (writes stay private
    to this process); None where private file mappings are not available (then read the bytes)."""
    if not _HUGE_OK or nbytes < HUGE_MIN_BYTES:
        return None
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as fh:  # the mapping outlives the descriptor
            region = mmap.mmap(fh.fileno(), begin + nbytes - start, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(region, dtype=dtype, count=nbytes // dtype.itemsize,
                            offset=begin - start).view(tuple(shape))


def _numpy_bits(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor as a numpy array of same-width unsigned integers (no copy)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view).numpy().view(f"u{t.element_size()}")


def convert_into(out: torch.Tensor, raw: torch.Tensor, src_dtype: torch.dtype) -> None:
    """``out`` (1-D, contiguous) = the ``src_dtype`` values stored in ``raw`` (uint8 bytes, little-endian),
    cast to ``out.dtype`` in the calling thread when the cast is a widening one this module knows (the
    reads of a bfloat16/float16 checkpoint into float32: one numpy call, which releases the GIL for its
    whole length); any other pair goes through torch's ``copy_``."""
    src = raw.view(src_dtype)
    if src.numel() != out.numel():
        raise ValueError(f"convert_into: {src.numel()} values into {out.numel()}")
    if out.dtype == torch.float32 and src_dtype == torch.bfloat16:
        # bfloat16 is the top half of a float32: widening is a shift, exact for every bit pattern
        # (inf, NaN payloads, subnormals), as torch's own conversion.
        np.left_shift(_numpy_bits(src), 16, out=_numpy_bits(out), dtype=np.uint32)
    elif out.dtype == torch.float32 and src_dtype == torch.float16:
        np.copyto(out.numpy(), src.view(torch.int16).numpy().view(np.float16), casting="safe")
    elif out.dtype == src_dtype:
        _numpy_bits(out)[:] = _numpy_bits(src)
    else:
        out.copy_(src)


# torch's count of the tensors and storage objects sharing a storage (private; None where it is missing).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class BufferPool:
    """Tensors to read offloaded weights into, reused from module to module (see the module's "Reuse").

    The pool keeps only the *storage* of each buffer, so a storage nobody else uses has one user (the
    pool's): :meth:`take` hands it out again then, and allocates otherwise.  A torch without the use
    count gets fresh memory every time (correct, only slower)."""

    def __init__(self):
        self._kept: dict[tuple, list[torch.UntypedStorage]] = {}

    def take(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` that no other tensor shares."""
        if _use_count is None:
            return empty(shape, dtype)
        shape = tuple(int(d) for d in shape)
        kept = self._kept.setdefault((shape, dtype), [])
        storage = next((s for s in kept if _use_count(s._cdata) == 1), None)
        if storage is None:
            storage = empty(shape, dtype).untyped_storage()
            kept.append(storage)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)

    def release(self) -> None:
        """Forget the buffers nobody holds (their memory goes back to the OS as their mappings close)."""
        for key, kept in self._kept.items():
            self._kept[key] = [s for s in kept if _use_count(s._cdata) != 1]

    def nbytes(self) -> int:
        """Bytes the pool holds (free or handed out)."""
        return sum(s.nbytes() for kept in self._kept.values() for s in kept)


# ----------------------------------------------------------------------------- the C heap
HEAP_SLACK_BYTES = 256 << 20  # free heap a block may leave behind before it is handed back (trim_heap)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc():
    """glibc, or None (another C library: nothing to trim)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.malloc_trim  # noqa: B018 - raises AttributeError where it is missing (musl)
    except (OSError, AttributeError):
        return None
    if hasattr(lib, "mallinfo2"):  # glibc >= 2.33
        lib.mallinfo2.restype = _MallInfo2
    return lib


def heap_free_bytes() -> int | None:
    """Bytes glibc's heap holds free (still resident, as far as they were touched); None where unknown."""
    lib = _glibc()
    if lib is None or not hasattr(lib, "mallinfo2"):
        return None
    return int(lib.mallinfo2().fordblks)


def trim_heap(slack: int = 0) -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).  ``slack``:
    only when the heap holds more than that many free bytes (where glibc cannot say, always).

    Why: glibc does not always reuse what a forward pass frees.  A pass allocates and frees every block's
    activations (and, offloaded, its weights); in some runs of the same pass the heap grew instead, block
    after block, and kept the pages: measured with throwaway per-layer samplers, +1.3 GiB of free heap
    over one 396-position pass of the Gemma-2-2B shape, +4 GiB over the Llama-3-8B shape's candidate pass
    (its 6.55 GiB peak), in other runs none.  :func:`bake.store.checkpoint.load_bounded` calls this with
    :data:`HEAP_SLACK_BYTES` after every block of an offloaded model, so the heap never holds much more
    than that; when glibc did reuse its memory, nothing is trimmed and nothing is paid."""
    lib = _glibc()
    if lib is None:
        return
    if slack:
        free = heap_free_bytes()
        if free is not None and free <= slack:
            return
    lib.malloc_trim(0)
