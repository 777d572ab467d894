"""ONNX export of a baked model, checked in ONNX Runtime against the hooked fp32 model.

``--format onnx`` writes ``<out>/onnx/``: a self-contained folder that
``optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(<out>, subfolder="onnx")``
runs, with the config, generation config, tokenizer (when the base has one),
its own model card, verification report and provenance.

Steps (:func:`export_onnx`, registered as the ``onnx`` exporter):

1. Export the *in-memory baked model* with Optimum's exporter
   (``onnx_export_from_model``, task ``text-generation-with-past``: the
   generation-ready graph with past key/values, one merged decoder).  Affine
   fallback modules are plain torch ops, so they trace into the graph and the
   ONNX model needs no custom code.
2. ``onnx.checker.check_model`` on the *path* (works for >2 GB models with
   external data).
3. Load it with ``ORTModelForCausalLM`` (CPUExecutionProvider, or
   CUDAExecutionProvider when onnxruntime-gpu and a GPU are present) and compare
   with the hooked reference recorded before the fold: logits on every probe and
   greedy tokens (full recompute), then greedy decoding *through the KV cache*,
   which must give the same tokens (:mod:`bake.formats.onnx_runtime`).
   Thresholds: the ``onnx-*`` rows of :mod:`bake.verify.tolerances`.

External data: protobuf caps a single ONNX file at 2 GiB.  Models whose
parameters exceed :data:`EXTERNAL_DATA_THRESHOLD` bytes are written in the
external-data format (``model.onnx`` + ``model.onnx_data``) by setting
Optimum's ``FORCE_ONNX_EXTERNAL_DATA`` for the export.  The threshold is a
parameter, so tests exercise that path with a tiny model (threshold 0).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bake.errors import BakeError
from bake.formats.baked import Baked
from bake.formats.base import ExportOptions, ExportResult, register_exporter
from bake.formats.export import export_info
from bake.formats.hf import copy_base_files
from bake.formats.onnx_runtime import check_ort, load_ort, load_ort_with_fix, pick_provider
from bake.formats.shard_writer import materialised
from bake.plan.runtimes import onnx_stack_conflict
from bake.publish.card import write_json, write_provenance, write_verification
from bake.verify.check import bar_disabled

log = logging.getLogger(__name__)

# Fail at import when the extra is missing, so ``--format onnx`` is refused before the slow part
# (bake.formats.export.parse_formats turns this ImportError into "pip install 'lineas-bake[onnx]'").
for _dep in ("onnx", "onnxruntime", "optimum"):
    if importlib.util.find_spec(_dep) is None:
        raise ImportError(f"No module named {_dep!r} (ONNX export needs optimum-onnx, onnx and onnxruntime)")

ONNX_SUBDIR = "onnx"
ONNX_FILE = "model.onnx"
TASK = "text-generation-with-past"
# Protobuf's hard limit is 2 GiB for the whole file (weights + graph); keep headroom for the graph
# and for constants the exporter may duplicate.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 1024 ** 3)
ONNX_REPORT_FILE = "lineas_onnx_export.json"


class OnnxExportError(BakeError):
    """The model cannot be exported to ONNX (missing extra, unsupported model, checker failure)."""


# ----------------------------------------------------------------------------- dependencies
def require_onnx_extra() -> None:
    """Fail early, with the fix, when the ``onnx`` extra is not installed or cannot run here."""
    conflict = onnx_stack_conflict()
    if conflict:
        raise OnnxExportError(conflict)
    missing = []
    for mod in ("onnx", "onnxruntime", "optimum.exporters.onnx", "optimum.onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise OnnxExportError(f"ONNX export needs {', '.join(missing)}: pip install 'lineas-bake[onnx]' "
                              "(optimum-onnx, onnx, onnxruntime)")


# ----------------------------------------------------------------------------- export
def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique parameters and buffers (tied weights counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass(frozen=True)
class OnnxArtifact:
    folder: Path
    onnx_path: Path
    external_data: bool
    files: tuple[str, ...]
    export_seconds: float
    opset: int | None


def export_graph(model: torch.nn.Module, folder: Path, *, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
                 opset: int | None = None) -> OnnxArtifact:
    """Export ``model`` (a transformers causal LM, possibly with affine modules) into ``folder``.

    The model is exported as it is in memory: fp32, on its device, in eval mode.
    """
    require_onnx_extra()
    import warnings

    from optimum.exporters.onnx import onnx_export_from_model

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        raise OnnxExportError(f"{type(model).__name__} is not a decoder-only causal LM; ONNX export supports "
                              "causal LMs (text-generation-with-past)")
    folder.mkdir(parents=True, exist_ok=True)
    external = parameter_bytes(model) >= external_data_threshold
    t0 = time.perf_counter()
    # Optimum reads FORCE_ONNX_EXTERNAL_DATA at call time; torch also switches on its own past 2 GiB.
    with _env("FORCE_ONNX_EXTERNAL_DATA", "1" if external else None), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python bools in the cache code: expected
        try:
            onnx_export_from_model(model, folder, task=TASK, opset=opset, do_validation=False,
                                   device=str(next(model.parameters()).device))
        except (KeyError, ValueError) as e:
            raise OnnxExportError(f"Optimum cannot export {type(model).__name__} "
                                  f"(model_type {getattr(model.config, 'model_type', '?')!r}) to ONNX: {e}") from e
    seconds = time.perf_counter() - t0
    onnx_path = folder / ONNX_FILE
    if not onnx_path.is_file():
        raise OnnxExportError(f"Optimum wrote no {ONNX_FILE} into {folder} (got: {sorted(os.listdir(folder))})")
    files = tuple(sorted(p.name for p in folder.iterdir()))
    uses_external = any(n.startswith(ONNX_FILE + "_data") or n.endswith(".data") for n in files) or external
    return OnnxArtifact(folder, onnx_path, uses_external, files, seconds, opset)


def check_graph(onnx_path: Path) -> None:
    """``onnx.checker`` on the path (the in-memory form cannot hold >2 GiB models)."""
    import onnx

    try:
        onnx.checker.check_model(str(onnx_path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise OnnxExportError(f"onnx.checker rejected {onnx_path}: {e}") from e


# ----------------------------------------------------------------------------- opening an export
def load_onnx(path: str | os.PathLike, *, provider: str | None = None):
    """An ONNX export of ``lineas-bake`` in ONNX Runtime, ready for ``generate``: ``bake.load_onnx(path)``.

    ``path``: the export folder (its ``onnx/`` subfolder is loaded) or that subfolder itself.
    ``provider``: an ONNX Runtime execution provider (default: CUDA when available, else CPU).
    Unlike a bare ``ORTModelForCausalLM.from_pretrained``, the empty KV cache is sized from the
    graph, so Gemma-2 (which optimum-onnx 0.1.0 sizes wrongly, see :func:`bake.formats.onnx_runtime.load_ort`)
    generates.
    """
    require_onnx_extra()
    folder = Path(path)
    if not (folder / ONNX_FILE).is_file() and (folder / ONNX_SUBDIR / ONNX_FILE).is_file():
        folder = folder / ONNX_SUBDIR
    if not (folder / ONNX_FILE).is_file():
        raise OnnxExportError(f"{str(path)!r} holds no {ONNX_FILE} (nor {ONNX_SUBDIR}/{ONNX_FILE}): "
                              "not an ONNX export of lineas-bake")
    return load_ort(folder, provider or pick_provider())


# ----------------------------------------------------------------------------- the exporter
def _onnx_card(baked: Baked, report, art: OnnxArtifact, provider: str, fix: dict | None = None) -> str:
    strengths = ", ".join(f"{m.strength:g}" for m in baked.maps)
    external = (f" The weights are in the external-data file `{ONNX_FILE}_data`, which must stay next to "
                f"`{ONNX_FILE}`." if art.external_data else "")
    return f"""---
base_model: {json.dumps(baked.base.display)}
library_name: onnx
tags:
- onnx
- activation-steering
- lineas
- steered
---

# {baked.base.display} — steered with lineas-bake (ONNX)

The baked model (steering maps folded into the weights at strength λ = {strengths}; any affine fallback
modules are ordinary graph ops) exported with Optimum to ONNX as a generation-ready decoder with past
key/values.{external} The parent folder's `README.md` describes the maps and the fold plan.

## Verification

`onnx.checker` passed. In ONNX Runtime ({provider}), logits on every probe and greedy generation of
{report.n_tokens} new tokens (by full recompute and through the KV cache) were compared with the original
float32 model plus steering hooks:

```
{report.to_table()}
```

Details: `lineas_verification.json`.

## How to run

{_run_snippet(fix, "path/to/this/folder")}
{_cache_note(fix)}"""


def _run_snippet(fix: dict | None, folder: str, subfolder: str = "") -> str:
    """How to load the graph: plain Optimum, or ``bake.load_onnx`` where Optimum sizes the KV cache wrongly."""
    if fix is None:
        sub = f', subfolder="{subfolder}"' if subfolder else ""
        return ("```python\nfrom optimum.onnxruntime import ORTModelForCausalLM\n\n"
                f'model = ORTModelForCausalLM.from_pretrained("{folder}"{sub})\n```')
    return ("```python\nfrom bake import load_onnx   # pip install 'lineas-bake[onnx]'\n\n"
            f'model = load_onnx("{folder}")   # ORTModelForCausalLM, KV cache sized from the graph\n```')


def _cache_note(fix: dict | None) -> str:
    if fix is None:
        return ""
    (h0, d0), (h1, d1) = fix["optimum"], fix["graph"]
    return (f"""
Why `load_onnx`: the optimum-onnx version used here sizes this architecture's empty KV cache as {h0} heads x
{d0}, but the graph's cache inputs are {h1} heads x {d1}, so a bare `ORTModelForCausalLM.from_pretrained`
fails to generate ("invalid dimensions for input past_key_values"). `load_onnx` takes the sizes from the
graph (the verification above did the same). Without lineas-bake, set them after loading:

```python
model.num_key_value_heads, model.embed_size_per_head = {h1}, {d1}
```
""")


def export_onnx(baked: Baked, folder: Path, opts: ExportOptions, *,
                external_data_threshold: int | None = None, provider: str | None = None) -> ExportResult:
    """The ``onnx`` exporter: writes ``folder/onnx`` and returns its gating check."""
    from tqdm.auto import tqdm

    require_onnx_extra()
    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    out = Path(folder) / ONNX_SUBDIR
    if opts.dtype != "float32":
        log.warning("--dtype %s applies to the HF weights; the ONNX graph is exported and verified in float32",
                    opts.dtype)
    steps = tqdm(total=3, desc="onnx", disable=bar_disabled(opts.progress), leave=False)
    try:
        steps.set_postfix_str("export")
        with materialised(baked, step="the ONNX export") as model:
            art = export_graph(model, out, external_data_threshold=threshold)
        steps.update()
        steps.set_postfix_str("checker")
        check_graph(art.onnx_path)
        steps.update()
        tok = copy_base_files(baked, out)
        checks, cached, fix, provider_used = [], [], None, provider or pick_provider()
        if baked.reference is not None:
            steps.set_postfix_str(f"ORT vs hooked ({provider_used})")
            check, cached, fix = check_ort(out, baked.reference, provider=provider_used, progress=opts.progress)
            checks.append(check)
        else:  # not verified: still find out whether the card must point to load_onnx
            fix = load_ort_with_fix(out, provider_used)[1]
        steps.update()
    finally:
        steps.close()
    # The folder's own report: the in-memory bake check plus the ONNX check (the HF reload check is
    # about the other format and lives in the parent folder's report).
    report = copy.copy(baked.report)
    report.checks = list(report.checks) + checks
    write_verification(out, report)
    write_json(out / ONNX_REPORT_FILE, {
        "task": TASK, "provider": provider_used, "external_data": art.external_data,
        "external_data_threshold_bytes": threshold, "parameter_bytes": parameter_bytes(baked.model),
        "export_seconds": round(art.export_seconds, 3), "checker": "onnx.checker.check_model(path, full_check=True)",
        "kv_cache_greedy": cached, "ort_cache_shape_fix": fix,
    })
    snippet = ("ONNX (generation-ready, with past key/values) is in the `onnx/` subfolder:\n\n"
               + _run_snippet(fix, "path/to/this/folder", ONNX_SUBDIR))
    result = ExportResult("onnx", checks=checks, has_tokenizer=tok, load_snippets=[snippet])
    info = export_info(baked, report, opts, [result], out)
    (out / "README.md").write_text(_onnx_card(baked, report, art, provider_used, fix), encoding="utf-8")
    write_provenance(out, info)  # last: it records the sha256 of every other file in onnx/ (card included)
    if not report.passed:  # export() also refuses, but say which format failed
        log.error("ONNX verification failed: %s", "; ".join(report.failures))
    log.info("ONNX export: %.2fs, external data: %s, files: %s", art.export_seconds, art.external_data,
             ", ".join(art.files))
    return result


register_exporter("onnx", export_onnx)

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "ONNX_SUBDIR",
    "OnnxExportError",
    "check_graph",
    "export_graph",
    "export_onnx",
    "load_onnx",
    "parameter_bytes",
    "require_onnx_extra",
]
