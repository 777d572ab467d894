"""Validate a safetensors file's header before any tensor is read.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header length
``N``, ``N`` bytes of JSON (an object: tensor name -> ``{"dtype", "shape", "data_offsets"}``, plus an
optional ``"__metadata__"`` object of strings), then the data.  :func:`read_header` refuses, with a
:class:`SafetensorsHeaderError` naming the file and the entry, every header that safetensors itself
would refuse or that would make a reader go wrong:

* a header length that is zero, absurd (over :data:`MAX_HEADER_BYTES`) or past the end of the file;
* JSON that is not an object, has duplicate names, or metadata that is not an object of strings;
* a dtype that is not a safetensors dtype, a shape that is not a list of non-negative integers;
* data offsets that are not two integers ``0 <= begin <= end``, whose length is not ``numel x itemsize``,
  that overlap another tensor's range, or leave a gap: the ranges, sorted, must cover the data exactly.

Only the header is read (its length is bounded), so a file whose header claims huge tensors is refused
or accepted in microseconds.  Used by :mod:`lineas.maps` and by ``bake.store`` (model shards).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# Every safetensors dtype and its size in bits (readers decide which of them they can use).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER_BYTES = 100 << 20  # what safetensors accepts (its MAX_HEADER_SIZE)
METADATA_KEY = "__metadata__"


class SafetensorsHeaderError(ValueError):
    """A safetensors file whose header is malformed or inconsistent with its size."""


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as the header describes it; ``begin``/``end`` are relative to the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: entries in file order, metadata (strings), where the data starts."""

    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise SafetensorsHeaderError(f"duplicate name {k!r}")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(raw: bytes, data_bytes: int, origin: str = "<bytes>") -> Header:
    """Validate the JSON header ``raw`` of a file holding ``data_bytes`` bytes of data after it."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except SafetensorsHeaderError as e:
        raise SafetensorsHeaderError(f"{origin}: header has a {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SafetensorsHeaderError(f"{origin}: header is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise SafetensorsHeaderError(f"{origin}: header is a JSON {type(obj).__name__}, not an object")
    meta = obj.pop(METADATA_KEY, None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsHeaderError(f"{origin}: header {METADATA_KEY!r} must be an object of strings")
    entries = []
    for name, e in obj.items():
        where = f"{origin}: tensor {name!r}"
        if not isinstance(e, dict):
            raise SafetensorsHeaderError(f"{where}: entry is a {type(e).__name__}, not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise SafetensorsHeaderError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsHeaderError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsHeaderError(f"{where}: data_offsets {offsets!r} are not two integers 0 <= begin <= end")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise SafetensorsHeaderError(f"{where}: shape {shape} of {dtype} needs {bits / 8:g} bytes, but its "
                                         f"data_offsets span {offsets[1] - offsets[0]}")
        entries.append(HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda h: (h.begin, h.end))
    at = 0
    for h in entries:
        if h.begin != at:
            what = "overlaps the tensor before it" if h.begin < at else f"leaves a gap of {h.begin - at} byte(s)"
            raise SafetensorsHeaderError(f"{origin}: tensor {h.name!r} (bytes {h.begin}-{h.end}) {what}")
        at = h.end
    if at != data_bytes:
        raise SafetensorsHeaderError(f"{origin}: the tensors cover {at} byte(s) of data, the file holds "
                                     f"{data_bytes} (truncated, or bytes appended)")
    return Header({h.name: h for h in entries}, dict(meta), 0)


def read_header(path: str | os.PathLike) -> Header:
    """The validated header of the safetensors file ``path`` (only the header is read).  ``OSError`` when the
    file cannot be opened; :class:`SafetensorsHeaderError` for anything wrong in it."""
    path = Path(path)
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsHeaderError(f"{path}: {size} byte(s), too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or n > size - 8:
            raise SafetensorsHeaderError(f"{path}: header length {n} is impossible for a file of {size} byte(s)")
        raw = fh.read(n)
    if len(raw) != n:
        raise SafetensorsHeaderError(f"{path}: file ends inside its header")
    header = parse_header(raw, size - 8 - n, str(path))
    return Header(header.entries, header.metadata, 8 + n)
