"""The diffusers-pipeline family (a folder with ``model_index.json``), baked by :mod:`bake.families.diffusers.bake`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from bake.families.base import FamilyKind
from bake.families.diffusers.verify import (
    DENOISER_ROW,
    IMAGE_ROW,
    Outputs,
    changes,
    denoiser_inputs,
    record,
    run_denoiser,
    run_image,
)
from bake.verify.guard import Sample, degeneracy, first_module, require_sound_reference, require_visible_change
from lineas.hooks import attach_affine
from lineas.pipelines import denoiser_name, is_pipeline_folder, pipeline_modules

TORCH_CHECK = (DENOISER_ROW, IMAGE_ROW)  # the rows of the written pipeline's check (verify.compare)


@dataclass(frozen=True)
class DiffusersFamily:
    kind: FamilyKind = FamilyKind.DIFFUSERS_PIPELINE
    library_name: str = "diffusers"
    pipeline_tag: str = "text-to-image"
    options: tuple[tuple[str, str], ...] = (("--verify-steps", "verify_steps"),)

    def recognises(self, path: str | os.PathLike | None) -> bool:
        return path is not None and os.path.isdir(path) and is_pipeline_folder(path)

    def reference(self, pipe, affines, *, seed: int = 0, steps: int = 2,
                  checks: Sequence[tuple[str, str]] = (TORCH_CHECK,)) -> tuple[Outputs, Outputs]:
        """The base and the hooked pipeline's outputs on both probes, after the shared guard: the hooked
        outputs are sound, and for each check (its denoiser and image rows) the maps move some probe by
        more than the check's limit."""
        base, hooked = record(pipe, seed=seed, steps=steps), record(pipe, affines, seed=seed, steps=steps)
        probes = [("denoiser", hooked.denoiser, base.denoiser), ("image", hooked.image, base.image)]
        probes = [p for p in probes if p[1] is not None]
        modules = pipeline_modules(pipe)

        def locate(i: int, test, among) -> str | None:
            if probes[i][0] == "denoiser":
                inputs = denoiser_inputs(pipe.components[denoiser_name(pipe)], seed)

                def run():
                    return run_denoiser(pipe, inputs)
            else:
                def run():
                    return run_image(pipe, seed, steps)
            handle = attach_affine(modules, affines)
            try:
                return first_module(modules, run, test, among)
            finally:
                handle.remove()

        require_sound_reference([Sample(name, h, degeneracy(b)) for name, h, b in probes], locate, affines)
        for den_row, img_row in checks:
            require_visible_change(changes(base, hooked, den_row, img_row), f"{den_row}/{img_row}")
        return base, hooked


DIFFUSERS_PIPELINE = DiffusersFamily()
