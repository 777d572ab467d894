"""A checkpoint folder without loading it: the skeleton to plan on, and bounded-memory loads to run.

* :func:`load_skeleton` builds the model on the ``meta`` device from ``config.json``
  (accelerate's ``init_empty_weights``): every module, parameter name and shape, no storage.
  Planning and ``--dry-run`` need nothing more.
* :func:`load_bounded` loads a folder for running with at most ``max_memory`` bytes of
  weights resident: transformers + accelerate big-model inference (``device_map`` from
  ``infer_auto_device_map``, the rest offloaded to disk).  Disk-offloaded weights are read
  straight from the folder's safetensors shards when a layer runs (no copy is made), and
  torch forward hooks (steering, recording) still fire.  A model that fits is loaded whole,
  without any accelerate hook.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lineas.io import human_size

from .errors import BakeError
from .shards import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)

DEFAULT_MAX_MEMORY = 2 << 30  # bytes of weights kept resident while verifying (--max-memory)
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
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_skeleton(path: str | os.PathLike, *, trust_remote_code: bool = False, config=None) -> nn.Module:
    """The causal LM of ``path`` on the meta device (no weights read, no memory used), tied like the real one."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = config if config is not None else load_config(path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config under init_empty_weights leaves tied weights as two meta tensors
    model.config._name_or_path = str(path)
    return model.eval()


def _device_map(folder: Path, dtype: torch.dtype, device: torch.device, max_memory: int,
                trust_remote_code: bool) -> dict | str:
    """Where each block lives: ``device`` up to ``max_memory`` bytes, then disk (read when it runs)."""
    from accelerate.utils import compute_module_sizes, infer_auto_device_map

    skeleton = load_skeleton(folder, trust_remote_code=trust_remote_code)
    total = compute_module_sizes(skeleton, dtype=dtype)[""]
    if total <= max_memory:
        return str(device)
    key = device.index if device.type == "cuda" and device.index is not None else (0 if device.type == "cuda"
                                                                                   else "cpu")
    budget = {key: max_memory} if key == "cpu" else {key: max_memory, "cpu": 0}
    dmap = infer_auto_device_map(skeleton, max_memory=budget, dtype=dtype,
                                 no_split_module_classes=getattr(skeleton, "_no_split_modules", None) or [])
    if all(v == "disk" for v in dmap.values()):
        raise MemoryBudgetError(f"--max-memory {human_size(max_memory)} holds no part of the model "
                                f"({human_size(total)} in {str(dtype).removeprefix('torch.')}); raise it")
    log.info("verification runs with %s of %s resident, the rest read from %s as each layer runs",
             human_size(max_memory), human_size(total), folder)
    return dmap


@contextmanager
def load_bounded(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 max_memory: int = DEFAULT_MAX_MEMORY, trust_remote_code: bool = False):
    """Yield the model of ``folder`` in ``dtype``, ready to run with about ``max_memory`` bytes of
    weights resident; the model is released on exit."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    dev = torch.device(device)
    dmap = _device_map(folder, dtype, dev, max_memory, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=dmap,
                                                 trust_remote_code=trust_remote_code)
    try:
        yield model.eval()
    finally:
        del model
        gc.collect()


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
