"""Write a baked model to disk: one folder, several formats, all-or-nothing.

:func:`export` creates a temporary sibling of ``out_dir``, runs every requested
exporter into it, writes the verification report, the provenance file and the
model card, and only then renames it to ``out_dir``.  If any gating check
fails (or anything raises) the temporary folder is removed: nothing partial is
left on disk.  An optional ``publish`` callable runs on the final folder.

Exporters are registered by name in :data:`EXPORTERS`; ``hf`` is built in.
An exporter is ``fn(baked, out_dir, options) -> ExportResult`` and may add
checks (run against ``baked.reference`` with :func:`bake.verify.check.compare`),
load snippets for the model card, and files.  ONNX plugs in as
``register_exporter("onnx", export_onnx)``.
"""

from __future__ import annotations

import copy
import errno
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from bake.errors import BakeError, ExportWriteError, NonFiniteCastError, VerificationError
from bake.formats.shard_writer import set_config_dtype
from bake.publish.card import ExportInfo, write_card, write_provenance, write_verification
from bake.publish.outdir import (
    OWNER_FILE,
    check_out_dir,
    export_bytes,
    move_into_place,
    sigterm_raises,
    temp_folder,
)
from bake.verify.check import (
    CheckResult,
    bar_disabled,
    compare,
    model_device,
)
from lineas.models import TOKENIZER_FILES

if TYPE_CHECKING:
    from bake.results import BakedModel

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_FILES = ("generation_config.json",)
REMOTE_CODE_PARAM_SUFFIXES = (".lineas_scale", ".lineas_shift")  # kept in fp32, like the hooks compute


class OutputExistsError(BakeError, ValueError):
    """``out_dir`` exists and is not empty, and overwriting was not asked for."""


class UnknownFormatError(BakeError, ValueError):
    """An export format nobody registered."""


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"
    formats: tuple[str, ...] = ("hf",)
    command: str = ""
    progress: bool | None = False
    max_shard_size: str = "5GB"


@dataclass
class ExportResult:
    format: str
    checks: list[CheckResult] = field(default_factory=list)
    load_snippets: list[str] = field(default_factory=list)
    remote_code: bool = False
    has_tokenizer: bool = False
    sites: list = field(default_factory=list)  # per-site divergence of a checked candidate (streamed export)


Exporter = Callable[["BakedModel", Path, ExportOptions], ExportResult]
Publisher = Callable[[Path, "BakedModel", ExportOptions], None]
EXPORTERS: dict[str, Exporter] = {}
# Formats whose module registers itself on import; loaded only when asked for, so their
# optional dependencies (onnx, onnxruntime, optimum) are not needed for an HF export.
OPTIONAL_EXPORTERS = {"onnx": ("bake.formats.onnx", "pip install 'lineas-bake[onnx]'"),
                      **{f: ("bake.formats.gguf", "make setup-gguf (see README: GGUF)")
                         for f in ("gguf", "gguf-f16", "gguf-bf16", "gguf-q8_0")}}
ONNX_TRANSFORMERS_MAX = "4.58"  # optimum-onnx 0.1.0 (the newest) requires transformers < 4.58


def onnx_stack_conflict() -> str | None:
    """Why the ONNX exporter cannot run next to the installed transformers, or None.

    optimum-onnx pins transformers < 4.58; installing the ``onnx`` extra into a transformers 5
    environment would make pip downgrade transformers (and huggingface_hub below 1.0).  So the
    conflict is named here, at use time, and the fix is a separate environment, not that install."""
    from lineas import config_compat

    if config_compat.transformers_major() < 5:
        return None
    return (f"ONNX export needs optimum-onnx 0.1.0, which requires transformers < {ONNX_TRANSFORMERS_MAX}, but this "
            f"environment has transformers {config_compat.transformers_version()}. Installing the onnx extra here would "
            "downgrade transformers and huggingface_hub. Use --format hf in this environment; for ONNX, bake in a "
            "separate one: python -m venv onnx-env && onnx-env/bin/pip install 'lineas-bake[onnx]'")


def register_exporter(name: str, fn: Exporter) -> Exporter:
    EXPORTERS[name] = fn
    return fn


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    if not out:
        raise UnknownFormatError("no export format given")
    for f in out:
        if f == "onnx" and (conflict := onnx_stack_conflict()):  # also when optimum was force-installed
            raise UnknownFormatError(conflict)
        if f not in EXPORTERS and f in OPTIONAL_EXPORTERS:
            module, install = OPTIONAL_EXPORTERS[f]
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise UnknownFormatError(f"export format {f!r} needs extra packages ({e}); {install}") from None
        if f not in EXPORTERS:
            raise UnknownFormatError(f"unknown export format {f!r}; available: {', '.join(known_formats())}")
    return out


def known_formats() -> list[str]:
    return sorted(set(EXPORTERS) | set(OPTIONAL_EXPORTERS))


class ExportOptionError(BakeError, ValueError):
    """A bad export option (dtype)."""


def check_dtype(dtype: str) -> str:
    if dtype not in EXPORT_DTYPES:
        raise ExportOptionError(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    return dtype


# ----------------------------------------------------------------------------- orchestration
def export(baked: BakedModel, out_dir: str | os.PathLike, *, formats: str | Sequence[str] = ("hf",),
           dtype: str = "float32", overwrite: bool = False, command: str = "",
           publish: Publisher | None = None, progress: bool = False) -> Path:
    """Export ``baked`` to ``out_dir`` (atomically). Raises VerificationError when a gating check fails."""
    opts = ExportOptions(dtype=check_dtype(dtype), formats=parse_formats(formats), command=command, progress=progress)
    n_params = sum(p.numel() for p in baked.model.parameters())
    needed = export_bytes(n_params, EXPORT_DTYPES[opts.dtype].itemsize, opts.formats)
    if baked.source is not None and opts.dtype != "float32" and baked.source.verify:
        needed += n_params * 4  # the float32 scratch copy the fold is checked on (bake.formats.hf_stream)
    out = check_out_dir(out_dir, overwrite, needed_bytes=needed)
    with sigterm_raises():
        tmp = temp_folder(out)
        try:
            # hf first: for a streamed bake it records the reference the other formats are checked against
            results = [EXPORTERS[name](baked, tmp, opts) for name in sorted(opts.formats, key=lambda f: f != "hf")]
            report = copy.copy(baked.report)
            report.checks = list(report.checks) + [c for r in results for c in r.checks]
            report.sites = report.sites or next((r.sites for r in results if r.sites), [])
            write_verification(tmp, report)
            if not report.passed:
                err = VerificationError("exported model does not reproduce the hooked model: "
                                        + "; ".join(report.failures))
                err.report = report
                raise err
            info = export_info(baked, report, opts, results, tmp)
            write_provenance(tmp, info)
            write_card(tmp, info, repo=out.name)
            move_into_place(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
                # the free-space check ran before any work, but the disk can still fill (other writers, quota)
                raise ExportWriteError(f"writing the export into {out.parent} failed: {e.strerror}"
                                       f" ({e.filename or tmp}); nothing was written") from e
            raise
    baked.export_report = report
    if publish is not None:
        publish(out, baked, opts)
    return out


def export_info(baked: BakedModel, report, opts: ExportOptions, results: Sequence[ExportResult],
                folder: Path) -> ExportInfo:
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != OWNER_FILE]
    return ExportInfo(
        base_model=baked.base.display, base_path=baked.base.path, base_config_sha256=baked.base.config_sha256,
        maps=[m.describe() for m in baked.maps], plan_summary=baked.plan.summary(), plan_table=baked.plan.to_table(),
        plan=baked.plan.to_dict(), report=report, dtype=opts.dtype, formats=opts.formats,
        command=opts.command or "(Python API) bake(...).save_pretrained(...)",
        remote_code=any(r.remote_code for r in results), has_tokenizer=any(r.has_tokenizer for r in results),
        files=files, extra_load=[s for r in results for s in r.load_snippets], bakes=baked.bakes,
    )


# ----------------------------------------------------------------------------- the HF exporter
def state_dict_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor] | None:
    """The state dict cast to ``dtype`` (None for float32: save as is).

    Tensors that share storage (tied embeddings) stay shared after the cast, so
    transformers still writes them once.  Affine-fallback parameters stay fp32.
    Raises :class:`NonFiniteCastError` naming the tensors that become inf/NaN in ``dtype``.
    """
    if dtype == torch.float32:
        return None
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    bad: dict[str, int] = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point() or k.endswith(REMOTE_CODE_PARAM_SUFFIXES):
            out[k] = v
            continue
        key = (v.data_ptr(), tuple(v.shape), v.stride())
        if key not in cast:
            cast[key] = v.to(dtype)
            n_bad = int((~torch.isfinite(cast[key])).sum())
            if n_bad:
                bad[k] = n_bad
        out[k] = cast[key]
    if bad:
        raise NonFiniteCastError(dtype, bad)
    return out


def _sites_writing(plan, tensors: Sequence[str]) -> list[str]:
    """The plan's sites whose fold steps write any of ``tensors``."""
    return [p.site for p in plan.sites if any(t in step.tensors for step in p.steps for t in tensors)]


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def explained_cast_failure(plan, dtype: str):
    """Re-raise a :class:`NonFiniteCastError` saying which maps (or the base model) overflow ``dtype``."""
    try:
        yield
    except NonFiniteCastError as e:
        sites = _sites_writing(plan, e.tensors)
        where = (f"folded from the map(s) at site(s) {', '.join(sites)}" if sites else
                 "not written by the steering: the base model itself does not fit this dtype")
        raise NonFiniteCastError(e.dtype, e.counts, f" ({where}); nothing was written. Export in float32 or "
                                 "bfloat16, or use a smaller strength") from None


def _cast_state_dict(baked: BakedModel, dtype: str) -> dict[str, torch.Tensor] | None:
    with explained_cast_failure(baked.plan, dtype):
        return state_dict_in(baked.model, EXPORT_DTYPES[dtype])


def _source_file(base_path: str, name: str) -> Path | None:
    """A file of the base checkpoint: from its directory, or from the local Hub cache (never the network)."""
    local = Path(base_path).expanduser()
    if local.is_dir():
        p = local / name
        return p if p.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(base_path, name)
    except ValueError:  # not a valid repo id (HFValidationError): nothing to copy
        return None
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def copy_base_files(baked: BakedModel, folder: Path) -> bool:
    """Copy tokenizer (only when the base has one) and generation config verbatim. Returns True if a
    tokenizer was written."""
    for name in GENERATION_FILES:
        src = _source_file(baked.base.path, name)
        if src is not None:
            shutil.copyfile(src, folder / name)
    if baked.tokenizer is None:
        return False
    copied = 0
    for name in TOKENIZER_FILES:
        src = _source_file(baked.base.path, name)
        if src is not None:
            shutil.copyfile(src, folder / name)
            copied += 1
    if not copied:  # tokenizer came from somewhere we cannot copy from: let it serialise itself
        baked.tokenizer.save_pretrained(folder)
    return True


def has_remote_code(folder: Path) -> bool:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return bool(cfg.get("auto_map"))


def reload_hf(folder: Path, dtype: str, device, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=EXPORT_DTYPES[dtype],
                                                 trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def export_hf(baked: BakedModel, folder: Path, opts: ExportOptions) -> ExportResult:
    if baked.source is not None:  # bake_folder: written shard by shard from the source checkpoint
        from bake.formats.hf_stream import export_hf_streamed

        return export_hf_streamed(baked, folder, opts)
    from bake.fold.remote_code import write_remote_code

    steps = tqdm(total=4, desc="save", disable=bar_disabled(opts.progress), leave=False)
    try:
        steps.set_postfix_str("weights")
        baked.model.save_pretrained(folder, state_dict=_cast_state_dict(baked, opts.dtype),
                                    safe_serialization=True, max_shard_size=opts.max_shard_size)
        set_config_dtype(folder, opts.dtype)
        steps.update()
        steps.set_postfix_str("remote code")
        write_remote_code(baked.model, folder)
        remote = has_remote_code(folder)
        steps.update()
        steps.set_postfix_str("tokenizer")
        tok = copy_base_files(baked, folder)
        steps.update()
        checks = []
        if baked.reference is not None:
            steps.set_postfix_str("reload check")
            # Our own freshly written code: trusting it is what the user will have to do.
            reloaded = reload_hf(folder, opts.dtype, model_device(baked.model), trust_remote_code=remote)
            check, _ = compare(reloaded, baked.reference, f"reload-{opts.dtype}",
                               label=f"exported {opts.dtype}, reloaded", progress=opts.progress)
            checks.append(check)
            del reloaded
        steps.update()
    finally:
        steps.close()
    return ExportResult("hf", checks=checks, remote_code=remote, has_tokenizer=tok)


register_exporter("hf", export_hf)
