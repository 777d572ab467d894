"""Write a baked checkpoint shard by shard, from the source folder and the folded tensors.

The plan touches a few hundred small tensors; :func:`bake.fold.execute.compute_folded` has already
computed them (float64 math, one cast).  Everything else is copied: as raw bytes when the
dtype does not change (the output tensor's sha256 is the input's), or converted in row blocks
when ``--dtype`` asks for another dtype.  Each output shard keeps its source shard's file name
and tensors; new tensors (zero biases a fold switched on, an untied output embedding, the
parameters of affine modules) join the shard of their module's weight.  The structure of the
output is the structure of the committed skeleton (:func:`bake.fold.execute.commit_plan` on the meta
device): its config is the one written, and its parameter names are checked against the keys
written, so nothing the baked model expects is missing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bake.errors import BakeError
from bake.fold.affine_module import LineasAffine
from bake.store.key_names import SavedNames
from bake.store.shards import (
    Entry,
    ShardFolder,
    ShardWriter,
    converted_blocks,
    raw_blocks,
    write_index,
)
from bake.store.stores import FolderStore
from bake.verify.check import bar_disabled
from lineas.config_compat import legacy_rope_fields
from lineas.io import atomic_write_text, plain_name
from lineas.maps import SiteMap


class Source(Enum):
    FOLDED = "folded"  # computed by the fold (final tensors)
    COPY = "copy"  # raw bytes of the source tensor
    CONVERT = "convert"  # the source tensor cast to the export dtype, in blocks
    AFFINE = "affine"  # an affine module's scale/shift, from the maps (float32)


@dataclass(frozen=True)
class OutTensor:
    key: str
    source: Source
    src_key: str | None  # COPY / CONVERT: the source checkpoint key; FOLDED: the name in the folded tensors;
    # AFFINE: the committed parameter name (``key`` is the name save_pretrained writes it under)
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """What goes into each output file, in order."""

    files: dict[str, list[OutTensor]]
    sharded: bool

    def tensors(self) -> list[OutTensor]:
        return [t for ts in self.files.values() for t in ts]

    def total_bytes(self) -> int:
        return sum(Entry(t.key, t.dtype, t.shape).nbytes for t in self.tensors())


def _affine_sites(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LineasAffine)]


def _renamed(name: str, sites: list[str]) -> str:
    """The committed name of a pre-commit parameter name (``S.weight`` -> ``S.inner.weight`` under an affine site)."""
    for s in sites:
        if name.startswith(s + "."):
            return f"{s}.inner.{name[len(s) + 1:]}"
    return name


def _pre(name: str, sites: list[str]) -> str:
    """The pre-commit name of a committed parameter name (``S.inner.weight`` -> ``S.weight``)."""
    for s in sites:
        if name.startswith(s + ".inner."):
            return f"{s}.{name[len(s) + 7:]}"
    return name


def _from_source(out_key: str, key: str, info, out_dtype: torch.dtype | None) -> OutTensor:
    """A tensor taken from the source as it is: its bytes, or converted to ``out_dtype``."""
    if out_dtype is not None and info.dtype.is_floating_point and info.dtype != out_dtype:
        return OutTensor(out_key, Source.CONVERT, key, out_dtype, info.shape)
    return OutTensor(out_key, Source.COPY, key, info.dtype, info.shape)


def output_layout(committed: nn.Module, store: FolderStore, final: Mapping[str, torch.Tensor],
                  out_dtype: torch.dtype | None) -> Layout:
    """Plan the output files: every source tensor (folded or copied) plus the new tensors of the
    committed skeleton.  Raises :class:`BakeError` if a parameter of the baked model would be missing."""
    src = store.folder
    sites = _affine_sites(committed)
    # Parameters still tied in the baked model are saved once (transformers ties them again on load).
    groups: dict[int, list[str]] = {}
    for name, p in committed.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    tied_with = {n: names for names in groups.values() for n in names}
    files: dict[str, list[OutTensor]] = {f: [] for f in src.files}
    written: set[str] = set()  # committed parameter names (and the keys of tensors the model does not load)
    emitted: set[str] = set()  # output keys
    file_of: dict[str, str] = {}  # module name -> file of its tensors (new tensors join it)
    # Output keys are what save_pretrained writes for the committed model under this transformers (its reversed
    # conversion mapping: GPT-NeoX's lm_head.weight is written as embed_out.weight under 5.x, as stored).
    saved = SavedNames(committed)
    for fname in src.files:
        for key in src.file_keys[fname]:
            info = src.info(key)
            name = store.loaded.get(key)  # the parameter transformers loads it into (None: one it drops)
            out_name = _renamed(name, sites) if name is not None else key
            out_key = saved(out_name) if name is not None else key
            if out_key in emitted:  # a second key for the same parameter: transformers loads one of them
                continue
            names = [_pre(n, sites) for n in tied_with.get(out_name, [out_name])] if name is not None else []
            folded = next((n for n in names if n in final), None)
            if folded is not None:
                t = OutTensor(out_key, Source.FOLDED, folded, final[folded].dtype, tuple(final[folded].shape))
            else:
                t = _from_source(out_key, key, info, out_dtype)
            files[fname].append(t)
            written.add(out_name)
            emitted.add(out_key)
            file_of.setdefault((name or key).rpartition(".")[0], fname)
    for name, key in store.keys.items():
        file_of.setdefault(name.rpartition(".")[0], src.file_of(key))
    # A group none of whose names was written is new: a new bias, affine parameters, an untied copy.
    last = src.files[-1]
    for names in groups.values():
        if any(n in written for n in names):
            continue
        name = names[0]
        p = committed.get_parameter(name)
        pre = _pre(name, sites)
        site = next((s for s in sites if name in (f"{s}.lineas_scale", f"{s}.lineas_shift")), None)
        fname = file_of.get(site if site is not None else pre.rpartition(".")[0], last)
        out_key = saved(name)
        if site is not None:
            t = OutTensor(out_key, Source.AFFINE, name, torch.float32, tuple(p.shape))
        elif pre in final:
            t = OutTensor(out_key, Source.FOLDED, pre, final[pre].dtype, tuple(final[pre].shape))
        elif store.has(pre):  # an untied copy that keeps the value it was tied to
            t = _from_source(out_key, store.key(pre), src.info(store.key(pre)), out_dtype)
        else:
            raise BakeError(f"the baked model has a parameter {name!r} that neither the checkpoint "
                            f"{src.folder} nor the fold provides")
        files[fname].append(t)
        written.add(name)
        emitted.add(out_key)
    return Layout(files={f: ts for f, ts in files.items() if ts}, sharded=src.sharded)


def write_layout(layout: Layout, src: ShardFolder, dst: Path, final: Mapping[str, torch.Tensor],
                 maps: Mapping[str, SiteMap], *, progress: bool | None = False) -> None:
    """Write the files of ``layout`` into ``dst`` (and the index when the source was sharded)."""
    total = layout.total_bytes()
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="write shards", disable=bar_disabled(progress),
              leave=False) as bar:
        for fname, tensors in layout.files.items():
            # a name from the source's index: refused unless it names a file inside dst (bake.store.shards)
            target = dst / plain_name(fname, "shard file name")
            writer = ShardWriter(target, [Entry(t.key, t.dtype, t.shape) for t in tensors])
            try:
                for t in tensors:
                    writer.write(t.key, _data(t, src, final, maps))
                    bar.update(Entry(t.key, t.dtype, t.shape).nbytes)
                    weight_map[t.key] = fname
            except BaseException:
                writer.abort()  # the caller removes the folder; keep the original error
                raise
            writer.close()
    if layout.sharded:
        write_index(dst, weight_map, total)


def _data(t: OutTensor, src: ShardFolder, final: Mapping[str, torch.Tensor], maps: Mapping[str, SiteMap]):
    if t.source is Source.COPY:
        return raw_blocks(src.info(t.src_key))
    if t.source is Source.CONVERT:
        return converted_blocks(src.info(t.src_key), t.dtype)
    if t.source is Source.AFFINE:  # src_key: the committed name, <site>.lineas_scale or <site>.lineas_shift
        site, _, attr = t.src_key.rpartition(".")
        m = maps[site]
        return (m.scale if attr == "lineas_scale" else m.shift).to(torch.float32)
    return final[t.src_key]


def write_baked_folder(baked, dst: Path, final: Mapping[str, torch.Tensor], dtype: torch.dtype, *,
                       progress: bool | None = False) -> Layout:
    """Write ``baked`` (from :func:`bake.api.bake_folder`) into ``dst`` in ``dtype``: the shards, the index,
    ``config.json`` (with the dtype written) and, for affine modules, ``modeling_lineas.py``.
    ``final``: the folded tensors in ``dtype`` (:func:`bake.fold.execute.compute_folded`)."""
    from bake.fold.remote_code import write_remote_code

    src = baked.source
    layout = output_layout(baked.model, src.store, final, dtype)
    write_layout(layout, src.store.folder, dst, final, baked.effective, progress=progress)
    config = baked.model.config
    config.save_pretrained(dst)
    set_config_dtype(dst, str(dtype).removeprefix("torch."))
    write_remote_code(baked.model, dst)
    return layout


def set_config_dtype(folder: Path, dtype: str) -> None:
    """Record in ``config.json`` the dtype the weights were written in, and the fields transformers 4.x
    reads where 5.x writes others (:mod:`lineas.config_compat`), so a 4.x process (the ONNX exporter's
    environment) reads an export written under 5.x as it is."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
    for k in keys:
        cfg[k] = dtype
    cfg.update(legacy_rope_fields(cfg))
    atomic_write_text(path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")


ONNX_MEMORY_COPIES = 3.0  # the fp32 model, the traced graph's initializers, the ORT session that checks it


@contextmanager
def materialised(baked, *, step: str):
    """The baked model in memory, for a ``step`` that needs the whole graph (ONNX export): ``baked.model``
    for an in-memory bake; for :func:`bake.api.bake_folder`, the source loaded in float32 and folded
    with the same plan, after checking that it fits the available RAM."""
    if baked.source is None:
        yield baked.model
        return
    from bake.fold.execute import apply_plan
    from bake.store.checkpoint import check_whole_model_fits, load_config
    from lineas.models import auto_model_class

    check_whole_model_fits(baked.model, step=step, copies=ONNX_MEMORY_COPIES)
    src = baked.source
    folder = src.store.folder.folder
    config = load_config(folder, trust_remote_code=src.trust_remote_code)
    model = auto_model_class(config).from_pretrained(folder, config=config, dtype=torch.float32,
                                                     trust_remote_code=src.trust_remote_code).to(src.device).eval()
    try:
        yield apply_plan(model, baked.plan, baked.effective, allow_rebake=True)
    finally:
        del model
