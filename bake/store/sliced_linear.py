"""The products of a bounded-memory model's large ``nn.Linear`` weights, computed a slice of rows at a time.

An offloaded block (:func:`bake.store.checkpoint.load_bounded`) reads its weights every time it runs.  Read
whole, a Linear weight is first converted into a float32 buffer of its own (a Gemma-2-2B MLP matrix:
85 MB, 8 GB for a whole pass), then multiplied: the product reads those 85 MB back from memory, after
the conversion wrote them.  Here the product runs over slices of :data:`SLICE_BYTES` of float32 rows:
each slice is converted into one reused buffer (or, stored in the run dtype, used in place from the
mapped file) and multiplied into its columns of the output while it is still in the CPU's cache.
A large resident weight (a tied 256k-entry output head) is multiplied slice by slice too: this machine's
MKL multiplies a few rows by a large transposed matrix faster in slices than whole.

Measured on this project's 2-core CPU box (throwaway scripts, warm page cache):

* one Gemma-2-2B decoder layer's seven matrices read from the bfloat16 shard into float32 and
  multiplied: 88 against 131 ms at 24 rows of input, 126 against 173 ms at 63, 254 against 289 at 165,
  304 against 348 at 231.  With slices of 1 or 2 MB the products were slower and no longer equal to the
  whole product bit for bit; with 8 MB they were equal (each output element is the same dot product;
  :func:`sliced_linear` calls ``addmm``/``mm`` as ``F.linear`` does);
* the float32 output head (256000 x 2304): 741 against 996 ms at 27 rows, 917 against 1404 at 60,
  1177 against 1645 at 118 (equal bit for bit at these sizes; at 3 rows MKL takes another path and
  the last bits of some logits differ, as between any two ways of summing, within the check's tolerance).

No offloaded weight of these Linears is held in memory beyond the slice buffer, so an offloaded pass
also needs less memory than a whole block's float32 weights.

The math is :func:`sliced_linear`; :func:`slice_linears` is the bookkeeping: it takes each offloaded
weight out of its Linear (so accelerate's offload hook does not read it) and gives the Linears a forward
that multiplies by slices.  Forward hooks on a Linear (steering, recording, the narrowed output head of
:class:`bake.verify.passes.TorchRunner`) fire as before.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from bake.store.rawmem import convert_into, mapped
from bake.store.shards import TensorInfo, read_as, read_exactly

SLICE_BYTES = 8 << 20  # float32 rows per slice (measured above: 8 MB fastest, and equal to the whole product)
SLICED_MIN_BYTES = 2 * SLICE_BYTES  # a resident weight below this is one slice: F.linear as it is

Rows = Callable[[int, int], torch.Tensor]  # (start, stop) -> weight rows [stop - start, K], valid until the next call
Sliced = Literal["stored", "resident"]  # a Linear multiplying from its shard, or from its weight in memory


def sliced_linear(x: torch.Tensor, rows: Rows, out_features: int, bias: torch.Tensor | None,
                  slice_rows: int) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with the weight ``W`` given by ``rows`` (``rows(s, e)`` is ``W[s:e]`` in
    ``x``'s dtype), ``slice_rows`` rows at a time."""
    if slice_rows < 1:
        raise ValueError(f"slice_rows must be >= 1, got {slice_rows}")
    flat = x.reshape(-1, x.shape[-1])
    out = flat.new_empty(flat.shape[0], out_features)
    for s in range(0, out_features, slice_rows):
        e = min(out_features, s + slice_rows)
        w = rows(s, e)
        if bias is None:
            torch.mm(flat, w.t(), out=out[:, s:e])
        else:
            torch.addmm(bias[s:e], flat, w.t(), out=out[:, s:e])
    return out.view(*x.shape[:-1], out_features)


def slice_rows_for(in_features: int, itemsize: int = 4) -> int:
    """Rows of a weight with ``in_features`` columns in one :data:`SLICE_BYTES` slice."""
    return max(1, SLICE_BYTES // (in_features * itemsize))


@dataclass
class _SliceBuffers:
    """One reusable slice per shape, shared by the Linears of one model (they run one at a time)."""

    kept: dict[tuple[int, int, torch.dtype], torch.Tensor] = field(default_factory=dict)

    def take(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rows, cols, dtype)
        if key not in self.kept:
            self.kept[key] = torch.empty(rows, cols, dtype=dtype)
        return self.kept[key]


class _StoredRows:
    """The rows of a weight that stays in its shard (``info``), in the run ``dtype``, one slice at a time
    (a :data:`Rows`): from the file's mapped pages, or (a small weight, or no private file mapping here)
    read through a reused buffer.  ``close()`` unmaps the pages or closes the file."""

    def __init__(self, info: TensorInfo, dtype: torch.dtype, buffers: _SliceBuffers):
        n, k = info.shape
        self.info, self.same = info, info.dtype == dtype
        self.step = slice_rows_for(k, dtype.itemsize)
        self.row_bytes = k * info.dtype.itemsize
        self.stored = mapped(info.file, info.begin, info.nbytes, info.dtype, (n, k))
        direct = self.stored is not None and self.same  # the slices are the mapped pages: no buffer
        self.buf = None if direct else buffers.take(min(self.step, n), k, dtype)
        self.fh = self.raw = None
        if self.stored is None:
            self.fh = open(info.file, "rb")  # noqa: SIM115 -- closed by close()
            self.raw = self.buf.view(-1).view(torch.uint8) if self.same else buffers.take(
                min(self.step, n), self.row_bytes, torch.uint8).view(-1)

    def __call__(self, s: int, e: int) -> torch.Tensor:
        if self.stored is not None:
            if self.same:
                return self.stored[s:e]
            src = self.stored[s:e].reshape(-1).view(torch.uint8)
        else:
            src = self.raw[:(e - s) * self.row_bytes]
            self.fh.seek(self.info.begin + s * self.row_bytes)
            read_exactly(self.fh, memoryview(src.numpy()), self.info)
            if self.same:
                return self.buf[:e - s]
        out = self.buf[:e - s]
        convert_into(out.view(-1), src, self.info.dtype)
        return out

    def close(self) -> None:
        self.stored = None
        if self.fh is not None:
            self.fh.close()


def _stored_forward(module: nn.Linear, info: TensorInfo, dtype: torch.dtype, buffers: _SliceBuffers,
                    x: torch.Tensor) -> torch.Tensor:
    """The forward of a Linear whose weight stays in its shard (``info``), run in ``dtype``."""
    if x.dtype != dtype:  # as nn.Linear would: F.linear names the mismatch
        return F.linear(x, read_as(info, dtype), module.bias)
    with closing(_StoredRows(info, dtype, buffers)) as rows:
        return sliced_linear(x, rows, info.shape[0], module.bias, rows.step)


def _resident_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a Linear whose (large) weight is in memory."""
    w = module.weight
    if x.dtype != w.dtype or x.device != w.device:
        return F.linear(x, w, module.bias)
    return sliced_linear(x, lambda s, e: w[s:e], w.shape[0], module.bias, slice_rows_for(w.shape[1], w.element_size()))


def slice_linears(model: nn.Module, offloaded: Callable[[str], bool], info_of: Callable[[str], TensorInfo],
                  dtype: torch.dtype) -> dict[str, Sliced]:
    """Give the large ``nn.Linear`` modules of ``model`` (a skeleton whose resident weights are loaded, to
    run on the CPU in ``dtype``) a forward that multiplies by slices (:func:`sliced_linear`); call before
    accelerate's ``dispatch_model``.

    * ``offloaded(name)`` weights stored as ``info_of(name)`` in ``dtype`` or a narrower float, not tied
      to another module: read from the shard slice by slice.  They are no longer parameters, so
      accelerate neither places nor reads them; ``module.weight`` stays readable as a meta tensor.
    * Resident weights of at least :data:`SLICED_MIN_BYTES` (tied ones too): multiplied by slices.

    Returns ``{module name: "stored" | "resident"}`` for the modules changed."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    buffers = _SliceBuffers()
    done: dict[str, Sliced] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module) is not nn.Linear or not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            continue
        wname = f"{name}.weight" if name else "weight"
        if offloaded(wname):
            info = info_of(wname)
            if (uses[id(weight)] > 1 or not info.dtype.is_floating_point or info.dtype.itemsize > dtype.itemsize
                    or tuple(info.shape) != tuple(weight.shape)):
                continue
            del module._parameters["weight"]
            module.weight = weight.detach().to("meta")  # a plain attribute now: accelerate does not read it
            # An instance attribute: nn.Module's __call__ (and its hooks) and accelerate's wrapper call it.
            module.forward = functools.partial(_stored_forward, module, info, dtype, buffers)
            done[name] = "stored"
        elif weight.device.type == "cpu" and weight.nbytes >= SLICED_MIN_BYTES:
            module.forward = functools.partial(_resident_forward, module)
            done[name] = "resident"
    return done
