"""A folder of safetensors shards, read lazily and written as a stream.

Reading: the headers are parsed once (8-byte length, JSON); a tensor is read only when
asked for (``safe_open``), and an untouched tensor can be copied as its raw bytes, so its
sha256 in the output is the input's.  Writing: :class:`ShardWriter` writes a shard's
header first (every entry's dtype and shape is known from the plan) and then the
tensors one at a time, so no shard is ever held in memory; big tensors that change
dtype are converted in row blocks.  The file layout is the safetensors format
(https://github.com/huggingface/safetensors#format): header padded with spaces to a
multiple of 8, data in offset order, no gaps.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bake.errors import BakeError
from bake.store.rawmem import BufferPool, convert_into, empty, mapped
from lineas.io import open_new, plain_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes per read/convert block (bounds the memory of copying one tensor).  Cache-sized blocks convert
# fastest: bfloat16 -> float32 of 1.4 GiB took 0.86 s in 4 MB blocks, 1.1 s in 64 MB, 1.14 s in 256 MB
# (safetensors' get_tensor + .to(): 0.8 s), measured here with a throwaway script on the Gemma-2-2B shape.
READ_BLOCK = 4 << 20

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class ShardFormatError(ValueError):
    """A checkpoint folder whose safetensors files or index cannot be read."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in ``file``
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _read_header(path: Path) -> tuple[dict, dict, int]:
    """(entries, metadata, data start) of one safetensors file, its header validated before any tensor is
    read (:func:`bake.store.safetensors_header.checked_header`: dtypes known, offsets in bounds, ranges
    neither overlapping nor leaving gaps, sizes matching the shapes)."""
    from bake.store.safetensors_header import SafetensorsHeaderError, checked_header

    try:
        header = checked_header(path)
    except SafetensorsHeaderError as e:
        raise ShardFormatError(f"not a readable safetensors file: {e}") from None
    entries = {h.name: {"dtype": h.dtype, "shape": list(h.shape), "data_offsets": [h.begin, h.end]}
               for h in header.entries.values()}
    return entries, header.metadata, header.data_start


def file_tensors(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of one safetensors file in file order (name -> :class:`TensorInfo`), and its metadata."""
    entries, meta, start = _read_header(path)
    infos = {}
    for k in sorted(entries, key=lambda k: entries[k]["data_offsets"][0]):
        e = entries[k]
        if e["dtype"] not in ST_DTYPES:
            raise ShardFormatError(f"{path}: tensor {k!r} has dtype {e['dtype']}, which lineas-bake "
                                   "cannot fold (quantised or unusual checkpoint?)")
        b, en = e["data_offsets"]
        infos[k] = TensorInfo(k, path, ST_DTYPES[e["dtype"]], tuple(e["shape"]), start + b, start + en)
    return infos, meta


class ShardNameError(BakeError, ShardFormatError):
    """A shard name in ``model.safetensors.index.json`` that is not a plain file name inside the folder
    (``../x.safetensors``, an absolute path): it would read, and an export would write, outside its folder."""


def index_shard_names(index: Path) -> list[str]:
    """The shard file names of a safetensors index, sorted; each must be a plain file name
    (:func:`lineas.io.plain_name`), else :class:`ShardNameError` naming it."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        raise ShardFormatError(f"{index} is not a valid safetensors index ({e})") from None
    for name in sorted(names, key=repr):
        try:
            plain_name(name, "shard file name")
        except ValueError as e:
            raise ShardNameError(f"{index}: {e}") from None
    return sorted(names)


class ShardFolder:
    """The safetensors weights of a checkpoint folder: ``model.safetensors`` or shards + index."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = index_shard_names(index)
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise ShardFormatError(f"{self.folder} has no {SINGLE_FILE} nor {INDEX_FILE}")
        self.sharded = index.is_file()
        self.files: list[str] = files
        self.infos: dict[str, TensorInfo] = {}
        self.file_keys: dict[str, list[str]] = {}
        for name in files:
            infos, _ = file_tensors(self.folder / name)
            self.file_keys[name] = list(infos)
            self.infos.update(infos)

    def keys(self) -> list[str]:
        return list(self.infos)

    def file_of(self, key: str) -> str:
        return self.infos[key].file.name

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def info(self, key: str) -> TensorInfo:
        return self.infos[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key``, read now from its shard (with plain reads: a memory map would count the
        file's pages in this process's memory until it is closed)."""
        info = self.infos[key]
        return read_as(info, info.dtype)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())


def raw_blocks(info: TensorInfo, block: int = READ_BLOCK) -> Iterator[memoryview]:
    """The stored bytes of one tensor, in blocks of at most ``block`` bytes (no decoding), for writing
    them out: each block is a view of ONE reused buffer, valid until the next block is asked for
    (no allocation, zero-fill or page faults per block)."""
    buf = bytearray(min(block, info.nbytes))
    with open(info.file, "rb") as fh:
        fh.seek(info.begin)
        left = info.nbytes
        while left:
            view = memoryview(buf)[:min(block, left)]
            read_exactly(fh, view, info)
            left -= len(view)
            yield view


def decode(data: bytearray, dtype: torch.dtype, shape: Sequence[int] = (-1,)) -> torch.Tensor:
    """Little-endian safetensors bytes as a tensor that shares ``data`` (no copy)."""
    if not data:
        return torch.empty(tuple(shape), dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(tuple(shape))


def converted_blocks(info: TensorInfo, dtype: torch.dtype, block: int = READ_BLOCK) -> Iterator[torch.Tensor]:
    """``info``'s tensor cast to ``dtype``, block by block (a 2 GB embedding never sits in memory whole);
    each block is a view of one reused buffer, valid until the next one, as in :func:`raw_blocks`.
    Raises :class:`bake.errors.NonFiniteCastError` when the cast overflows."""
    from bake.errors import NonFiniteCastError

    item = torch.empty((), dtype=info.dtype).element_size()
    # Only a narrower range can overflow (float32 -> float16); bfloat16 -> float32 needs no check.
    narrowing = torch.finfo(dtype).max < torch.finfo(info.dtype).max
    out = torch.empty(max(1, block // item), dtype=dtype)  # reused: each block is written out before the next
    for raw in raw_blocks(info, block - block % item):
        b = decode(raw, info.dtype)
        o = out[:b.numel()]
        convert_into(o, decode(raw, torch.uint8), info.dtype)  # in this thread: see bake.store.rawmem
        if narrowing:
            n_bad = int((~torch.isfinite(o)).sum()) - int((~torch.isfinite(b)).sum())
            if n_bad > 0:
                raise NonFiniteCastError(dtype, {info.key: n_bad})
        yield o


def read_as(info: TensorInfo, dtype: torch.dtype, block: int = READ_BLOCK, *,
            pool: BufferPool | None = None) -> torch.Tensor:
    """``info``'s tensor as a tensor in ``dtype``, in memory of its own or (``pool``) in a reusable buffer of
    that :class:`bake.store.rawmem.BufferPool` (an offloaded block's weight, read again on every pass).

    * Same dtype, large: the file's bytes mapped copy-on-write (no copy; unmapped when freed).
    * Another dtype, into a pool buffer: converted straight from the file's mapped pages.
    * Otherwise: read in ``block``-byte pieces through one reused buffer and converted into the result
      as they come, so a 2 GB embedding's stored bytes never sit in memory whole beside its conversion.

    Conversions run in the calling thread (:mod:`bake.store.rawmem`).  No finiteness check: this reads a
    checkpoint for running it, in a dtype at least as wide as the export's."""
    if dtype == info.dtype:
        out = mapped(info.file, info.begin, info.nbytes, dtype, info.shape)
        if out is not None:
            return out
    out = empty(info.shape, dtype) if pool is None else pool.take(info.shape, dtype)
    flat = out.view(-1)
    if pool is not None and dtype != info.dtype:
        stored = mapped(info.file, info.begin, info.nbytes, info.dtype, (-1,))
        if stored is not None:
            convert_into(flat, stored.view(torch.uint8), info.dtype)
            return out
    item = torch.empty((), dtype=info.dtype).element_size()
    with open(info.file, "rb") as fh:
        fh.seek(info.begin)
        if dtype == info.dtype:
            read_exactly(fh, memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b""), info)
            return out
        buf = torch.empty(max(item, min(block - block % item, info.nbytes)), dtype=torch.uint8)
        at = 0
        while at < flat.numel():
            n = min(buf.numel() // item, flat.numel() - at)
            read_exactly(fh, memoryview(buf.numpy())[:n * item], info)
            convert_into(flat[at:at + n], buf[:n * item], info.dtype)
            at += n
    return out


def read_exactly(fh, view: memoryview, info: TensorInfo) -> None:
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            raise ShardFormatError(f"{info.file} ends inside tensor {info.key!r}")
        got += n


@dataclass(frozen=True)
class Entry:
    """One tensor of an output shard: its name, dtype and shape (the header is written before the data)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


class ShardWriter:
    """Writes one safetensors file: the header at once, then each entry's data in order."""

    def __init__(self, path: Path, entries: Sequence[Entry], metadata: dict[str, str] | None = None):
        """``path``: a new file (``O_EXCL | O_NOFOLLOW``: an existing file or symlink there is an error, never
        truncated), mode 0666 less the umask."""
        self.path = path
        self.entries = list(entries)
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for e in self.entries:
            header[e.key] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape),
                             "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = os.fdopen(open_new(path), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0
        self.data_bytes = offset

    def write(self, key: str, data: torch.Tensor | Iterable[torch.Tensor | bytes]) -> None:
        """Write entry ``key`` (must be the next one) from a tensor or from blocks (tensors or raw bytes)."""
        e = self.entries[self._next]
        if e.key != key:
            raise RuntimeError(f"{self.path.name}: expected tensor {e.key!r} next, got {key!r}")
        written = 0
        for block in ([data] if isinstance(data, torch.Tensor) else data):
            if isinstance(block, torch.Tensor):
                if block.dtype != e.dtype:
                    raise RuntimeError(f"{key}: writing {block.dtype} into a {e.dtype} entry")
                block = _tensor_bytes(block)
            self._fh.write(block)
            written += len(block)
        if written != e.nbytes:
            raise RuntimeError(f"{self.path.name}: tensor {key!r} has {written} bytes, header says {e.nbytes}")
        self._next += 1

    def abort(self) -> None:
        """Close the file without checking it is complete (after an error; the file is then garbage)."""
        self._fh.close()

    def close(self) -> None:
        if self._next != len(self.entries):
            missing = [e.key for e in self.entries[self._next:]]
            self._fh.close()
            raise RuntimeError(f"{self.path.name}: {len(missing)} tensor(s) never written, e.g. {missing[0]!r}")
        # No fsync: like save_pretrained, durability is the file system's; what matters here is that a
        # killed run leaves no partial export, which the temporary folder and its rename guarantee.
        self._fh.close()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of ``t`` (contiguous, CPU), without a copy when possible."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as transformers writes it."""
    from lineas.io import atomic_write_text

    body = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(folder / INDEX_FILE, json.dumps(body, indent=2) + "\n")
