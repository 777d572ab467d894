"""A GGUF file as a lazy tensor store: names, types, shapes and raw bytes, one matrix dequantised at a time.

Used by the in-place GGUF bake (:mod:`bake.formats.gguf_inplace`).  Nothing here loads the file: gguf-py's
``GGUFReader`` maps it read-only and parses the header (metadata and tensor infos); a tensor's bytes are read
only when asked for, with ``os.pread`` into a buffer of one tensor (:meth:`GGUFStore.raw_chunks` copies in
chunks without keeping any), so a bake that copies a 5 GB file holds one matrix at a time.

Which ``gguf``: the release in this environment (the one transformers dequantises GGUF files with), not the
copy bundled with llama.cpp's converter (:func:`bake.formats.gguf.converter_dir`); ``gguf.quants.dequantize``
is the same code transformers' GGUF loader calls, so a matrix dequantised here is bit for bit the one the
hooked reference multiplies by.

HF module names are mapped to GGUF tensor names with gguf-py's own table (``gguf.get_tensor_name_map`` for the
file's ``general.architecture``), exactly as transformers' ``get_gguf_hf_weights_map`` does, not with a table
of ours.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bake.errors import BakeError

LINEAS_PREFIX = "lineas."            # metadata keys this tool writes into a baked file
BAKES_KEY = "lineas.bakes"           # JSON list of bake records (as config.json's lineas_baked)
CHUNK = 64 << 20                     # bytes per read when copying a tensor


class GGUFFileError(BakeError, ValueError):
    """A GGUF file that cannot be baked in place (unreadable, big-endian, an architecture gguf-py does not
    know, a tensor the plan needs that the file lacks): exit 2, nothing written."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str          # GGMLQuantizationType name: F32, Q4_K, ...
    type_id: int
    shape: tuple[int, ...]  # numpy order: [rows, cols] (a linear's [out, in])
    n_bytes: int
    offset: int             # absolute offset of the tensor's bytes in the file

    @property
    def quantised(self) -> bool:
        return self.type_name not in ("F32", "F16", "BF16", "F64")


class GGUFStore:
    """One GGUF file, read lazily (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # noqa: BLE001 - gguf-py raises ValueError, struct.error, IndexError...
            raise GGUFFileError(f"{self.path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
        if self._reader.endianess != gguf.GGUFEndian.LITTLE:
            raise GGUFFileError(f"{self.path} is a big-endian GGUF file; only little-endian files are baked")
        self._gguf = gguf
        self.tensors: dict[str, TensorInfo] = {}
        self._raw = {}
        for t in self._reader.tensors:
            shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
            self.tensors[t.name] = TensorInfo(t.name, t.tensor_type.name, int(t.tensor_type), shape, int(t.n_bytes),
                                              int(t.data_offset))
            self._raw[t.name] = t

    # ---- metadata
    @property
    def reader(self):
        """gguf-py's ``GGUFReader`` (metadata fields, for the writer that copies them)."""
        return self._reader

    def field(self, key: str):
        f = self._reader.get_field(key)
        return f.contents() if f is not None else None

    @property
    def architecture(self) -> str:
        arch = self.field("general.architecture")
        if not arch:
            raise GGUFFileError(f"{self.path} has no general.architecture")
        return str(arch)

    @property
    def block_count(self) -> int:
        n = self.field(f"{self.architecture}.block_count")
        if n is None:
            raise GGUFFileError(f"{self.path} has no {self.architecture}.block_count")
        return int(n)

    def earlier_bakes(self) -> list:
        """The ``lineas.bakes`` record of a file this tool baked (empty for any other file)."""
        raw = self.field(BAKES_KEY)
        if raw is None:
            return []
        try:
            data = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise GGUFFileError(f"{self.path}: {BAKES_KEY} is not the JSON list lineas-bake writes ({e})") from None
        if not isinstance(data, list):
            raise GGUFFileError(f"{self.path}: {BAKES_KEY} is not a list of bake records")
        return data

    # ---- names
    def name_map(self):
        """gguf-py's ``TensorNameMap`` for this file's architecture and block count."""
        gguf = self._gguf
        arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.architecture), None)
        if arch is None:
            raise GGUFFileError(f"{self.path}: architecture {self.architecture!r} is unknown to gguf-py "
                                f"{_gguf_version()}")
        return gguf.get_tensor_name_map(arch, self.block_count)

    def gguf_name(self, hf_module: str) -> str:
        """The GGUF base name (``blk.0.attn_q``) of an HF module (``model.layers.0.self_attn.q_proj``)."""
        name = self.name_map().get_name(hf_module)
        if name is None:
            raise GGUFFileError(f"gguf-py's tensor-name map for {self.architecture!r} has no name for {hf_module}")
        return name

    # ---- data
    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFFileError(f"{self.path} has no tensor {name!r}") from None

    def raw_tensor(self, name: str):
        """gguf-py's ``ReaderTensor`` of ``name`` (its type and byte shape, for a writer copying it as is)."""
        self.info(name)
        return self._raw[name]

    def raw_bytes(self, name: str) -> bytes:
        info = self.info(name)
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), info.n_bytes, info.offset)
        if len(data) != info.n_bytes:
            raise GGUFFileError(f"{self.path}: tensor {name} is truncated ({len(data)} of {info.n_bytes} bytes)")
        return data

    def raw_chunks(self, name: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The tensor's bytes as stored, in chunks (never more than ``chunk`` bytes held)."""
        info = self.info(name)
        with open(self.path, "rb") as f:
            done = 0
            while done < info.n_bytes:
                data = os.pread(f.fileno(), min(chunk, info.n_bytes - done), info.offset + done)
                if not data:
                    raise GGUFFileError(f"{self.path}: tensor {name} is truncated")
                yield data
                done += len(data)

    def dequantise(self, name: str) -> np.ndarray:
        """The tensor as float32, numpy order (``gguf.quants.dequantize``: what transformers' loader computes)."""
        info = self.info(name)
        gguf = self._gguf
        qtype = gguf.GGMLQuantizationType(info.type_id)
        if qtype == gguf.GGMLQuantizationType.F32:
            arr = np.frombuffer(self.raw_bytes(name), dtype="<f4").reshape(info.shape)
            return arr.copy()
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.frombuffer(self.raw_bytes(name), dtype=np.uint8)
        byte_shape = (*info.shape[:-1], info.shape[-1] // block * type_size)
        try:
            out = gguf.quants.dequantize(raw.reshape(byte_shape), qtype)
        except NotImplementedError:
            raise GGUFFileError(f"{self.path}: gguf-py {_gguf_version()} cannot dequantise {name} "
                                f"({info.type_name})") from None
        return np.ascontiguousarray(out, dtype=np.float32).reshape(info.shape)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def gguf_version() -> str:
    """The installed gguf-py release (recorded in provenance)."""
    return _gguf_version()
