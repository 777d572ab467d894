"""llama.cpp's own quantiser, run on an f32 GGUF file in a process of its own, and what the file it wrote holds.

No quantiser of ours: ``llama_model_quantize`` with ``llama_model_quantize_default_params()`` and only the file
type (``LLAMA_FTYPE_MOSTLY_Q4_K_M`` ...) and the thread count set, what ``llama-quantize`` runs, in a child
process where torch is never imported (:mod:`bake.formats.gguf_quant_worker`).  A k-quant needs rows that are
multiples of 256 weights; llama.cpp quantises a tensor whose rows are not (SmolLM2's 576) to a fallback type
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0) and logs it: :func:`quantise` counts those lines, and
:func:`tensor_types` reads back the types the file really holds (with the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bake.formats.children import end_child, start_child
from bake.formats.gguf import GGUFExportError
from bake.formats.kinds import FORMATS, GGUF_QUANT_FORMATS
from bake.formats.llamacpp import script_command
from bake.verify.check import bar_disabled
from lineas.threads import pick_threads

if importlib.util.find_spec("gguf") is None:  # the tensor types of the file are read with the gguf package
    raise ImportError("No module named 'gguf' (the k-quant report reads the file's tensor types with it)")

WORKER = Path(__file__).with_name("gguf_quant_worker.py")
FTYPES = {f.value: FORMATS[f].llama_ftype for f in GGUF_QUANT_FORMATS}  # "gguf-q4_k_m" -> "Q4_K_M"
QUANTISER = "llama.cpp's llama_model_quantize (llama_model_quantize_default_params()), via llama-cpp-python"
_FALLBACK = re.compile(r"required for type\s+(\w+)\)\s*->\s*falling back to\s+(\w+)")


def quantise(src: Path, dst: Path, ftype: str, *, progress: bool | None = False) -> dict:
    """``src`` (an f32 GGUF file) quantised by llama.cpp to ``dst`` as ``LLAMA_FTYPE_MOSTLY_<ftype>``, in a child
    process; returns what the report says of it (the fallbacks llama.cpp logged, as ``"q4_K->q5_0": n``)."""
    threads = min(max(1, torch.get_num_threads()), pick_threads(0))  # as bake.formats.llamacpp.load_llamacpp
    with tempfile.TemporaryFile() as err, tqdm(total=1, desc=f"gguf quantise ({ftype.lower()})",
                                               disable=bar_disabled(progress), leave=False) as bar:
        # bound to this process: ended below on any exception (Ctrl-C, SIGTERM), by the kernel on SIGKILL
        proc = start_child(script_command(WORKER, src, dst, ftype, threads), stdout=subprocess.PIPE, stderr=err)
        try:
            out, _ = proc.communicate()
        except BaseException:
            end_child(proc, grace=0)
            raise
        bar.update()
        err.seek(0)
        log = err.read().decode("utf-8", "replace")
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except ValueError:
        reply = {}
    rc = proc.returncode
    if rc != 0 or not reply.get("ok") or not dst.is_file():
        how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
        tail = "\n".join(log.strip().splitlines()[-8:])
        raise GGUFExportError(f"llama.cpp's quantiser failed on {src.name} -> {ftype} ({how}): "
                              f"{reply.get('error', 'no reply')}" + (f"\n{tail}" if tail else ""))
    fallbacks = Counter(f"{a}->{b}" for a, b in _FALLBACK.findall(log))
    return {"quantiser": QUANTISER, "ftype": f"LLAMA_FTYPE_MOSTLY_{ftype}",
            "quantise_seconds": round(float(reply["seconds"]), 2),
            "quantiser_torch_loaded": bool(reply.get("torch_loaded")), "fallbacks": dict(sorted(fallbacks.items()))}


def tensor_types(path: Path) -> dict:
    """What the file holds, read back with the gguf package: per ggml type its tensors, parameters and bytes,
    and the bits per weight of all of them."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    types: dict[str, dict] = {}
    for t in reader.tensors:
        row = types.setdefault(t.tensor_type.name, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
    del reader  # its memory map
    params, size = sum(r["params"] for r in types.values()), sum(r["bytes"] for r in types.values())
    return {"by_type": dict(sorted(types.items())), "bits_per_weight": round(8 * size / params, 3) if params else None}
