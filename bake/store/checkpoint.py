"""A checkpoint folder without loading it: the skeleton to plan on, and bounded-memory loads to run.

* :func:`load_skeleton` builds the model on the ``meta`` device from ``config.json``
  (accelerate's ``init_empty_weights``): every module, parameter name and shape, no storage.
  Planning and ``--dry-run`` need nothing more.
* :func:`load_bounded` loads a folder for running with at most ``max_memory`` bytes of
  weights in memory: the skeleton dispatched by accelerate's big-model inference
  (``dispatch_model``) with a ``device_map`` from :func:`device_map_for` (blocks that fit stay
  resident, the others are offloaded to disk).  Offloaded weights are read from the folder's
  safetensors shards by :class:`ShardTensors` when a block runs (no copy of the checkpoint is
  made), and torch forward hooks (steering, recording) still fire.  On the CPU, offloaded ``nn.Linear``
  weights are not read whole: their products run from the shards a slice of rows at a time
  (:mod:`bake.store.sliced_linear`), and large resident weights are multiplied by slices too.  A model
  that fits is loaded whole, without any accelerate hook.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bake.errors import BakeError
from bake.store.key_names import loaded_names
from bake.store.rawmem import HEAP_SLACK_BYTES, BufferPool, trim_heap
from bake.store.safetensors_header import check_config_against_weights
from bake.store.shards import INDEX_FILE, SINGLE_FILE, ShardFolder, TensorInfo, read_as
from bake.store.sliced_linear import slice_linears
from bake.store.stores import checkpoint_keys
from lineas.errors import ModelLoadError
from lineas.io import human_size
from lineas.models import auto_model_class

log = logging.getLogger(__name__)

RESIDENT_BYTES = 512 << 20  # --max-memory auto: resident blocks beyond the largest one (see default_max_memory)
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "TB": 1000 ** 4,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}


class MemoryBudgetError(BakeError, ValueError):
    """A memory budget that is unreadable, or too small for the step that needs it."""


def parse_memory(text: str) -> int:
    """``"2GiB"``, ``"1500MB"``, ``"3e9"`` -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise MemoryBudgetError(f"--max-memory {text!r}: expected a size such as 2GiB, 1500MB or 3e9 (bytes)")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise MemoryBudgetError(f"--max-memory {text!r} must be positive")
    return n


def safetensors_folder(path: str | os.PathLike) -> Path | None:
    """``path`` when it is a local checkpoint folder whose weights are safetensors, else None."""
    p = Path(path).expanduser()
    if p.is_dir() and (p / "config.json").is_file() and ((p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file()):
        return p
    return None


def load_config(path: str | os.PathLike, *, trust_remote_code: bool = False):
    """``path``'s config through transformers; a :class:`lineas.errors.ModelLoadError` naming the model type
    (or transformers' first line) when transformers cannot build it."""
    from transformers import AutoConfig, __version__

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
        model_type = _declared_model_type(Path(path))
        if model_type is not None and f"{model_type}" in str(e):
            raise ModelLoadError(f"{Path(path) / 'config.json'}: model_type {model_type!r} is not an architecture "
                                 f"transformers {__version__} knows (a newer transformers may; a model that ships "
                                 "its own code needs --trust-remote-code)") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"transformers cannot read the config of {path}: {first}") from None


def _declared_model_type(folder: Path) -> str | None:
    import json

    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return str(data.get("model_type")) if isinstance(data, dict) and "model_type" in data else None


def load_skeleton(path: str | os.PathLike, *, trust_remote_code: bool = False, config=None,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM (or vision-language model: :func:`lineas.models.auto_model_class`) of ``path`` on the
    meta device in ``dtype`` (no weights read, no memory used), tied like the real one."""
    from accelerate import init_empty_weights

    config = config if config is not None else load_config(path, trust_remote_code=trust_remote_code)
    check_config_against_weights(path, config)  # a config claiming 10**6 layers: refused now, not built
    with init_empty_weights():
        model = auto_model_class(config).from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights as two meta tensors
    model.config._name_or_path = str(path)
    return model.eval()


def _units(model: nn.Module, no_split: set[str]) -> list[str]:
    """The blocks a device map places whole: decoder layers (``_no_split_modules``), modules that own
    parameters directly, leaves; in execution order."""
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            own = any(True for _ in child.parameters(recurse=False))
            if type(child).__name__ in no_split or own or not any(True for _ in child.children()):
                out.append(full)
            else:
                walk(full + ".", child)

    walk("", model)
    return out


def device_map_for(skeleton: nn.Module, device: torch.device, max_memory: int, *, keep_resident: bool = True
                   ) -> dict | str:
    """Where each block of ``skeleton`` (in its run dtype) lives while verifying: ``device`` while the
    budget lasts, else "disk" (read from the checkpoint each time the block runs).

    ``max_memory`` covers the resident blocks *and* the largest block being read, as accelerate's
    ``max_memory`` does.  Unlike ``infer_auto_device_map``, a block that does not fit is skipped, not the
    end of the resident part: a 2 GB embedding first in the model must not send every layer to disk.
    Tied blocks (an input embedding shared with the output head) stay resident.  ``keep_resident=False``:
    no other block does either (but one, which accelerate needs), when the budget is not for the whole model."""
    from accelerate.utils import compute_module_sizes, find_tied_parameters

    sizes = compute_module_sizes(skeleton)
    if sizes[""] <= max_memory:
        return str(device)
    # Sizes count a tied weight once (under its first name): a unit holding only a tied copy has size 0
    # but still needs its weight where it runs, hence the grouping of tied units below.
    units = [u for u in _units(skeleton, set(getattr(skeleton, "_no_split_modules", None) or []))
             if any(True for _ in skeleton.get_submodule(u).parameters())]
    groups: list[list[str]] = [[u] for u in units]
    for tied in find_tied_parameters(skeleton):  # e.g. [["lm_head.weight", "model.embed_tokens.weight"]]
        members = [g for g in groups if any(p.startswith(u + ".") for u in g for p in tied)]
        if len(members) > 1:
            merged = [u for g in members for u in g]
            groups = [g for g in groups if g not in members] + [merged]
    where = (device.index or 0) if device.type == "cuda" else "cpu"
    # Tied blocks stay resident: accelerate reads a disk-offloaded weight under each module's own name,
    # and the checkpoint stores a tied weight under one name only.
    tied = [g for g in groups if len(g) > 1]
    free = [g for g in groups if len(g) == 1]
    tied_bytes = sum(sizes.get(u, 0) for g in tied for u in g)
    largest = max((sizes.get(g[0], 0) for g in free), default=0)
    if max_memory < tied_bytes + largest:
        tied_note = f"its tied embeddings ({human_size(tied_bytes)}) stay in memory and " if tied_bytes else ""
        raise MemoryBudgetError(f"--max-memory {human_size(max_memory)} is too small for this model: {tied_note}"
                                f"its largest block ({human_size(largest)}) must fit while it runs; raise it to at "
                                f"least {human_size(tied_bytes + largest)}")
    dmap = {u: where for g in tied for u in g}
    left = max_memory - tied_bytes - largest
    for (u,) in free:
        fits = keep_resident and sizes.get(u, 0) <= left
        left -= sizes.get(u, 0) if fits else 0
        dmap[u] = where if fits else "disk"
    if where not in dmap.values():  # accelerate needs one resident block to know the execution device
        dmap[min((g[0] for g in free), key=lambda u: sizes.get(u, 0))] = where
    # Modules with buffers only (rotary embeddings) stay resident.
    for name, module in skeleton.named_modules():
        covered = any(name == u or name.startswith(u + ".") for u in dmap)
        if name and not covered and any(True for _ in module.buffers(recurse=False)):
            dmap[name] = where
    return dmap


def largest_block_bytes(skeleton: nn.Module) -> int:
    """Bytes of the largest block a device map places whole (in the skeleton's dtype; a tied weight
    is counted once, with the first module that holds it)."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(skeleton)
    units = _units(skeleton, set(getattr(skeleton, "_no_split_modules", None) or []))
    return max((sizes.get(u, 0) for u in units), default=0)


def default_max_memory(skeleton: nn.Module) -> int:
    """``--max-memory auto``: the largest block of the model (it must fit while it runs; tied embeddings
    stay resident) plus :data:`RESIDENT_BYTES` of blocks kept resident; a model that fits runs whole.
    Measured with benchmarks/bake_scale.py: more resident blocks make each verification pass read less,
    but the logits of a 256k vocabulary and the largest block already take most of a 4 GiB budget."""
    return largest_block_bytes(skeleton) + RESIDENT_BYTES


@contextmanager
def load_bounded(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_memory: int | None = None, trust_remote_code: bool = False):
    """Yield the model of ``folder`` in ``dtype``, ready to run with at most ``max_memory`` bytes of
    weights in memory (None: :func:`default_max_memory`).  On exit the model is freed and its memory
    handed back to the OS, provided the caller holds no reference to it any more (``del`` it in the block).

    The skeleton is built on the meta device and dispatched with accelerate's ``dispatch_model``.  Every
    tensor, resident or read as its block runs, comes from :class:`ShardTensors`: read in 4 MB blocks
    straight into ``dtype`` (a 2 GB float32 embedding stored in bfloat16 never sits in memory beside a
    whole bfloat16 copy and the file's mapped pages, as a whole-tensor load through a memory map would
    put it).  On the CPU, the offloaded ``nn.Linear`` weights are the exception: their modules multiply
    straight from the shards, slice by slice (:func:`bake.store.sliced_linear.slice_linears`)."""
    from accelerate import dispatch_model

    folder = Path(folder)
    model = load_skeleton(folder, trust_remote_code=trust_remote_code, dtype=dtype)
    budget = default_max_memory(model) if max_memory is None else max_memory
    tensors = ShardTensors(model, ShardFolder(folder), dtype)
    # A block stored in the run dtype is read as mapped pages (bake.store.rawmem.mapped): as fast as a resident
    # one, so none is kept resident and its memory goes to the passes (their logits) instead.
    dmap = device_map_for(model, torch.device(device), budget, keep_resident=tensors.converts())
    if isinstance(dmap, dict):
        log.info("verification holds at most %s of the %s of weights in memory; the other blocks are read "
                 "from %s each time they run", human_size(budget), human_size(whole_model_bytes(model, dtype)),
                 folder)

        def is_offloaded(name: str) -> bool:
            return dmap[_block_of(name, dmap)] == "disk"

        _materialise(model, tensors, device, offloaded=is_offloaded)
        if torch.device(device).type == "cpu":  # large Linears multiply by slices, offloaded ones from the shards
            slice_linears(model, offloaded=is_offloaded, info_of=tensors.info, dtype=dtype)
        # accelerate warns that offloaded parameters sit on the meta device: that is the point here.
        quiet = logging.getLogger("accelerate.big_modeling")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            # accelerate reads an offloaded weight from ``state_dict`` first: ours reads it from the shards.
            dispatch_model(model, device_map=dmap, state_dict=tensors, offload_index={})
        finally:
            quiet.setLevel(level)
        # The read buffers go once the decoder stack has run, before the output head and its logits.
        model.base_model.register_forward_hook(lambda *_: tensors.pool.release())
        # And the heap stays within its slack block by block (bake.store.rawmem.trim_heap says why).
        for unit in dmap:
            model.get_submodule(unit).register_forward_hook(lambda *_: trim_heap(HEAP_SLACK_BYTES))
    else:
        _materialise(model, tensors, device, offloaded=lambda name: False)
    try:
        yield model.eval()
    finally:
        del model
        release_memory()


class ShardTensors(Mapping):
    """The tensors of ``model`` (parameter and persistent-buffer names) as stored in ``shards``, each read
    when asked for, in ``dtype`` (integer tensors keep theirs); what accelerate's offloaded blocks read
    as they run.  A parameter that the checkpoint does not hold is an error naming it (transformers would
    initialise it randomly)."""

    def __init__(self, model: nn.Module, shards: ShardFolder, dtype: torch.dtype):
        self.shards, self.dtype = shards, dtype
        self.pool = BufferPool()
        loaded = loaded_names(model, shards.keys())  # keys renamed as from_pretrained renames them
        self.keys_of = checkpoint_keys(model, shards, loaded)
        key_of = {name: key for key, name in loaded.items()}
        for name, _ in model.named_buffers():
            if name in key_of:
                self.keys_of[name] = key_of[name]
        missing = [n for n, _ in model.named_parameters() if n not in self.keys_of]
        if missing:
            raise BakeError(f"{shards.folder} has no tensor for {len(missing)} parameter(s) of "
                            f"{type(model).__name__}, e.g. {missing[0]!r}: is this checkpoint for this config.json?")

    def converts(self) -> bool:
        """Whether some floating tensor is stored in another dtype than the run dtype."""
        stored = {self.shards.info(k).dtype for k in set(self.keys_of.values())}
        return any(d.is_floating_point and d != self.dtype for d in stored)

    def __getitem__(self, name: str) -> torch.Tensor:
        """What an offloaded block reads each time it runs: into a buffer of :attr:`pool`, free again once
        accelerate has dropped the block's weights after it ran."""
        return self.read(name, pooled=True)

    def info(self, name: str) -> TensorInfo:
        """Where and how tensor ``name`` is stored."""
        return self.shards.info(self.keys_of[name])

    def read(self, name: str, *, pooled: bool = False) -> torch.Tensor:
        """Tensor ``name`` in the run dtype; ``pooled=False``: memory of its own (a resident weight)."""
        info = self.info(name)
        return read_as(info, self.dtype if info.dtype.is_floating_point else info.dtype,
                       pool=self.pool if pooled else None)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor to answer
        return name in self.keys_of

    def __iter__(self):
        return iter(self.keys_of)

    def __len__(self) -> int:
        return len(self.keys_of)


def _block_of(name: str, dmap: dict) -> str:
    """The device-map entry that places tensor ``name``."""
    while name not in dmap:
        if "." not in name:
            return ""
        name = name.rpartition(".")[0]
    return name


def _materialise(model: nn.Module, tensors: ShardTensors, device: str, *, offloaded) -> None:
    """Give every tensor of ``model`` (on the meta device) its value, except those ``offloaded(name)``
    says stay on disk.  Tied parameters get one tensor, shared again after the load."""
    from accelerate.utils import set_module_tensor_to_device

    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        if all(offloaded(n) for n in names):
            continue
        first = next(n for n in names if n in tensors)
        set_module_tensor_to_device(model, first, device, value=tensors.read(first))
        shared = model.get_parameter(first)
        for n in names:
            if n != first:
                module, _, attr = n.rpartition(".")
                setattr(model.get_submodule(module), attr, shared)
    # Persistent buffers the checkpoint stores (rare, small): accelerate leaves buffers where they are.
    for name, _ in list(model.named_buffers()):
        if name in tensors:
            set_module_tensor_to_device(model, name, device, value=tensors.read(name))


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and the next
    step's memory would add up with the last one's)."""
    gc.collect()
    trim_heap()


def whole_model_bytes(skeleton: nn.Module, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of all weights of ``skeleton`` in ``dtype`` (tied weights once)."""
    item = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in skeleton.parameters()) * item


def available_memory() -> int:
    """Bytes of RAM available now (psutil; /proc/meminfo as a fallback)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of accelerate
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0


def check_whole_model_fits(skeleton: nn.Module, *, step: str, copies: float, dtype: torch.dtype = torch.float32
                           ) -> None:
    """Refuse, before any work, a ``step`` that needs the whole model in memory ``copies`` times when
    this machine's available RAM is below that estimate."""
    need = int(whole_model_bytes(skeleton, dtype) * copies)
    have = available_memory()
    if have and need > have:
        raise MemoryBudgetError(
            f"{step} needs the whole model in memory: about {human_size(need)} ({copies:g} x "
            f"{human_size(whole_model_bytes(skeleton, dtype))} of {str(dtype).removeprefix('torch.')} weights), "
            f"but only {human_size(have)} is available; export the HF format on this machine and run {step} "
            "on a machine with more memory")
