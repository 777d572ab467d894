"""Write a baked model to disk: one folder, several formats, all-or-nothing.

:func:`export` creates a temporary sibling of ``out_dir``, runs every requested
exporter into it, writes the verification report, the provenance file and the
model card, and only then renames it to ``out_dir``.  If any gating check
fails (or anything raises) the temporary folder is removed: nothing partial is
left on disk.  The provenance file is written last: it records the size and sha256 of every other
file in the folder (:func:`bake.publish.card.seal`), which ``lineas-bake push`` checks.  An optional
``publish`` callable runs on the final folder.

Exporters are registered by name in :data:`bake.formats.base.EXPORTERS` (the interface is
there); ``hf`` is built in, the other built-in formats (:data:`bake.formats.kinds.FORMATS`) register
themselves when their module is imported.  They run in :func:`bake.formats.kinds.export_order` (GGUF
after the HF folder it converts).  The hooked reference every format is checked against is the
bake's own, or for an out-of-core bake the one the streamed HF export records: the orchestrator
adopts it (:func:`adopt_reference`), and records it itself before a format that needs it when no HF
export was asked for.
"""

from __future__ import annotations

import copy
import errno
import importlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from bake.errors import BakeError, ExportWriteError, OutputExistsError, VerificationError  # noqa: F401 (API)
from bake.formats.baked import Baked
from bake.formats.base import (  # noqa: F401 (the exporter interface, re-exported for extensions)
    EXPORT_DTYPES,
    EXPORTERS,
    Exporter,
    ExportOptions,
    ExportResult,
    UnknownFormatError,
    register_exporter,
)
from bake.formats.hf import export_hf_in_memory
from bake.formats.hf_stream import export_hf_streamed, record_streamed_reference
from bake.formats.kinds import FORMATS, Format, check_request, export_bytes, export_order
from bake.formats.serving import ServingRequestError, check_serving, check_serving_request, parse_check_runtimes
from bake.plan.runtimes import onnx_stack_conflict
from bake.publish.card import ExportInfo, write_card, write_provenance, write_verification
from bake.publish.outdir import OWNER_FILE, check_out_dir, move_into_place, sigterm_raises, temp_folder
from bake.verify.check import Reference, VerificationReport
from lineas.models import is_vision_language

Publisher = Callable[[Path, Baked, ExportOptions], None]
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# Built-in formats whose module registers itself on import; loaded only when asked for, so their
# optional dependencies (onnx, onnxruntime, optimum, llama-cpp-python) are not needed for an HF export.
OPTIONAL_EXPORTERS = {f.value: (s.module, s.install) for f, s in FORMATS.items() if f is not Format.HF}


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
def export(baked: Baked, out_dir: str | os.PathLike, *, formats: str | Sequence[str] = ("hf",),
           dtype: str = "float32", overwrite: bool = False, command: str = "",
           publish: Publisher | None = None, progress: bool = False,
           check_runtimes: str | Sequence[str] = ()) -> Path:
    """Export ``baked`` to ``out_dir`` (atomically). Raises VerificationError when a gating check fails.

    ``check_runtimes``: serving runtimes (``"vllm"``, ``"mlx"``) that run the written HF folder, each in its
    own environment, before it is moved into place (:mod:`bake.formats.serving`)."""
    runtimes = tuple(r.value for r in parse_check_runtimes(check_runtimes))
    opts = ExportOptions(dtype=check_dtype(dtype), formats=parse_formats(formats), command=command, progress=progress,
                         check_runtimes=runtimes)
    check_request(opts.formats, opts.dtype)  # e.g. GGUF without the HF export it converts
    pythons = check_serving_request(parse_check_runtimes(runtimes), opts.formats, opts.dtype)  # env missing: now
    if runtimes and baked.tokenizer is None:
        raise ServingRequestError(f"--check-runtime {','.join(runtimes)} sends text prompts, but this bake has "
                                  "no tokenizer")
    n_params = sum(p.numel() for p in baked.model.parameters())
    needed = export_bytes(n_params, EXPORT_DTYPES[opts.dtype].itemsize, opts.formats)
    if baked.source is not None and opts.dtype != "float32" and baked.source.verify:
        needed += n_params * 4  # the float32 scratch copy the fold is checked on (bake.formats.hf_stream)
    out = check_out_dir(out_dir, overwrite, model_dir=baked.base.path or None, needed_bytes=needed)
    with sigterm_raises():
        tmp = temp_folder(out)
        try:
            results = []
            for name in export_order(opts.formats):
                if name != Format.HF and baked.reference is None and baked.source is not None and baked.source.verify:
                    adopt_reference(baked, record_streamed_reference(baked))  # no HF export recorded it
                results.append(EXPORTERS[name](baked, tmp, opts))
                if results[-1].reference is not None:
                    adopt_reference(baked, results[-1].reference)
            if runtimes:  # the written folder, served as users serve it (bake.formats.serving)
                results.append(check_serving(baked, tmp, opts, pythons))
            report = copy.copy(baked.report)
            report.checks = list(report.checks) + [c for r in results for c in r.checks]
            report.sites = report.sites or next((r.sites for r in results if r.sites), [])
            write_verification(tmp, report)
            if not report.passed:
                raise VerificationError("exported model does not reproduce the hooked model: "
                                        + "; ".join(report.failures), report=report)
            info = export_info(baked, report, opts, results, tmp)
            write_card(tmp, info, repo=out.name)
            write_provenance(tmp, info)  # last: it records the sha256 of every other file (card included)
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


def adopt_reference(baked: Baked, reference: Reference) -> None:
    """Make ``reference`` the one every later format is checked against (an out-of-core bake records it
    during its HF export, not when it is baked)."""
    baked.reference = reference
    baked.report = VerificationReport.for_reference(reference)


def export_hf(baked: Baked, folder: Path, opts: ExportOptions) -> ExportResult:
    """The ``hf`` format: written shard by shard from the source checkpoint for :func:`bake.api.bake_folder`,
    with ``save_pretrained`` for a model folded in memory."""
    if baked.source is not None:
        return export_hf_streamed(baked, folder, opts)
    return export_hf_in_memory(baked, folder, opts)


def export_info(baked: Baked, report, opts: ExportOptions, results: Sequence[ExportResult],
                folder: Path) -> ExportInfo:
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != OWNER_FILE]
    return ExportInfo(
        base_model=baked.base.display, base_path=baked.base.path, base_config_sha256=baked.base.config_sha256,
        maps=[m.describe() for m in baked.maps], plan_summary=baked.plan.summary(), plan_table=baked.plan.to_table(),
        plan=baked.plan.to_dict(), report=report, dtype=opts.dtype, formats=opts.formats,
        command=opts.command or "(Python API) bake(...).save_pretrained(...)",
        remote_code=any(r.remote_code for r in results), has_tokenizer=any(r.has_tokenizer for r in results),
        files=files, extra_load=[s for r in results for s in r.load_snippets], bakes=baked.bakes,
        pipeline_tag="image-text-to-text" if is_vision_language(getattr(baked.model, "config", None)) else "",
    )


register_exporter(Format.HF.value, export_hf)
