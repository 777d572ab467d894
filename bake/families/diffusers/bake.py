"""Bake steering maps into a diffusers pipeline folder: plan, fold, write, verify, card.

The data path is the shared one (:mod:`bake.families.base`): the pipeline's components form one module tree
(:class:`lineas.pipelines.PipelineModules`), :func:`bake.plan.diffusers.plan_pipeline` makes a
:class:`FoldPlan`, the shared executor :func:`bake.fold.execute.apply_plan` carries it out (float64 fold,
one cast), and the output is written into a temporary folder next to ``--out`` that is renamed into
place only after verification passed (:mod:`bake.publish.outdir`); on any failure nothing is left.

The written folder is the base pipeline folder with the rewritten components re-saved by their own
``save_pretrained`` (every old weight file of such a component, variants included, is removed first, so
no stale unsteered copy can be loaded with ``variant=``); every other file is copied byte for byte.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from bake.core.plan_types import FoldPlan
from bake.errors import BakeError, FoldError, VerificationError
from bake.families.diffusers.card import PipelineExportInfo, write_files
from bake.families.diffusers.family import DIFFUSERS_PIPELINE, TORCH_CHECK
from bake.families.diffusers.verify import PipelineReport, compare, record
from bake.fold.execute import check_applicable, commit_plan, compute_folded
from bake.plan.diffusers import plan_pipeline
from bake.plan.history import ModelMismatchError, check_rebake, earlier_bakes
from bake.plan.inputs import combined, normalise_maps
from bake.publish.outdir import check_out_dir, move_into_place, sigterm_raises, temp_folder
from bake.store.shards import Entry, ShardWriter, file_tensors, raw_blocks
from bake.store.stores import ModuleStore
from lineas.models import check_device, local_checkpoint
from lineas.pipelines import (
    PIPELINE_CLASS_KEY,
    denoiser_name,
    is_pipeline_folder,
    load_pipeline,
    pipeline_modules,
    split_site,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".gguf")


@dataclass(frozen=True)
class PipelineBake:
    folder: Path
    plan: FoldPlan
    report: PipelineReport
    components_baked: tuple[str, ...]
    components_copied: tuple[str, ...]
    onnx_report: object | None = None  # bake.families.diffusers.onnx.OnnxPipelineReport with --format hf,onnx


def _folder(model, *, trust_remote_code: bool = False) -> Path:
    """The pipeline folder ``model`` names: a local one, or a Hub id's, fetched into the Hugging Face cache."""
    path = Path(model).expanduser()
    if not path.exists():
        path = Path(local_checkpoint(str(model), trust_remote_code=trust_remote_code))
    if not is_pipeline_folder(path):
        raise BakeError(f"{model}: not a diffusers pipeline folder (no model_index.json)")
    return path


def _check_maps_pipeline(sources, pipeline_class: str, ignore: bool) -> None:
    """Maps learned on another pipeline class are refused unless ``ignore`` (then a warning)."""
    for s in sources:
        learned = s.maps.metadata.get(PIPELINE_CLASS_KEY)
        if learned and learned != pipeline_class:
            msg = f"maps {s.origin} were learned on a {learned}, this pipeline is a {pipeline_class}"
            if not ignore:
                raise ModelMismatchError(msg + " (pass --ignore-model-mismatch to bake them anyway)")
            log.warning("%s", msg)


def _earlier_bakes(folder: Path, sources, digest: str, allow: bool) -> list[dict]:
    """The bakes recorded in ``folder``'s provenance file, after the re-bake rule both families share
    (:func:`bake.plan.history.check_rebake`: the same maps file, at any strength, or the same effective maps)."""
    earlier = earlier_bakes(None, str(folder))
    check_rebake(earlier, sources, digest, allow=allow)
    return [e.entry for e in earlier]


def _export_bytes(folder: Path, components: set[str], *, onnx: bool = False) -> int:
    """About the bytes the export of ``folder`` writes, read from the safetensors headers before any
    work: every file as it is, but the 16-bit floating tensors of ``components`` (those the maps steer)
    counted in float32, the dtype a rewritten component is written in (:func:`_rewrite_component`).
    ``onnx`` (``--format hf,onnx``): plus the ONNX graphs beside it, which hold every component's floating
    weights once more, in float32 (:mod:`bake.families.diffusers.onnx` exports from the float32 pipeline)."""
    total = 0
    for f in folder.rglob("*"):
        if not f.is_file():
            continue
        total += f.stat().st_size
        steered = f.relative_to(folder).parts[0] in components
        if f.suffix == ".safetensors" and (steered or onnx):
            try:
                infos, _ = file_tensors(f)
            except (OSError, ValueError):  # unreadable here: the load names it
                continue
            floats = [i for i in infos.values() if i.dtype.is_floating_point]
            if steered:
                total += sum(i.nbytes * (4 // i.dtype.itemsize - 1) for i in floats if i.dtype.itemsize < 4)
            if onnx:
                total += sum(i.nbytes // i.dtype.itemsize * 4 for i in floats)
    return total


def plan_pipeline_bake(model, maps, strength: float = 1.0, *, trust_remote_code: bool = False,
                       ignore_model_mismatch: bool = False) -> FoldPlan:
    """The fold plan only (``--dry-run``), after the bake's own checks; nothing is written.  The plan may
    hold affine sites, which :func:`bake_pipeline` refuses (``plan.affine_sites``)."""
    folder = _folder(model, trust_remote_code=trust_remote_code)
    sources = normalise_maps(maps, strength)
    pipe = load_pipeline(folder, trust_remote_code=trust_remote_code)
    _check_maps_pipeline(sources, type(pipe).__name__, ignore_model_mismatch)
    return plan_pipeline(pipeline_modules(pipe), combined(sources))


def _rewrite_component(folder: Path, new: dict[str, torch.Tensor]) -> bool:
    """Rewrite the safetensors files of one component folder in place, replacing the tensors in ``new``
    (keys relative to the component) and copying every other tensor's bytes (:class:`ShardWriter`,
    same file names, order and metadata).  False, with nothing changed, when the folder's default
    (non-variant) safetensors files do not hold every key of ``new``, or hold one of them in a dtype other
    than float32: the export is float32, and a fold rounded to bf16/fp16 is not what the hooked pipeline
    computes (8e-5 relative on the tiny FLUX transformer stored in bf16, over the 1e-5 row), so the caller
    re-saves the whole component in float32."""
    files = [f for f in sorted(folder.glob("*.safetensors")) if _is_default_safetensors(f.name)]
    tensors = {f: file_tensors(f) for f in files}
    stored = {k: i.dtype for infos, _ in tensors.values() for k, i in infos.items()}
    if not set(new) <= set(stored):
        return False
    narrow = sorted({str(stored[k]).removeprefix("torch.") for k in new if stored[k] != torch.float32})
    if narrow:
        log.warning("%s stores folded tensors in %s: the component is written in float32 (the export's dtype)",
                    folder.name, ", ".join(narrow))
        return False
    for f, (infos, meta) in tensors.items():
        tmp = f.with_name(f.name + ".lineas-tmp")
        writer = ShardWriter(tmp, [Entry(k, i.dtype, i.shape) for k, i in infos.items()], metadata=meta or None)
        try:
            for k, info in infos.items():
                writer.write(k, new[k].to(info.dtype) if k in new else raw_blocks(info))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        os.replace(tmp, f)
    return True


def write_pipeline(dst: Path, src: Path, pipe, final: dict[str, torch.Tensor]) -> tuple[str, ...]:
    """``src`` copied into ``dst`` byte for byte, then each component with a folded tensor in ``final``
    (keys ``<component>.<parameter>``) rewritten: in its own safetensors files when they hold every
    folded key, else re-saved with its ``save_pretrained``.  Weight files of a rewritten component that
    were not rewritten (variants such as ``*.fp16.safetensors``, ``.bin`` copies) are removed: they
    would load unsteered.  Returns the removed files (relative paths)."""
    # dotfiles (.gitattributes, .cache/ of a Hub download, .git) are not part of the pipeline: not copied,
    # so the export holds only what the bake vouches for (lineas-bake push refuses dotfiles)
    shutil.copytree(src, dst, dirs_exist_ok=True, copy_function=shutil.copyfile, ignore=shutil.ignore_patterns(".*"))
    by_component: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in final.items():
        component, key = split_site(name)
        by_component.setdefault(component, {})[key] = value
    removed = []
    for component, new in by_component.items():
        folder = dst / component
        rewritten = _rewrite_component(folder, new)
        keep = {f for f in folder.iterdir() if _is_default_safetensors(f.name)} if rewritten else set()
        for f in sorted(folder.iterdir()):
            if f.is_file() and f not in keep and (f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".json")
                                                  and ".index" in f.name):
                f.unlink()
                removed.append(f.relative_to(dst))
        if not rewritten:
            pipe.components[component].save_pretrained(str(folder), safe_serialization=True)
    gone = tuple(str(f) for f in removed if not (dst / f).exists())  # save_pretrained may write the same names
    for f in gone:
        log.warning("removed %s: a weight file of a rewritten component that the bake did not rewrite "
                    "(it would load unsteered)", f)
    return gone


def _is_default_safetensors(name: str) -> bool:
    """``diffusion_pytorch_model.safetensors``, its shards ``...-00001-of-00002.safetensors`` and index; not a
    variant (``.fp16.``)."""
    return (name.endswith(".safetensors") and name.count(".") == 1) or (
        name.endswith(".safetensors.index.json") and name.count(".") == 3)


def bake_pipeline(model, maps, strength: float = 1.0, *, out, overwrite: bool = False, verify: bool = True,
                  steps: int = 2, seed: int = 0, trust_remote_code: bool = False, allow_rebake: bool = False,
                  ignore_model_mismatch: bool = False, command: str = "", device: str = "cpu",
                  formats: tuple[str, ...] = ("hf",)) -> PipelineBake:
    """Bake ``maps`` (a path, a SteeringMaps, or a list of ``(maps, strength)``) into the pipeline folder
    ``model`` and write the steered pipeline to ``out``.  Raises :class:`VerificationError` (with
    ``.report``) when the written pipeline does not reproduce the hooked one; nothing is written then."""
    folder = _folder(model, trust_remote_code=trust_remote_code)
    check_device(device)
    sources = normalise_maps(maps, strength)
    eff = combined(sources)
    steered = {split_site(site)[0] for site in eff if "." in site}
    onnx = "onnx" in formats
    out = check_out_dir(out, overwrite, model_dir=folder,
                        needed_bytes=int(_export_bytes(folder, steered, onnx=onnx) * 1.1))
    pipe = load_pipeline(folder, trust_remote_code=trust_remote_code, device=device)
    pipeline_class = type(pipe).__name__
    _check_maps_pipeline(sources, pipeline_class, ignore_model_mismatch)
    modules = pipeline_modules(pipe)
    plan = plan_pipeline(modules, eff, require_standard=True)  # no standard fallback (bake.plan.diffusers)
    earlier = _earlier_bakes(folder, sources, plan.maps_digest, allow_rebake)
    baked = tuple(dict.fromkeys(split_site(t)[0] for p in plan.sites for step in p.steps for t in step.tensors))
    copied = tuple(c for c in modules._modules if c not in baked)
    if not baked:
        raise FoldError("every map is the identity: there is nothing to bake")
    affines = {site: (m.scale, m.shift) for site, m in eff.items()}
    checks = [TORCH_CHECK] if verify else []  # the checks that will run, each with its denoiser and image rows
    if onnx:
        from bake.families.diffusers.onnx import ONNX_CHECK, check_onnx_supported

        check_onnx_supported(pipeline_class)
        checks.append(ONNX_CHECK)
    base = hooked = None
    if checks:  # the ONNX check compares with the hooked reference, also under --no-verify
        base, hooked = DIFFUSERS_PIPELINE.reference(pipe, affines, seed=seed, steps=steps, checks=checks)
    if onnx:
        from bake.families.diffusers.onnx import PipelineReference
        from bake.families.diffusers.verify import denoiser_inputs, pipeline_call

        probe = dict(denoiser_inputs=denoiser_inputs(pipe.components[denoiser_name(pipe)], seed),
                     call_kwargs=pipeline_call(pipe, seed, steps), seed=seed)
        onnx_refs = [PipelineReference(**probe, denoiser=o.denoiser, image=o.image) for o in (base, hooked)]
    maps_checked = check_applicable(modules, plan, eff)
    final = compute_folded(modules, plan, maps_checked, ModuleStore(modules))
    commit_plan(modules, plan, maps_checked, final)  # the in-memory components now compute the baked outputs
    with sigterm_raises():
        tmp = temp_folder(out)
        try:
            removed = write_pipeline(tmp, folder, pipe, final)
            del pipe, modules
            if verify:
                cand = record(load_pipeline(tmp, device=device), seed=seed, steps=steps)
                report = compare(base, hooked, cand, steps=steps, seed=seed)
                if not report.passed:
                    raise VerificationError("; ".join(report.failures()), report=report)
            else:
                report = PipelineReport(rows=(), steps=steps, seed=seed, skipped=True)
            onnx_report = None
            if onnx:  # exported from the written folder; ORT vs hooked, nothing kept on failure
                from bake.families.diffusers.onnx import export_pipeline_onnx
                from bake.formats.onnx import ONNX_SUBDIR

                onnx_report = export_pipeline_onnx(tmp, tmp / ONNX_SUBDIR, onnx_refs[1], base=onnx_refs[0])
            entry = {"effective_digest": plan.maps_digest, "sites": [p.site for p in plan.sites],
                     "maps": [s.describe() for s in sources]}
            info = PipelineExportInfo(base_model=str(model), base_path=str(folder.resolve()),
                                      pipeline_class=pipeline_class, maps=[s.describe() for s in sources], plan=plan,
                                      report=report, components_baked=list(baked), components_copied=list(copied),
                                      command=command, bakes=earlier + [entry], removed_files=list(removed),
                                      onnx=onnx_report)
            write_files(tmp, info)
            move_into_place(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return PipelineBake(folder=out, plan=plan, report=report, components_baked=baked, components_copied=copied,
                        onnx_report=onnx_report)
