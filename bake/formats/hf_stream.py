"""The HF exporter of an out-of-core bake (:func:`bake.api.bake_folder`).

The shards are written one by one from the source checkpoint (:mod:`bake.formats.shard_writer`) while the hooked
reference is recorded in a second thread (writing waits on the disk, the reference on the CPU);
then the *written* folder is loaded with bounded memory and compared with the reference.
"""

from __future__ import annotations

import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from bake.fold.execute import compute_folded
from bake.formats.baked import Baked
from bake.formats.base import EXPORT_DTYPES, ExportOptions, ExportResult
from bake.formats.hf import copy_base_files, explained_cast_failure, has_remote_code
from bake.formats.shard_writer import write_baked_folder
from bake.formats.tokenization import export_tokenizer_mismatch
from bake.store.checkpoint import load_bounded, release_memory
from bake.verify.check import CheckResult, Reference, compare, record_reference, site_divergence
from bake.verify.image_probe import compare_image
from bake.verify.tolerances import reload_row

FP32_CHECK_DIR = ".lineas-fp32-check"  # inside the temporary export folder; removed before the rename


def _check_written(baked: Baked, reference: Reference, folder: Path, dtype: str, label: str, opts: ExportOptions,
                   ) -> tuple[CheckResult, list, list[CheckResult]]:
    """Load a written folder with bounded memory and compare it with the hooked reference (row: :func:`reload_row`);
    a float32 folder also on a VLM's image+text probe (:mod:`bake.verify.image_probe`), the third item."""
    src = baked.source
    image = []
    with load_bounded(folder, dtype=EXPORT_DTYPES[dtype], device=src.device, max_memory=src.max_memory,
                      trust_remote_code=has_remote_code(folder)) as model:  # our own freshly written code
        check, acts = compare(model, reference, reload_row(dtype), label=label, progress=opts.progress)
        if reference.image is not None and dtype == "float32":
            floor = reference.noise_floor.max_rel if reference.noise_floor is not None else None
            image.append(compare_image(model, reference.image, floor, label=label))
        del model  # the last reference: load_bounded frees it and hands the memory back
    sites = site_divergence(reference, acts, baked.effective, baked.plan.differs_by_design())
    return check, sites, image


class _Cancelled(Exception):
    """Raised inside the reference thread when the main thread gives up (SIGTERM)."""


class _InBackground:
    """``fn(cancel)`` in a second thread; :meth:`result` joins it and re-raises its error, :meth:`cancel`
    makes it stop at its next module call (``fn`` checks ``cancel`` with :func:`_cancellable`) and joins
    it, so that the process never exits while torch still runs in another thread."""

    def __init__(self, fn):
        self._value, self._error = None, None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn,), name="lineas-reference")
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn(self._cancel)
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        self._cancel.set()
        self._thread.join()


@contextmanager
def _cancellable(model: torch.nn.Module, cancel: threading.Event | None):
    """Forward pre-hooks that raise :class:`_Cancelled` once ``cancel`` is set."""
    if cancel is None:
        yield
        return

    def check(_module, _inputs):
        if cancel.is_set():
            raise _Cancelled

    handles = [m.register_forward_pre_hook(check) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record_streamed_reference(baked: Baked, cancel: threading.Event | None = None):
    """The hooked reference of a streamed bake: the source checkpoint with bounded memory, hooks attached."""
    src = baked.source
    with load_bounded(src.store.folder.folder, device=src.device, max_memory=src.max_memory,
                      trust_remote_code=src.trust_remote_code) as model:
        if cancel is not None and cancel.is_set():
            raise _Cancelled
        with _cancellable(model, cancel):
            reference = record_reference(model, {s: (m.scale, m.shift) for s, m in baked.effective.items()},
                                         tokenizer=baked.tokenizer, n_tokens=src.verify_tokens,
                                         progress=src.progress, source=str(src.store.folder.folder))
        del model  # the last reference: load_bounded frees it and hands the memory back
    return reference


def export_hf_streamed(baked: Baked, folder: Path, opts: ExportOptions) -> ExportResult:
    """The out-of-core HF export: shards written one by one from the source checkpoint while the hooked
    reference is recorded (in a second thread: writing waits on the disk, the reference on the CPU), then
    the written folder itself is what gets verified.  A float32 export is checked with the exact fp32
    rule; another dtype is first written in float32 to a scratch folder and checked exactly there
    (the fold), then written in its dtype and measured (the export precision), as in memory."""
    checks, sites = [], []
    src = baked.source

    def folded(dtype: str):
        out = compute_folded(baked.model, baked.plan, baked.effective, src.store, out_dtype=EXPORT_DTYPES[dtype])
        release_memory()  # the float64 work on the big weights it read (q/k/v rows): freed before the reference loads
        return out

    def base_overflows(name: str) -> bool:  # the source shard still holds the value before the fold
        dtype = EXPORT_DTYPES[opts.dtype]
        return src.store.has(name) and not bool(torch.isfinite(src.store.read(name).to(dtype)).all())

    with explained_cast_failure(baked.plan, opts.dtype, base_overflows):  # an overflow fails now, before any slow step
        final = folded(opts.dtype)
    pending = _InBackground(lambda cancel: record_streamed_reference(baked, cancel)) if (
        src.verify and baked.reference is None) else None

    recorded = None

    def reference():
        nonlocal recorded
        if pending is not None and recorded is None:
            recorded = pending.result()
        return recorded if recorded is not None else baked.reference

    try:
        if opts.dtype != "float32" and src.verify:
            scratch = folder / FP32_CHECK_DIR
            scratch.mkdir()
            try:
                write_baked_folder(baked, scratch, folded("float32"), torch.float32, progress=opts.progress)
                check, sites, image = _check_written(baked, reference(), scratch, "float32",
                                                     "float32 scratch copy, reloaded (the fold)", opts)
                checks += [check, *image]
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            if not all(c.passed for c in checks):  # the fold is wrong: do not spend the time writing the export
                return ExportResult("hf", checks=checks, sites=sites, reference=recorded)
        with explained_cast_failure(baked.plan, opts.dtype, base_overflows):  # the base weights may overflow too
            write_baked_folder(baked, folder, final, EXPORT_DTYPES[opts.dtype], progress=opts.progress)
        reference()
    except BaseException:  # SIGTERM, a write error, bad maps: stop the other thread before leaving
        if pending is not None:
            pending.cancel()
        raise
    remote = has_remote_code(folder)
    tok = copy_base_files(baked, folder)
    if src.verify:
        check, written_sites, image = _check_written(baked, reference(), folder, opts.dtype,
                                                     f"exported {opts.dtype}, reloaded", opts)
        if tok and (fail := export_tokenizer_mismatch(folder, baked.tokenizer)):  # text in: the ids first
            check.failures.append(fail)
        checks += [check, *image]
        sites = sites or written_sites
    return ExportResult("hf", checks=checks, remote_code=remote, has_tokenizer=tok, sites=sites, reference=recorded)
