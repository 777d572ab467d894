"""ONNX export of a baked diffusers pipeline (SD 1.x/2.x, SDXL), checked in ONNX Runtime against the
hooked pipeline.

:func:`export_pipeline_onnx` takes the *written* baked pipeline folder (loadable with plain diffusers)
and a :class:`PipelineReference` recorded on the *hooked* original before the fold, and:

1. loads the folder in float32 and exports it with optimum-onnx's ``onnx_export_from_model`` (the
   text encoders, the UNet, the VAE encoder and decoder, each a ``<component>/model.onnx``, plus the
   configs, scheduler and tokenizers), a folder that ``ORTStableDiffusionPipeline`` /
   ``ORTStableDiffusionXLPipeline`` (or ``ORTDiffusionPipeline``) ``.from_pretrained`` loads;
2. runs ``onnx.checker`` on every graph (by path: a real SDXL UNet needs external data);
3. loads it in ONNX Runtime and compares with the reference: the UNet's noise prediction on the
   reference's fixed inputs (row ``pipeline-onnx-denoiser``, max relative error per sample) and the
   few-step image with the reference's seed (row ``pipeline-onnx-image``, max absolute pixel
   difference in [0, 1]); both rows are in :mod:`bake.verify.tolerances` with their reasons.

On any failure the ONNX folder is removed and :class:`VerificationError` (with ``.report``) or
:class:`OnnxExportError` is raised: nothing is left that was not checked.

The reference is plain data, so a caller that already recorded the hooked pipeline's denoiser output
and image on some inputs builds a :class:`PipelineReference` from them; :func:`record_reference`
records one from a pipeline and steering affines.  SDXL note: optimum's in-memory export fails
("number of output names provided (8) exceeded number of outputs (7)") when the two text encoders
share one config object; a pipeline loaded from a folder has separate configs, which is why the export
starts from the written folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bake.errors import VerificationError
from bake.families.diffusers.verify import Row, changes, failure_details, make_row, max_abs, max_rel, rows_table
from bake.formats.onnx import (
    ONNX_REPORT_FILE,
    OnnxExportError,
    check_graph,
    require_onnx_extra,
)
from bake.verify.guard import require_visible_change
from bake.verify.tolerances import get_tolerance
from lineas.hooks import attach_affine
from lineas.pipelines import (
    denoiser_name,
    load_pipeline,
    pipeline_class_name,
    pipeline_modules,
)

log = logging.getLogger(__name__)

# diffusers pipeline class -> the optimum-onnx class that runs its export (text-to-image).
ORT_CLASSES = {"StableDiffusionPipeline": "ORTStableDiffusionPipeline",
               "StableDiffusionXLPipeline": "ORTStableDiffusionXLPipeline"}
DENOISER_ROW, IMAGE_ROW = "pipeline-onnx-denoiser", "pipeline-onnx-image"
ONNX_CHECK = (DENOISER_ROW, IMAGE_ROW)


@dataclass(frozen=True)
class PipelineReference:
    """The hooked pipeline's outputs on fixed inputs: the denoiser's ``denoiser_inputs`` (its forward
    keywords, e.g. ``sample, timestep, encoder_hidden_states[, added_cond_kwargs]``) give ``denoiser``;
    ``pipeline(**call_kwargs, generator=Generator().manual_seed(seed))`` gives ``image`` (``output_type="np"``)."""

    denoiser_inputs: Mapping
    denoiser: torch.Tensor
    call_kwargs: Mapping
    seed: int
    image: torch.Tensor


def _call(pipe, ref: PipelineReference) -> torch.Tensor:
    kwargs = {k: v for k, v in ref.call_kwargs.items() if k != "generator"}
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(ref.seed)).images
    return torch.as_tensor(out).float()


def _denoise(denoiser, inputs: Mapping) -> torch.Tensor:
    return torch.as_tensor(denoiser(**inputs, return_dict=False)[0]).detach().float().cpu()


def _row_inputs(inputs: Mapping, i: int) -> dict:
    """Sample ``i`` of a batch of denoiser inputs, with its own timestep as a 0-D tensor."""
    def take(v):
        if isinstance(v, Mapping):
            return {k: take(x) for k, x in v.items()}
        return v[i:i + 1].cpu() if isinstance(v, torch.Tensor) and v.dim() > 0 else v  # ORT runs on CPU
    out = {k: take(v) for k, v in inputs.items() if k != "timestep"}
    t = torch.as_tensor(inputs["timestep"])
    out["timestep"] = (t[i] if t.dim() > 0 else t).cpu()
    return out


def _denoise_ort(unet, inputs: Mapping) -> torch.Tensor:
    """The ONNX UNet one sample at a time: optimum exports its timestep as one scalar for the whole
    batch (as the pipelines call it), while a probe may give each sample its own timestep."""
    batch = int(inputs["sample"].shape[0])
    return torch.cat([_denoise(unet, _row_inputs(inputs, i)) for i in range(batch)])


def record_reference(pipe, affines=None, *, denoiser_inputs: Mapping, call_kwargs: Mapping,
                     seed: int = 0) -> PipelineReference:
    """The pipeline's outputs with ``affines`` (site -> (scale, shift)) hooked (none: the base pipeline)."""
    handle = attach_affine(pipeline_modules(pipe), affines) if affines else None
    try:
        with torch.no_grad():
            den = _denoise(pipe.components[denoiser_name(pipe)], denoiser_inputs)
            image = _call(pipe, PipelineReference(denoiser_inputs, den, call_kwargs, seed, torch.empty(0)))
    finally:
        if handle is not None:
            handle.remove()
    return PipelineReference(denoiser_inputs=denoiser_inputs, denoiser=den, call_kwargs=call_kwargs, seed=seed,
                             image=image)


@dataclass(frozen=True)
class OnnxPipelineReport:
    folder: str
    pipeline_class: str
    ort_class: str
    provider: str
    files: tuple[str, ...]
    export_seconds: float
    rows: tuple[Row, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    def failures(self) -> list[str]:
        return [f"ONNX {r.check}: " + (r.note or f"{r.metric} {r.value:.3g} exceeds {r.limit:g} ({r.tolerance})")
                for r in self.rows if not r.passed]

    def to_table(self) -> str:
        return rows_table(self.rows, "ORT vs hooked")

    def failure_details(self) -> str:  # bake.verify.report.Report: what the CLI prints on failure
        return failure_details(f"ONNX ({self.ort_class}, {self.provider}):\n" + self.to_table())

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed,
                "tolerances": {n: get_tolerance(n).to_dict() for n in (DENOISER_ROW, IMAGE_ROW)}}


def compare_ort(ort_pipe, hooked: PipelineReference, base: PipelineReference | None = None) -> tuple[Row, ...]:
    """The ONNX Runtime pipeline's UNet and image against the hooked reference (and ``base``, when given:
    hooked vs base is shown beside each row)."""
    den_tol, img_tol = get_tolerance(DENOISER_ROW), get_tolerance(IMAGE_ROW)
    with torch.no_grad():
        den = _denoise_ort(ort_pipe.unet, hooked.denoiser_inputs)  # ORT_CLASSES are UNet pipelines
        image = _call(ort_pipe, hooked)
    return (make_row("denoiser", DENOISER_ROW, "max_rel", max_rel(hooked.denoiser, den), den_tol.max_rel,
                 None if base is None else max_rel(hooked.denoiser, base.denoiser)),
            make_row("image", IMAGE_ROW, "max_abs", max_abs(hooked.image, image), img_tol.max_abs,
                 None if base is None else max_abs(hooked.image, base.image)))


def check_onnx_supported(pipeline_class: str) -> str:
    """The optimum-onnx class name for ``pipeline_class`` (a bake calls this before any work); an
    :class:`OnnxExportError` naming the class, or the missing extra, otherwise."""
    require_onnx_extra()
    if pipeline_class not in ORT_CLASSES:
        raise OnnxExportError(f"ONNX export of pipelines supports {', '.join(ORT_CLASSES)}, not {pipeline_class}")
    return ORT_CLASSES[pipeline_class]


def export_pipeline_onnx(folder, out_dir, hooked: PipelineReference, *, base: PipelineReference | None = None,
                         opset: int | None = None, provider: str = "CPUExecutionProvider") -> OnnxPipelineReport:
    """Export the baked pipeline ``folder`` to ``out_dir`` and check it in ONNX Runtime against ``hooked``
    (see the module docstring).  ``out_dir`` must not exist; it is removed again on any failure."""
    folder, out_dir = Path(folder), Path(out_dir)
    pipeline_class = pipeline_class_name(folder)
    try:
        check_onnx_supported(pipeline_class)
    except OnnxExportError as e:
        raise OnnxExportError(f"{folder}: {e}") from None
    if out_dir.exists():
        raise OnnxExportError(f"{out_dir} already exists; the ONNX export writes a fresh folder")
    if base is not None:  # the shared guard: the maps must move some probe by more than this check's limit
        require_visible_change(changes(base, hooked, *ONNX_CHECK), "/".join(ONNX_CHECK))
    try:
        files, seconds = _export(folder, out_dir, opset)
        import optimum.onnxruntime as ort_mod

        ort_class = getattr(ort_mod, ORT_CLASSES[pipeline_class])
        ort_pipe = ort_class.from_pretrained(str(out_dir), provider=provider)
        ort_pipe.set_progress_bar_config(disable=True)
        rows = compare_ort(ort_pipe, hooked, base)
        del ort_pipe
        report = OnnxPipelineReport(folder=str(out_dir), pipeline_class=pipeline_class, ort_class=ort_class.__name__,
                                    provider=provider, files=files, export_seconds=seconds, rows=rows)
        if not report.passed:
            raise VerificationError("; ".join(report.failures()), report=report)
        (out_dir / ONNX_REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, default=str))
        return report
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _export(folder: Path, out_dir: Path, opset: int | None) -> tuple[tuple[str, ...], float]:
    from optimum.exporters.onnx import onnx_export_from_model

    pipe = load_pipeline(folder)  # float32, plain diffusers: exactly what the folder holds
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python bools in diffusers blocks: expected
        try:
            onnx_export_from_model(pipe, out_dir, opset=opset, do_validation=False)
        except (KeyError, ValueError) as e:
            raise OnnxExportError(f"optimum-onnx cannot export the {type(pipe).__name__} in {folder}: {e}") from e
    seconds = time.perf_counter() - t0
    graphs = sorted(out_dir.glob("*/model.onnx"))
    if not any(g.parent.name == denoiser_name(pipe) for g in graphs):
        raise OnnxExportError(f"optimum-onnx wrote no {denoiser_name(pipe)}/model.onnx into {out_dir}")
    for g in graphs:
        check_graph(g)
    files = tuple(sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()))
    log.info("exported %d ONNX graphs in %.1f s", len(graphs), seconds)
    return files, seconds
