"""Bake into a GGUF file in place: the folded F32 norms and biases, every quantised block copied byte for byte.

Why this is exact (issue 27): llama.cpp keeps norms and biases in F32 in every quantisation, and it computes an
RMS norm as ``x_hat * w`` with ``w`` *as stored* (``build_norm``: ``ggml_rms_norm`` then ``ggml_mul``), a
LayerNorm as ``x_hat * w + b``, and a linear as ``W x + b`` with the optional bias added after the matmul
(``build_qkv``, ``build_ffn``).  So, in the file's own values:

* a scale ``s`` on a norm's output folds into the stored norm weight, ``w' = s * w``.  This holds for every
  convention: llama.cpp's converter stores the multiplier (Gemma's ``1 + w`` is stored as ``w + 1``,
  ``convert_hf_to_gguf.py`` Gemma*Model.modify_tensors; transformers' GGUF loader subtracts the 1 again,
  ``Gemma2TensorProcessor``), so ``s * (stored)`` is the HF fold ``s * (1 + w) - 1`` plus that same 1;
* a shift ``t`` folds into the norm's own F32 bias (``b' = s*b + t``) or into every consumer's bias,
  ``b' = b + W t`` with ``W`` the consumer's matrix *dequantised* (``gguf.quants.dequantize``: what the hooked
  reference multiplies by), in the file's row order (llama.cpp's q/k rows are permuted by the converter; the
  bias is computed with the permuted matrix, so it lands on the permuted rows).  A consumer without a bias gets
  a new F32 ``<name>.bias`` tensor: the plan (:func:`bake.plan.planner.plan` with ``--require-runtime
  llama.cpp``) has already checked that llama.cpp loads it for this architecture (the registry's
  ``bias_flags_served``).

Everything else (producer rows, embeddings) would change a quantised matrix, i.e. requantise it, and is refused
(:class:`bake.store.gguf_file.GGUFFileError`).  The new file is written with gguf-py's ``GGUFWriter`` with the
source's tensor types (``raw_dtype``), as llama.cpp's ``gguf_new_metadata.py`` copies a file: same metadata
(tokenizer, chat template, quantisation info) plus a ``lineas.*`` record; the untouched tensors' bytes are
copied in chunks, never decoded.  :func:`write_gguf` with ``dequantise_all`` writes the F32 scratch copy the
exact check runs (:mod:`bake.formats.gguf_inplace_check`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bake.core.fold_math import fold_input_shift, fold_norm_bias, fold_norm_scale
from bake.core.plan_types import FoldOp, FoldPlan
from bake.store.gguf_file import BAKES_KEY, LINEAS_PREFIX, GGUFFileError, GGUFStore
from lineas.maps import SiteMap

FOLDABLE_OPS = (FoldOp.NORM_SCALE, FoldOp.NORM_SCALE_1P, FoldOp.NORM_BIAS, FoldOp.INPUT_SHIFT)
PRODUCER_HINT = ("only norm sites bake into a GGUF file in place (their scale goes into the F32 norm weight, their "
                 "shift into F32 biases); a producer's or embedding's fold would rewrite a quantised matrix. Steer "
                 "norm sites (lineas-train --sites with the norms), or bake the full-precision model and quantise it")


@dataclass
class GGUFFold:
    """The tensors an in-place bake writes: GGUF name -> new F32 value, and which of them are new."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)       # new tensor -> the tensor it is written after
    record: list[dict] = field(default_factory=list)        # one line per written tensor (provenance)

    def get(self, store: GGUFStore, name: str, n: int) -> np.ndarray:
        """The current value of ``name``: already folded, in the file (as float32), or a new zero bias of ``n``."""
        if name in self.values:
            return self.values[name]
        if name in store.tensors:
            return store.dequantise(name)
        return np.zeros(n, dtype=np.float32)


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def fold_into_gguf(store: GGUFStore, plan: FoldPlan, maps: Mapping[str, SiteMap]) -> GGUFFold:
    """Every tensor ``plan`` writes, folded in float64 (:mod:`bake.core.fold_math`) from the file's values and
    rounded once to float32; reads one consumer matrix at a time, only where a shift needs ``W t``."""
    fold = GGUFFold()
    for p in plan.sites:
        if p.affine is not None:  # the plan was checked against llama.cpp already; this is a guard, not a path
            raise GGUFFileError(f"site {p.site} needs an affine module ({p.reason}); a GGUF file cannot carry one")
        m = maps[p.site]
        for step in p.steps:
            if step.op not in FOLDABLE_OPS:
                raise GGUFFileError(f"site {p.site}: a {step.op.value} fold on {step.module}: {PRODUCER_HINT}")
            base = store.gguf_name(step.module)
            if step.op in (FoldOp.NORM_SCALE, FoldOp.NORM_SCALE_1P):
                _norm_scale(store, fold, p.site, base + ".weight", m, step.op)
            elif step.op is FoldOp.NORM_BIAS:
                name = base + ".bias"
                if name not in store.tensors:
                    raise GGUFFileError(f"{store.path} has no {name} for {step.module}'s bias")
                b = fold.get(store, name, m.dim)
                fold.values[name] = fold_norm_bias(_t(b), m.scale, m.shift).numpy()
                fold.record.append({"tensor": name, "site": p.site, "op": step.op.value, "new": False})
            else:
                _input_shift(store, fold, p.site, base, m)
    return fold


def planned_writes(store: GGUFStore, plan: FoldPlan) -> list[tuple[str, str, bool]]:
    """``(GGUF tensor, what, new)`` for every tensor ``plan`` would write, without reading any tensor's data;
    a step the file cannot take in place (a producer's rows, an embedding, a missing tensor) is refused here,
    before any work."""
    out = []
    for p in plan.sites:
        if p.affine is not None:
            raise GGUFFileError(f"site {p.site} needs an affine module ({p.reason}); a GGUF file cannot carry one")
        for step in p.steps:
            if step.op not in FOLDABLE_OPS:
                raise GGUFFileError(f"site {p.site}: a {step.op.value} fold on {step.module}: {PRODUCER_HINT}")
            base = store.gguf_name(step.module)
            if step.op is FoldOp.INPUT_SHIFT:
                store.info(base + ".weight")
                out.append((base + ".bias", f"b + W t (shift of {p.site})", base + ".bias" not in store.tensors))
            elif step.op is FoldOp.NORM_BIAS:
                store.info(base + ".bias")
                out.append((base + ".bias", f"s*b + t ({p.site})", False))
            else:
                store.info(base + ".weight")
                out.append((base + ".weight", f"s*w ({p.site})", False))
    return out


def _norm_scale(store: GGUFStore, fold: GGUFFold, site: str, name: str, m: SiteMap, op: FoldOp) -> None:
    info = store.info(name)
    if len(info.shape) != 1 or info.shape[0] != m.dim:
        raise GGUFFileError(f"site {site}: {name} has shape {info.shape}, the map has {m.dim} entries")
    w = fold.get(store, name, m.dim)
    # the stored weight is llama.cpp's multiplier for every convention (module docstring): a plain scale
    fold.values[name] = fold_norm_scale(_t(w), m.scale, one_plus=False).numpy()
    fold.record.append({"tensor": name, "site": site, "op": op.value, "stored_as": info.type_name, "new": False,
                        "convention": "stored multiplier (1 + w for Gemma)" if op is FoldOp.NORM_SCALE_1P else "w"})


def _input_shift(store: GGUFStore, fold: GGUFFold, site: str, base: str, m: SiteMap) -> None:
    wname, bname = base + ".weight", base + ".bias"
    info = store.info(wname)
    if len(info.shape) != 2 or info.shape[1] != m.dim:
        raise GGUFFileError(f"site {site}: consumer {wname} has shape {info.shape}, the shift has {m.dim} entries")
    n_out = info.shape[0]
    w = store.dequantise(wname)  # one matrix at a time, freed after this step
    b = fold.get(store, bname, n_out)
    if b.shape != (n_out,):
        raise GGUFFileError(f"{bname} has shape {b.shape}, {wname} has {n_out} rows")
    fold.values[bname] = fold_input_shift(_t(w), _t(b.astype(np.float32)), m.shift).numpy()
    new = bname not in store.tensors
    if new:
        fold.new[bname] = wname
    fold.record.append({"tensor": bname, "site": site, "op": FoldOp.INPUT_SHIFT.value, "matrix": wname,
                        "matrix_type": info.type_name, "new": new})
    del w


# ----------------------------------------------------------------------------- writing
def lineas_metadata(bakes: list[dict]) -> dict:
    """The ``lineas.*`` keys of a baked file: every bake's record (JSON, as config.json's ``lineas_baked``) and
    the last bake's maps sha256 and strengths, readable with any GGUF tool."""
    import gguf

    last = bakes[-1]
    vt = gguf.GGUFValueType
    return {
        BAKES_KEY: (json.dumps(bakes, sort_keys=True), vt.STRING, None),
        LINEAS_PREFIX + "version": (str(last.get("version", "")), vt.STRING, None),
        LINEAS_PREFIX + "maps_sha256": ([m["sha256"] for m in last["maps"]], vt.ARRAY, vt.STRING),
        LINEAS_PREFIX + "strength": ([float(m["strength"]) for m in last["maps"]], vt.ARRAY, vt.FLOAT32),
        LINEAS_PREFIX + "effective_digest": (str(last.get("effective_digest") or ""), vt.STRING, None),
    }


def write_gguf(store: GGUFStore, fold: GGUFFold, out: Path, *, metadata: Mapping[str, tuple] = (),
               dequantise_all: bool = False) -> dict:
    """Write ``store`` with ``fold`` applied to ``out``; returns ``{tensor: "copied" | "folded" | "new" |
    "dequantised"}``.  ``dequantise_all``: every tensor as F32 (the exact check's scratch copy)."""
    import gguf
    from gguf.gguf_writer import WriterState

    reader = store.reader
    metadata = dict(metadata)
    writer = gguf.GGUFWriter(out, arch=store.architecture, endianess=reader.endianess)
    alignment = store.field("general.alignment")
    if alignment is not None:
        writer.data_alignment = int(alignment)
    for f in reader.fields.values():  # as gguf_new_metadata.py copy_with_new_metadata does
        if f.name == "general.architecture" or f.name.startswith("GGUF.") or f.name.startswith(LINEAS_PREFIX):
            continue
        if f.name in metadata:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for key, (val, vtype, sub) in metadata.items():
        writer.add_key_value(key, val, vtype, sub_type=sub)

    after: dict[str, list[str]] = {}
    for new, anchor in fold.new.items():
        after.setdefault(anchor, []).append(new)
    order, how = [], {}
    for name, info in store.tensors.items():
        for item in [name, *after.get(name, [])]:
            order.append(item)
            if item in fold.values:
                arr = np.ascontiguousarray(fold.values[item], dtype=np.float32)
                how[item] = "new" if item in fold.new else "folded"
                writer.add_tensor_info(item, arr.shape, arr.dtype, arr.nbytes)
            elif dequantise_all and info.type_name != "F32":
                n = int(np.prod(info.shape)) * 4
                how[item] = "dequantised"
                writer.add_tensor_info(item, info.shape, np.dtype(np.float32), n)
            else:
                how[item] = "copied"
                raw = store.raw_tensor(item)
                writer.add_tensor_info(item, raw.data.shape, raw.data.dtype, info.n_bytes, raw_dtype=raw.tensor_type)
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        fout = writer.fout[0]
        for name in order:
            if how[name] in ("new", "folded"):
                writer.write_tensor_data(np.ascontiguousarray(fold.values[name], dtype=np.float32))
            elif how[name] == "dequantised":
                writer.write_tensor_data(store.dequantise(name))
            else:  # the stored bytes, in chunks (write_tensor_data's padding, without holding the tensor)
                ti = writer.tensors[0].pop(name)
                writer.write_padding(fout, fout.tell())
                for chunk in store.raw_chunks(name):
                    fout.write(chunk)
                writer.write_padding(fout, ti.nbytes)
                writer.state = WriterState.WEIGHTS
    finally:
        writer.close()
    return how
